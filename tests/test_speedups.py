"""The speed-ups of sapo_fast.py against the plain path of sapo.py, on every architecture of the matrix.

Each speed-up must compute what its plain function computes: log-probs, losses and gradients to float rounding;
where it changes which tokens are drawn (the top-k sampler, the bf16 generator copy), the distribution tokens are
drawn from. A model that fails a speed-up's check gets the plain computation. The checks read the model and never
write to it, so a caller may hold an autograd graph on the same model across them.

    pytest tests/test_speedups.py -q -s     # -s also prints the table: architecture, logits path, log-prob path
"""
import copy
import json
import math
import random

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import sapo
import sapo_fast
from sapo_utils.evaluation import GREEDY
import sapo_utils.models
from tiny_models import ARCHITECTURES, CASES, IDS, SOFT_CAPPED, full_logits_logp, hand_tuples, load, make_tiny, paths

PLAIN, FAST = sapo.Config(plain=True), sapo.Config()


def perturbed_copy(model, scale=0.02, seed=0):
    """A frozen copy with slightly moved weights: a reference that differs from the policy, so rewards are not 0."""
    ref = sapo.frozen_copy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return ref


# ---------------------------------------------------------------------------------------------------
# Log-probs, losses and gradients: default path == --plain path, on every architecture
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_fast_path_equals_plain_path(arch, chat, arch_dirs):
    """sapo.batch_loss with the speed-ups (the default) and with --plain: the DPO, ORPO and SFT losses, their
    metrics and the policy's gradients agree to float rounding, whichever speed-ups this model passes."""
    model, tok = load(arch_dirs(arch, chat))
    policy = model.train()
    ref = perturbed_copy(policy)
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id, seed=2)
    for kind in ("dpo", "orpo", "sft"):
        results = []
        for cfg in (PLAIN, FAST):
            policy.zero_grad(set_to_none=True)
            loss, metrics = sapo.batch_loss(kind, cfg, policy, ref, batch, tok.pad_token_id, "cpu",
                                           sapo.ops_for(cfg, "cpu"))
            loss.backward()
            grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
            results.append((loss.item(), metrics, grads))
        (loss_p, m_p, g_p), (loss_f, m_f, g_f) = results
        assert loss_f == pytest.approx(loss_p, abs=1e-5), kind
        for key, value in m_p.items():
            assert m_f[key] == pytest.approx(value, abs=1e-4, rel=1e-4), (kind, key)
        assert len(g_p) == len(g_f) > 0
        for a, b in zip(g_p, g_f):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), kind


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_log_probs_match_full_logits_whichever_path(arch, chat, arch_dirs):
    """Every sum the fast path returns is the plain full-logits sum of one unpadded row (this is what catches an
    undetected soft-cap), and where the model passes the packing check, the packed rows give the two-row sums."""
    model, tok = load(arch_dirs(arch, chat))
    model.eval()
    head_only, packed = paths(model)
    assert not (packed and not head_only)                       # packing is built on head-only logits
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id, seed=1)
    fast = sapo.ops_for(FAST, torch.device("cpu"))
    with torch.no_grad():
        pos, neg, n_pos, n_neg = fast.preference_logps(model, batch, tok.pad_token_id, "cpu")
        two = sapo.preference_logps(model, batch, tok.pad_token_id, "cpu")
    assert n_pos.tolist() == [len(b["chosen_ids"]) for b in batch] == two[2].tolist()
    assert n_neg.tolist() == [len(b["rejected_ids"]) for b in batch] == two[3].tolist()
    assert len(sapo_fast.shared_prefix_layout(batch, tok.pad_token_id)["ids"]) == len(batch) - 1  # one row packs two
    if packed:
        with torch.no_grad():
            one_row = sapo_fast.packed_logps(model, batch, tok.pad_token_id, "cpu")
        assert torch.allclose(one_row[0], two[0], atol=1e-5) and torch.allclose(one_row[1], two[1], atol=1e-5)
    for i, b in enumerate(batch):
        assert pos[i].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["chosen_ids"]), abs=1e-4)
        assert neg[i].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["rejected_ids"]), abs=1e-4)


