"""The architecture matrix: tiny random models of the architectures people fine-tune, each with its dropout rates
set > 0 in the config, loaded and trained by sapo. For each: it loads; step 1's DPO loss is log 2 with rewards 0
while the policy is in train mode (dropout is really off); the shared-prefix path agrees with the two-row path (or
is detected as unusable and the fallback is taken); the head-only path agrees with full logits (or falls back);
a 2-step train() writes a final/ that transformers loads back with the trained policy's logits.

    pytest tests/test_architectures.py -q -s      # -s also shows the table: architecture, head-only, shared-prefix
"""
import copy
import json
import math
import random

import pytest
import torch

import sapo
from conftest import write_jsonl
from tiny_models import ARCHITECTURES, make_tiny

# (architecture, chat template?): instruct-style families with ChatML, base-style ones without; a few both ways
CASES = [("gpt2", False), ("gpt2", True), ("gpt_neox", False), ("opt", False), ("llama", True), ("llama", False),
         ("mistral", True), ("qwen2", True), ("qwen2", False), ("qwen3", True), ("gemma", True), ("gemma2", True),
         ("phi3", True), ("olmo", False), ("stablelm", False), ("falcon", False), ("gptj", False), ("bloom", False),
         ("phi", False)]
IDS = [f"{a}-{'chat' if c else 'plain'}" for a, c in CASES]
SOFT_CAPPED = {"gemma2"}       # final_logit_softcapping set: lm_head(body(x)) is not the model's logits
assert {a for a, _ in CASES} == set(ARCHITECTURES)


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory):
    made = {}

    def get(arch, chat):
        if (arch, chat) not in made:
            made[arch, chat] = make_tiny(arch, tmp_path_factory.mktemp(f"{arch}_{'chat' if chat else 'plain'}"), chat)
        return made[arch, chat]
    return get


def load(path):
    """The model as train() holds it (loaded, dropout switched off: sapo.disable_dropout), and its tokenizer."""
    model = sapo.load_model(str(path))
    sapo.disable_dropout(model)
    return model, sapo.load_tokenizer(str(path))


def hand_tuples(V, eos, seed=0):
    """(x, y+, y-) tuples: a SAPO splice with suffix, an EOS-ended negative, y- = y+, no shared response token, and a
    short one that shares a packed row with the y- = y+ tuple."""
    rng = random.Random(seed)
    r = lambda n: [rng.randrange(3, V) for _ in range(n)]  # noqa: E731
    y = r(8) + [eos]
    return [{"prompt_ids": r(5), "chosen_ids": y, "rejected_ids": y[:3] + r(3) + y[6:]},
            {"prompt_ids": r(3), "chosen_ids": y, "rejected_ids": y[:2] + r(2) + [eos]},
            {"prompt_ids": r(4), "chosen_ids": y, "rejected_ids": list(y)},
            {"prompt_ids": r(2), "chosen_ids": r(4) + [eos], "rejected_ids": r(7) + [eos]},
            {"prompt_ids": r(2), "chosen_ids": [3, eos], "rejected_ids": [4, 5]}]