def test_head_only_logps_equal_full_logps(arch_dirs):
    """sapo_fast.head_logps is sapo.full_logps_at at the selected positions."""
    model, tok = load(arch_dirs("llama", True))
    batch = sapo.collate([([5, 6, 7], [9, 10, 11, 12]), ([8, 9], [13, 14])], tok.pad_token_id, "cpu")
    with torch.no_grad():
        fast, n_fast = sapo.sequence_logps(model, **batch, logps_at=sapo_fast.head_logps)
        plain, n_plain = sapo.sequence_logps(model, **batch)
    assert torch.allclose(fast, plain, atol=1e-5) and n_fast.tolist() == n_plain.tolist() == [4, 2]


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_log_probs_and_gradients_equal_whole(chunk, arch_dirs):
    """chunked_token_logps, any chunk size: the token log-probs and the gradients (through the recomputed
    chunks) of the whole (N, V) computation, to float rounding."""
    model, _ = load(arch_dirs("llama", True))
    head = model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, head.in_features, generator=g, requires_grad=True)
    targets = torch.randint(0, head.out_features, (10,), generator=g)
    weights = torch.randn(10, generator=g)
    results = []
    for logps_of in (lambda: sapo.token_logps(head(hidden), targets),
                     lambda: sapo_fast.chunked_token_logps(head, hidden, targets, chunk_size=chunk)):
        model.zero_grad()
        hidden.grad = None
        logps = logps_of()
        (logps * weights).sum().backward()
        results.append((logps.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    (a, ga, wa), (b, gb, wb) = results
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ga, gb, atol=1e-6) and torch.allclose(wa, wb, atol=1e-6)


def test_no_whole_batch_logits_are_alive(arch_dirs, monkeypatch):
    """With chunks of 4 positions, the output layer never sees more than 4 positions at once, in the forward
    and in the backward's recomputation."""
    model, tok = load(arch_dirs("llama", True))
    monkeypatch.setattr(sapo_fast, "CHUNK_POSITIONS", 4)
    assert paths(model) == (True, True)                  # the checks' own small forwards, first
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    try:
        batch = hand_tuples(model.config.vocab_size, tok.eos_token_id)
        out = sapo.ops_for(FAST, torch.device("cpu")).preference_logps(model, batch, tok.pad_token_id, "cpu")
        (out[0] - out[1]).sum().backward()
    finally:
        hook.remove()
    scored = sum(len(b["chosen_ids"]) + len(b["rejected_ids"]) for b in batch)
    assert seen and max(seen) <= 4 and sum(seen) >= scored          # forward chunks, then recomputed ones


def test_packed_rows_and_their_gradients(arch_dirs):
    """Short tuples share a packed row; sums, counts and gradients equal the two-row ones."""
    model, tok = load(arch_dirs("llama", True))
    model.eval()
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id, seed=3)
    layout = sapo_fast.shared_prefix_layout(batch, tok.pad_token_id)
    assert len(layout["ids"]) == len(batch) - 1 and layout["row_of"].unique().numel() == len(batch) - 1
    assert len(sapo_fast.shared_prefix_layout(batch, tok.pad_token_id, pack=False)["ids"]) == len(batch)
    results = []
    for logps in (sapo_fast.packed_logps, sapo.preference_logps):
        model.zero_grad()
        out = logps(model, batch, tok.pad_token_id, "cpu")
        (out[0] - 2 * out[1]).sum().backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = results
    assert torch.allclose(a[0], b[0], atol=1e-4) and torch.allclose(a[1], b[1], atol=1e-4)
    assert a[2].tolist() == b[2].tolist() and a[3].tolist() == b[3].tolist()
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(ga, gb))


# ---------------------------------------------------------------------------------------------------
# The checks: they catch what they must, and never write to the model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_checks_leave_the_model_untouched(arch, arch_dirs):
    """A caller holds a graph on a model (retain_graph), sapo's default path runs its first-use checks on that model,
    then the caller back-propagates: no in-place modification error, and every parameter and buffer is bit for bit
    what it was."""
    model, tok = load(arch_dirs(arch, True))
    ids = torch.tensor([[5, 6, 7, 8, 9]]) % model.config.vocab_size
    held = model(input_ids=ids).logits.square().mean()          # the caller's graph, not yet back-propagated
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert not hasattr(model, "_sapo_head_only") and not hasattr(model, "_sapo_packing")
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id)
    loss, _ = sapo.batch_loss("orpo", FAST, model, None, batch, tok.pad_token_id, "cpu",
                           sapo.ops_for(FAST, "cpu"))
    assert hasattr(model, "_sapo_head_only") and hasattr(model, "_sapo_packing")    # the checks ran
    held.backward(retain_graph=True)
    loss.backward()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_soft_capped_logits_are_detected(arch_dirs):
    """Gemma2 computes logits = cap * tanh(lm_head(h) / cap): head(body(x)) is not its logits, so neither head-only
    logits nor packing is used, whatever the size of its logits when the check runs."""
    model, _ = load(arch_dirs("gemma2", True))
    assert model.config.final_logit_softcapping
    assert sapo_fast.head_only_ok(model) is False
    assert sapo_fast.packing_ok(model, sapo.preference_logps) is False


def test_a_logit_transform_the_config_does_not_name_is_found(arch_dirs):
    """A cap the config does not declare is found on the scaled copy of the output layer."""
    model, _ = load(arch_dirs("llama", True))
    forward = type(model).forward

    def capped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out
    model.forward = capped.__get__(model)
    assert sapo_fast.head_only_ok(model) is False


def test_soft_cap_decision_holds_once_logits_grow(arch_dirs):
    """The head-only decision is taken once per model; once the logits are large (training sharpens them; real Gemma2
    logits reach the cap of 30), the log-probs are still the full-logits ones."""
    model, tok = load(arch_dirs("gemma2", True))
    model.eval()
    paths(model)                                                        # the decision, on the initial weights
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200.0)
        assert model(input_ids=torch.tensor([[3, 4, 5, 6, 7, 8]])).logits.abs().max() > 10.0
    x, y = [5, 6, 7, 8], [9, 10, 11, tok.eos_token_id]
    with torch.no_grad():
        got, _ = sapo.sequence_logps(model, **sapo.collate([(x, y)], tok.pad_token_id, "cpu"),
                                     logps_at=sapo_fast.head_logps)
    assert got[0].item() == pytest.approx(full_logits_logp(model, x, y), abs=1e-3)


def without(argument):
    """A base_model.forward that drops one keyword argument (a kernel or model that ignores it)."""
    def wrap(forward):
        def forward_without(*args, **kwargs):
            kwargs.pop(argument, None)
            return forward(*args, **kwargs)
        return forward_without
    return wrap


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "gpt_neox"])
def test_a_model_that_ignores_position_ids_is_caught(arch, arch_dirs):
    """At random initialisation a model that ignores position_ids gives packed sums close to the two-row ones (the
    positions barely matter yet); the check must still refuse packing for it, and the numbers stay the plain ones."""
    model, tok = load(arch_dirs(arch, True))
    model.eval()
    model.base_model.forward = without("position_ids")(model.base_model.forward)
    assert sapo_fast.packing_ok(model, sapo.preference_logps) is False
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id, seed=4)
    fast = sapo.ops_for(FAST, torch.device("cpu"))
    with torch.no_grad():
        pos, neg, _, _ = fast.preference_logps(model, batch, tok.pad_token_id, "cpu")
    for i, b in enumerate(batch):
        assert neg[i].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["rejected_ids"]), abs=1e-4)


def test_a_model_that_ignores_the_mask_is_caught(arch_dirs):
    """A model whose attention ignores a custom 4D mask (some fused kernels) gets the two-row forward."""
    model, tok = load(arch_dirs("llama", True))
    model.eval()
    model.base_model.forward = without("attention_mask")(model.base_model.forward)
    assert sapo_fast.packing_ok(model, sapo.preference_logps) is False


def test_an_empty_prompt_is_refused(arch_dirs):
    """y's first token has no position to be predicted from: both paths refuse, instead of scoring the wrong
    position (the packed layout would read the row's last position)."""
    model, tok = load(arch_dirs("llama", True))
    batch = [{"prompt_ids": [], "chosen_ids": [5, 6, 7], "rejected_ids": [5, 8]}]
    with pytest.raises(ValueError, match="empty prompt"):
        sapo.preference_logps(model, batch, tok.pad_token_id, "cpu")
    with pytest.raises(ValueError, match="empty prompt"):
        sapo_fast.shared_prefix_layout(batch, tok.pad_token_id)


def test_sliding_window_longer_than_the_check(tmp_path):
    """Mistral-style sliding-window attention with rows longer than the window: a custom 4D mask would replace the
    window, so such batches take the two-row path; the numbers are the full-logits ones."""
    path = make_tiny("mistral", tmp_path / "mistral_sw", chat=True, sliding_window=12)
    model, tok = load(path)
    model.eval()
    rng = random.Random(2)
    r = lambda n: [rng.randrange(3, model.config.vocab_size) for _ in range(n)]  # noqa: E731
    y = r(14) + [tok.eos_token_id]
    batch = [{"prompt_ids": r(8), "chosen_ids": y, "rejected_ids": y[:4] + r(10) + [tok.eos_token_id]}]
    assert sapo_fast.beyond_window(model.config, batch)
    fast = sapo.ops_for(FAST, torch.device("cpu"))
    with torch.no_grad():
        pos, neg, _, _ = fast.preference_logps(model, batch, tok.pad_token_id, "cpu")
    b = batch[0]
    assert pos[0].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["chosen_ids"]), abs=1e-4)
    assert neg[0].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["rejected_ids"]), abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# Sampling: the top-k sampler draws from transformers' distribution