def full_logits_logp(model, x, y):
    """The plain computation: one unpadded row, the model's own logits, log_softmax, sum over y."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([x + y])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(x) - 1 + j, y[j]].item() for j in range(len(y)))


# ---------------------------------------------------------------------------------------------------
# Loading, and dropout really off
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_loads_and_dropout_is_off_in_train_mode(arch, chat, arch_dirs):
    path = arch_dirs(arch, chat)
    model, tok = load(path)
    assert tok.eos_token_id is not None and tok.pad_token_id is not None
    assert bool(tok.chat_template) == chat
    saved = json.loads((path / "config.json").read_text())
    rates = {k: v for k, v in saved.items() if "drop" in k and isinstance(v, float) and v > 0}
    assert rates, f"{arch}: the test config should carry dropout rates > 0"
    model.train()
    ids = torch.tensor([[5, 9, 17, 33, 60, 101, 7, 250]]) % model.config.vocab_size
    torch.manual_seed(0)
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    assert torch.equal(a, b), f"{arch}: two train-mode forwards differ: dropout is still on"
    model.eval()
    assert torch.allclose(model(input_ids=ids).logits, a, atol=1e-6)   # train mode == eval mode


# ---------------------------------------------------------------------------------------------------
# Step 1: policy == reference, policy in train mode => DPO loss log 2, rewards 0
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_step1_dpo_loss_is_log2_in_train_mode(arch, chat, arch_dirs):
    model, tok = load(arch_dirs(arch, chat))
    policy = model.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id)
    cfg = sapo.Config(beta=0.1)
    for _ in range(2):   # twice: a dropout mask drawn anew would show up as a different loss
        loss, m = sapo.batch_loss("dpo", cfg, policy, ref, batch, tok.pad_token_id, "cpu")
        assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
        assert abs(m["rewards/chosen"]) < 1e-6 and abs(m["rewards/rejected"]) < 1e-6 and abs(m["rewards/margins"]) < 1e-6
        loss.backward()      # and it is differentiable through whichever path was chosen
    assert any(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in policy.parameters())


# ---------------------------------------------------------------------------------------------------
# The two fast paths: head-only logits and shared-prefix rows; each either agrees or is detected and skipped
# ---------------------------------------------------------------------------------------------------


def paths(model) -> tuple[bool, bool]:
    return sapo.head_only_ok(model), sapo._shared_prefix_ok(model)


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_log_probs_match_full_logits_whichever_path(arch, chat, arch_dirs):
    model, tok = load(arch_dirs(arch, chat))
    model.eval()
    head_only, shared = paths(model)
    assert not (shared and not head_only)                       # shared prefix is built on the head-only path
    batch = hand_tuples(model.config.vocab_size, tok.eos_token_id, seed=1)
    with torch.no_grad():
        pos, neg, n_pos, n_neg = sapo.preference_logps(model, batch, tok.pad_token_id, "cpu")
        pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch] + [(b["prompt_ids"], b["rejected_ids"]) for b in batch]
        two_rows, counts = sapo.sequence_logps(model, **sapo.collate(pairs, tok.pad_token_id, "cpu"))
    assert n_pos.tolist() == [len(b["chosen_ids"]) for b in batch] and n_neg.tolist() == [len(b["rejected_ids"]) for b in batch]
    assert counts.tolist() == n_pos.tolist() + n_neg.tolist()
    assert len(sapo.shared_prefix_layout(batch, tok.pad_token_id)["ids"]) == len(batch) - 1   # one row packs two
    if shared:   # _shared_prefix_ok said yes: the one-row numbers must be the two-row numbers
        with torch.no_grad():
            one_row = sapo.shared_prefix_logps(model, batch, tok.pad_token_id, "cpu")
        assert torch.allclose(one_row[0], two_rows[: len(batch)], atol=1e-5)
        assert torch.allclose(one_row[1], two_rows[len(batch):], atol=1e-5)
    # whatever the paths, each sum is the plain full-logits one (this is what catches an undetected soft-cap)
    for i, b in enumerate(batch):
        assert pos[i].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["chosen_ids"]), abs=1e-4)
        assert neg[i].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["rejected_ids"]), abs=1e-4)


def test_soft_capped_logits_are_detected(arch_dirs):
    """Gemma2 computes logits = cap * tanh(lm_head(h) / cap): the head-only path (lm_head(body(x))) is wrong for
    it, and must be switched off for the model, whatever the size of its logits at the moment of the check."""
    model, _ = load(arch_dirs("gemma2", True))
    assert model.config.final_logit_softcapping
    assert sapo.head_only_ok(model) is False
    assert sapo._shared_prefix_ok(model) is False


def test_soft_cap_decision_holds_once_logits_grow(arch_dirs):
    """The head-only decision is taken once per model and cached; a model whose logits are small when it is taken
    (a fresh or lightly trained one) must still get the right log-probs once its logits are large (training
    sharpens them; real Gemma2 logits reach the cap of 30)."""
    model, tok = load(arch_dirs("gemma2", True))
    model.eval()
    sapo.head_only_ok(model), sapo._shared_prefix_ok(model)        # the decision, taken on the initial weights
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(200.0)           # tied with the embeddings: logits now reach ~cap
        ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
        assert model(input_ids=ids).logits.abs().max() > 10.0
    x, y = [5, 6, 7, 8], [9, 10, 11, tok.eos_token_id]
    with torch.no_grad():
        got, _ = sapo.sequence_logps(model, **sapo.collate([(x, y)], tok.pad_token_id, "cpu"))
    assert got[0].item() == pytest.approx(full_logits_logp(model, x, y), abs=1e-3)


def test_sliding_window_longer_than_the_check(tmp_path):
    """Mistral-style sliding-window attention (Mistral-7B-v0.1: 4096 tokens) with rows longer than the window: the
    two-row forward applies the window; a custom 4D mask replaces it. _shared_prefix_ok probes a 10-token pair,
    shorter than any real window, so it must not be the only guard: the numbers must be the full-logits ones."""
    path = make_tiny("mistral", tmp_path / "mistral_sw", chat=True, sliding_window=12)
    model, tok = load(path)
    model.eval()
    rng = random.Random(2)
    r = lambda n: [rng.randrange(3, model.config.vocab_size) for _ in range(n)]  # noqa: E731
    y = r(14) + [tok.eos_token_id]
    batch = [{"prompt_ids": r(8), "chosen_ids": y, "rejected_ids": y[:4] + r(10) + [tok.eos_token_id]}]
    with torch.no_grad():
        pos, neg, _, _ = sapo.preference_logps(model, batch, tok.pad_token_id, "cpu")
    b = batch[0]
    assert pos[0].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["chosen_ids"]), abs=1e-4)
    assert neg[0].item() == pytest.approx(full_logits_logp(model, b["prompt_ids"], b["rejected_ids"]), abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# A real 2-step run: metrics line 1 is log 2 with rewards 0; final/ loads back with the trained logits
# ---------------------------------------------------------------------------------------------------


def rows(n=12):
    return [{"prompt": f"Explain tea number {i}.", "chosen": f"Tea {i} is brewed by pouring hot water over leaves."}
            for i in range(n)]


@pytest.mark.parametrize("arch,chat", CASES, ids=IDS)
def test_two_step_run_and_final_loads_back(arch, chat, arch_dirs, tmp_path):
    from transformers import AutoModelForCausalLM
    path = arch_dirs(arch, chat)
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    out = tmp_path / "out"
    seen = {}
    cfg = sapo.Config(model=str(path), dataset=str(data), output_dir=str(out), max_steps=2, batch_size=2, segment_len=4,
                      max_length=64, max_prompt_length=40, save_steps=0, eval_size=2, lr=1e-3, log_every=100)
    sapo.train(cfg, on_step=lambda step, policy, metrics: seen.update(policy=policy))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics[0]["rewards/chosen"]) < 1e-6 and abs(metrics[0]["rewards/rejected"]) < 1e-6
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    policy = seen["policy"].eval()
    start = AutoModelForCausalLM.from_pretrained(path)
    trained = dict(policy.named_parameters())
    assert sum(not torch.equal(p, trained[n]) for n, p in start.named_parameters()) > 0     # the run moved weights
    ids = torch.tensor([[5, 9, 17, 33, 60, 101, 7]]) % final.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(final(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)
    # the saved model is the user's model: its config still carries the dropout rates it came with
    rates = {k: v for k, v in start.config.to_dict().items() if "drop" in k}
    assert rates and all(final.config.to_dict()[k] == v for k, v in rates.items())
    assert sapo.latest_checkpoint(out / "checkpoints").name == "step-00000002"     # present, and its manifest verifies


# ---------------------------------------------------------------------------------------------------
# The table: architecture, head-only or full logits, shared-prefix or two rows
# ---------------------------------------------------------------------------------------------------


def test_architecture_table(arch_dirs, capsys):
    lines = [f"{'architecture':<20} {'class':<22} {'logits':<12} {'log-probs':<14}"]
    table = {}
    for arch, chat in CASES:
        model, _ = load(arch_dirs(arch, chat))
        head_only, shared = paths(model)
        table[arch, chat] = (head_only, shared)
        lines.append(f"{arch + ('-chat' if chat else ''):<20} {type(model).__name__:<22} "
                     f"{'head-only' if head_only else 'full-logits':<12} {'shared-prefix' if shared else 'two-row':<14}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    # the head-only path is the common case; the paths depend on the architecture, not on the chat template
    assert sum(h for h, _ in table.values()) >= len(CASES) - len(SOFT_CAPPED) - 1
    for arch in {a for a, _ in CASES}:
        assert len({table[a, c] for a, c in CASES if a == arch}) == 1, arch