# ---------------------------------------------------------------------------------------------------

SETTINGS = [(0.7, 50, 0.95), (1.0, 0, 0.9), (0.5, 5, 1.0), (1.3, 10, 0.5), (0.7, 1, 0.95), (2.0, 3, 0.3)]


def transformers_probs(scores, temperature, top_k, top_p):
    """What generate(do_sample=True) draws from: its warpers in its order, then softmax."""
    x = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)


def empirical(scores, n, temperature, top_k, top_p, seed=0):
    """Token frequencies of n draws by TopKTopPSampler from each row of scores (B, V)."""
    sampler = sapo_fast.TopKTopPSampler(temperature, top_k, top_p)
    torch.manual_seed(seed)
    rows = scores.repeat_interleave(n, 0)
    out = sampler(None, rows.clone())
    assert ((out == 0).sum(-1) == 1).all() and ((out == 0) | (out == float("-inf"))).all()   # one pick per row
    picks = out.argmax(-1).view(scores.shape[0], n)
    return torch.stack([torch.bincount(p, minlength=scores.shape[1]) for p in picks]).double() / n


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampler_draws_from_transformers_distribution(temperature, top_k, top_p):
    """Draws land only where transformers' warpers keep mass, and their frequencies match its probabilities. Which
    of several tied tokens top-p drops is its sort's choice, so rows with ties compare the sorted probabilities."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=g) * 2
    scores[1, [4, 9, 17]] = scores[1].max() + 1.0          # a three-way tie at the top
    scores[2, :12] = 0.5                                   # a wide tie, straddling the k-th value for small k
    want = transformers_probs(scores, temperature, top_k, top_p)
    got = empirical(scores, 20000, temperature, top_k, top_p)
    assert ((got[0] > 0) <= (want[0] > 0)).all(), "a draw outside transformers' kept set"
    assert ((got > 0).sum(-1) <= (want > 0).sum(-1)).all()
    assert (got[0] - want[0]).abs().max() < 0.015
    assert (got.sort(-1).values - want.sort(-1).values).abs().max() < 0.015
    assert 0.5 * (got[0] - want[0]).abs().sum() < 0.03    # total variation: a wrong top-p or temperature moves it


def test_sampler_keeps_ties_at_the_kth_value():
    """transformers' top-k keeps every token equal to the k-th value: with 6 equal top logits and k = 2, all 6
    get drawn."""
    scores = torch.full((1, 30), -3.0)
    scores[0, 10:16] = 2.0
    got = empirical(scores, 6000, 1.0, 2, 1.0)
    assert (got[0, 10:16] > 0.12).all() and got[0, :10].sum() == 0 and got[0, 16:].sum() == 0


def test_fast_sampling_replaces_only_sampling():
    """Greedy arguments pass through; sampling ones become the sampler with the same settings."""
    assert sapo_fast.fast_sampling(GREEDY) is GREEDY
    fast = sapo_fast.fast_sampling(sapo.segment_sampling(0.7, 50, 0.95))
    sampler = fast["logits_processor"][0]
    assert fast["do_sample"] is False and (sampler.temperature, sampler.top_k, sampler.top_p) == (0.7, 50, 0.95)


# ---------------------------------------------------------------------------------------------------
# The generator's bf16 copy: follows the weights, and draws from (nearly) the fp32 model's distribution
# ---------------------------------------------------------------------------------------------------


def test_generator_copy_follows_the_weights(arch_dirs):
    """A bf16 copy of the parameters (buffers untouched), made once per model and refreshed at every call; the
    original stays fp32 and untouched; asking for its own dtype returns the model itself."""
    model, _ = load(arch_dirs("llama", True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = sapo_fast.generator_copy(model, torch.bfloat16)
    assert twin is not model and sapo_fast.generator_copy(model, torch.float32) is model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in twin.parameters())
    assert all(b.dtype == b0.dtype for b, b0 in zip(twin.buffers(), model.buffers()))
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(q, p.to(torch.bfloat16)), n
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    again = sapo_fast.generator_copy(model, torch.bfloat16)
    assert again is twin                                                         # kept, not rebuilt
    assert all(torch.equal(q, p.to(torch.bfloat16)) for p, q in zip(model.parameters(), again.parameters()))
    assert all(v.dtype == before[k].dtype for k, v in model.state_dict().items())
    other = copy.deepcopy(model)
    assert sapo_fast.generator_copy(other, torch.bfloat16) is not twin          # one copy, for the last model asked


def test_generation_dtype_choice():
    cpu = torch.device("cpu")
    assert sapo_fast.generation_dtype("fp32", "bf16-mixed", cpu) is torch.float32
    assert sapo_fast.generation_dtype("bf16", "fp32", cpu) is torch.bfloat16
    assert sapo_fast.generation_dtype("auto", "bf16-mixed", cpu) is torch.bfloat16
    native = sapo_fast.native_bf16(cpu)
    assert sapo_fast.generation_dtype("auto", "fp32", cpu) is (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_copy_draws_from_the_models_distribution(arch, arch_dirs):
    """The bf16 copy's next-token distribution is the fp32 model's up to bf16 rounding (total variation < 0.02 on
    every architecture); its sampled segments are valid ids, stopped at EOS; the fp32 model is untouched."""
    model, tok = load(arch_dirs(arch, False))
    model.eval()
    V, stop = model.config.vocab_size, sapo_utils.models.stop_token_ids(model, tok)
    ids = torch.tensor([[5, 9, 17, 33, 60, 101, 7]]) % V
    twin = sapo_fast.generator_copy(model, torch.bfloat16)
    with torch.no_grad():
        p32 = model(input_ids=ids).logits.float().softmax(-1)
        p16 = twin(input_ids=ids).logits.float().softmax(-1)
    assert 0.5 * (p32 - p16).abs().sum(-1).max() < 0.02
    generate = sapo_fast.generate_segments(sapo.generate_segments, torch.bfloat16)
    torch.manual_seed(0)
    segs = generate(model, [[5, 6, 7], [8, 9]], [5, 3], tok.pad_token_id, stop, sapo.segment_sampling(0.7, 50, 0.95))
    assert all(len(s) <= n for s, n in zip(segs, [5, 3])) and all(0 <= t < V for s in segs for t in s)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# End to end: --plain trains what the default path trains
# ---------------------------------------------------------------------------------------------------


def test_plain_run_equals_default_run(tiny_llama_dir, small_jsonl, tmp_path):
    """Two 3-step SAPO-DPO runs, one with every speed-up and one with --plain. Segments are greedy (top_k = 1) and
    the generator fp32, so both draw the same negatives; then every metric agrees to float rounding."""
    lines = []
    for name, plain in (("fast", False), ("plain", True)):
        cfg = sapo.Config(model=str(tiny_llama_dir), dataset=str(small_jsonl), output_dir=str(tmp_path / name),
                          max_steps=3, batch_size=2, segment_len=4, max_length=128, max_prompt_length=64,
                          save_steps=-1, eval_size=2, eval_steps=1, lr=1e-3, top_k=1, generator_dtype="fp32",
                          plain=plain, log_every=100)
        sapo.train(cfg)
        lines.append([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    fast, plain = lines
    assert len(fast) == len(plain) == 3
    for a, b in zip(fast, plain):
        for key, value in a.items():
            if key.startswith(("time/", "gen/")):
                continue
            assert math.isfinite(value) and b[key] == pytest.approx(value, abs=1e-4, rel=1e-4), (a["step"], key)
    assert any(abs(a["rewards/margins"]) > 1e-4 for a in fast)          # training moved something


# ---------------------------------------------------------------------------------------------------
# The table: which speed-ups each architecture passes
# ---------------------------------------------------------------------------------------------------


def test_architecture_table(arch_dirs, capsys):
    lines = [f"{'architecture':<20} {'class':<22} {'logits':<12} {'log-probs':<14}"]
    table = {}
    for arch, chat in CASES:
        model, _ = load(arch_dirs(arch, chat))
        head_only, packed = paths(model)
        table[arch, chat] = (head_only, packed)
        lines.append(f"{arch + ('-chat' if chat else ''):<20} {type(model).__name__:<22} "
                     f"{'head-only' if head_only else 'full-logits':<12} {'packed' if packed else 'two-row':<14}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # the head-only path is the common case; the paths depend on the architecture, not on the chat template
    assert sum(h for h, _ in table.values()) >= len(CASES) - len(SOFT_CAPPED) - 1
    for arch in {a for a, _ in CASES}:
        assert len({table[a, c] for a, c in CASES if a == arch}) == 1, arch
