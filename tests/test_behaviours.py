"""Behaviours of sapo.train that no other test runs: the three ablations, the reference-refresh schedule, buffer
sampling modes, learning-rate schedules, bf16-mixed and gradient checkpointing, EOS at a segment's edges, held-out
prompts, ORPO's NLL masking, buffer counts across a resume, and every branch of check_config."""
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch

import sapo
from sapo_utils.evaluation import GREEDY
import sapo_utils.cli
import sapo_utils.errors
import sapo_utils.models
import sapo_utils.optim
from conftest import write_jsonl


def tiny_cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), dataset=str(data), output_dir=str(out), max_steps=3, batch_size=2, lr=1e-3,
                segment_len=6, eval_size=2, save_steps=0, log_every=100, max_length=96, max_prompt_length=48)
    return sapo.Config(**{**base, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def ckpt(out) -> Path:
    return sorted((Path(out) / "checkpoints").glob("step-*"))[-1]


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def load(path):
    """The model as train() holds it: loaded, dropout off; and its tokenizer."""
    model = sapo_utils.models.load_model(str(path))
    sapo_utils.models.disable_dropout(model)
    return model, sapo_utils.models.load_tokenizer(str(path))


def rows(n, prefix="Explain tea number"):
    return [{"prompt": f"{prefix} {i}.", "chosen": f"Tea {i} is brewed by pouring hot water over leaves. "
             "Wait a few minutes and drink it."} for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# The three ablations, through train
# ---------------------------------------------------------------------------------------------------


def test_whole_response_regenerates_from_zero(tiny_llama_dir, small_jsonl, tmp_path):
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "seg", num_samples=100))
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "whole", num_samples=100, whole_response=True))
    seg, whole = read_jsonl(tmp_path / "seg" / "samples.jsonl"), read_jsonl(tmp_path / "whole" / "samples.jsonl")
    assert len(seg) == len(whole) == 6
    assert any(s["t"] > 0 for s in seg)                                   # segments start inside y+ ...
    assert all(s["t"] == 0 and s["rejected_marked"].startswith("[[") for s in whole)   # ... whole responses at 0
    # nothing of y+ survives after a whole-response segment: the rejected text is the segment alone
    assert all(s["rejected_marked"].endswith("]]") for s in whole)
    items = json.loads((ckpt(tmp_path / "whole") / "state.json").read_text())["buffer"]["items"]
    assert items and all(it["t"] == 0 for it in items)


def test_no_buffer_trains_on_the_fresh_batch(tiny_llama_dir, small_jsonl, tmp_path, monkeypatch):
    fresh, used = [], []
    real_make, real_loss = sapo.make_negatives, sapo.batch_loss

    def make_negatives(*a, **k):
        out = real_make(*a, **k)
        fresh.append([id(t) for t in out])
        return out

    def batch_loss(kind, cfg, policy, ref, batch, *a, **k):
        used.append([id(t) for t in batch])
        return real_loss(kind, cfg, policy, ref, batch, *a, **k)
    monkeypatch.setattr(sapo, "make_negatives", make_negatives)
    monkeypatch.setattr(sapo, "batch_loss", batch_loss)
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "o", use_buffer=False))
    metrics = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert [m["buffer/size"] for m in metrics] == [0, 0, 0]
    assert json.loads((ckpt(tmp_path / "o") / "state.json").read_text())["buffer"]["items"] == []
    assert used == fresh[1:]          # fresh[0]: the held-out negatives; then each loss batch is that step's fresh batch


def test_policy_generator_makes_no_ema(tiny_llama_dir, small_jsonl, tmp_path, monkeypatch):
    generators = []
    real = sapo.make_negatives
    monkeypatch.setattr(sapo, "make_negatives", lambda gen, *a, **k: generators.append(gen) or real(gen, *a, **k))
    ema_calls = []
    real_ema = sapo.ema_update
    monkeypatch.setattr(sapo, "ema_update", lambda *a, **k: ema_calls.append(1) or real_ema(*a, **k))
    seen = {}
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "pol", generator="policy"),
               on_step=lambda s, policy, m: seen.update(policy=policy))
    files = {p.name for p in ckpt(tmp_path / "pol").iterdir()}
    assert "ema.safetensors" not in files and {"policy.safetensors", "ref.safetensors"} <= files
    assert ema_calls == []
    assert len(generators) == 4 and all(g is seen["policy"] for g in generators)   # eval negatives + 3 steps
    # the default writes an EMA, and the EMA (not the policy) writes the training negatives
    generators.clear()
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "ema"), on_step=lambda s, policy, m: seen.update(policy=policy))
    assert "ema.safetensors" in {p.name for p in ckpt(tmp_path / "ema").iterdir()} and len(ema_calls) == 3
    assert all(g is not seen["policy"] for g in generators[1:])


# ---------------------------------------------------------------------------------------------------
# The reference schedule: at the start of step s (s = steps done), after the EMA update, if s > 0 and s % every == 0
# ---------------------------------------------------------------------------------------------------


def record_schedule(monkeypatch):
    rec = {"ema": [], "ref": {}, "copies": []}
    real_ema, real_copy, real_loss = sapo.ema_update, sapo.copy_weights, sapo.batch_loss

    def ema_update(ema, policy, decay):
        real_ema(ema, policy, decay)
        rec["ema"].append(flat(ema))

    def copy_weights(dst, src):
        real_copy(dst, src)
        rec["copies"].append(len(rec["ema"]) - 1)

    def batch_loss(kind, cfg, policy, ref, *a, **k):
        rec["ref"].setdefault(len(rec["ema"]) - 1, []).append(flat(ref))
        return real_loss(kind, cfg, policy, ref, *a, **k)
    monkeypatch.setattr(sapo, "ema_update", ema_update)
    monkeypatch.setattr(sapo, "copy_weights", copy_weights)
    monkeypatch.setattr(sapo, "batch_loss", batch_loss)
    return rec


def check_schedule(rec, initial, max_steps, due):
    assert len(rec["ema"]) == max_steps and sorted(rec["ref"]) == list(range(max_steps))
    assert rec["copies"] == due
    expected = initial
    for s in range(max_steps):
        if s in due:
            expected = rec["ema"][s]                   # the EMA right after this step's update
        for ref in rec["ref"][s]:                      # every micro-batch of the step sees the same reference
            assert torch.equal(ref, expected), f"step {s}"
        if s > 0 and s not in due:
            assert not torch.equal(rec["ref"][s][0], rec["ema"][s])   # the EMA moved on; the reference did not


@pytest.mark.parametrize("every,max_steps,due", [(2, 5, [2, 4]), (1, 3, [1, 2]), (0, 4, []), (7, 4, [])])
def test_reference_refresh_every_n_steps(every, max_steps, due, tiny_llama_dir, small_jsonl, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    rec = record_schedule(monkeypatch)
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "o", max_steps=max_steps, ref_update_steps=every))
    check_schedule(rec, flat(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)), max_steps, due)


@pytest.mark.parametrize("grad_accum,max_steps,due", [(1, 4, [3]), (2, 5, [2, 4])])
def test_reference_refresh_once_per_epoch(grad_accum, max_steps, due, tiny_llama_dir, tmp_path, monkeypatch):
    """-1: every ceil(6 training prompts / (2 per micro-batch * grad_accum)) steps = 3 (grad_accum 1), 2 (grad_accum 2)."""
    from transformers import AutoModelForCausalLM
    data = write_jsonl(tmp_path / "train.jsonl", rows(6))
    held = write_jsonl(tmp_path / "held.jsonl", rows(2, "Describe coffee number"))
    rec = record_schedule(monkeypatch)
    sapo.train(tiny_cfg(tiny_llama_dir, data, tmp_path / "o", max_steps=max_steps, grad_accum=grad_accum,
                        eval_dataset=str(held), ref_update_steps=-1))
    check_schedule(rec, flat(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)), max_steps, due)


# ---------------------------------------------------------------------------------------------------
# Buffer sampling inside train
# ---------------------------------------------------------------------------------------------------


def test_buffer_sampling_modes_inside_train(tiny_llama_dir, small_jsonl, tmp_path, monkeypatch):
    """The mode reaches the buffer (the weights each draw used), the saved counts add up, and with the same seed and
    the same pushes the two modes draw differently."""
    seen = []
    real = sapo.ReplayBuffer.sample

    def sample(self, n, rng):
        seen.append(([it["times_sampled"] for it in self.items], self.weights()))
        return real(self, n, rng)
    monkeypatch.setattr(sapo.ReplayBuffer, "sample", sample)
    counts = {}
    for mode in ("weighted", "uniform"):
        seen.clear()
        out = tmp_path / mode
        sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, out, max_steps=5, buffer_sampling=mode, segment_len=2))
        assert len(seen) == 5
        for c, w in seen:
            assert w == ([1.0] * len(c) if mode == "uniform" else [1 / (n + 1) for n in c])
        assert any(max(c) > 0 for c, _ in seen)        # by the later steps some tuples have been drawn before
        state = json.loads((ckpt(out) / "state.json").read_text())["buffer"]
        assert state["sampling"] == mode
        counts[mode] = [it["times_sampled"] for it in state["items"]]
        assert len(counts[mode]) == 10 and sum(counts[mode]) == 5 * 2   # batch_size draws per step, each counted once
    assert counts["weighted"] != counts["uniform"]


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedules: the lr column of metrics.jsonl
# ---------------------------------------------------------------------------------------------------


def by_hand(schedule, step, warmup, max_steps):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / (max_steps - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return math.sqrt(warmup / (step + 1))   # inverse_sqrt


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt"])
def test_lr_schedules_in_metrics(schedule, tiny_llama_dir, small_jsonl, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "o", max_steps=6, schedule=schedule, warmup_ratio=0.34, lr=2e-3)
    warmup = 2                                             # int(0.34 * 6)
    f = sapo_utils.optim.lr_lambda(schedule, warmup, 6)
    assert [f(s) for s in range(7)] == pytest.approx([by_hand(schedule, s, warmup, 6) for s in range(7)], abs=1e-12)
    sapo.train(cfg)
    lrs = [m["lr"] for m in read_jsonl(tmp_path / "o" / "metrics.jsonl")]
    # the row of step s logs the scheduler's rate after s steps (HF Trainer's convention): lr * f(s)
    assert lrs == pytest.approx([2e-3 * by_hand(schedule, s, warmup, 6) for s in range(1, 7)], rel=1e-9, abs=1e-15)
    if schedule == "cosine":
        assert lrs[-1] == pytest.approx(0.0, abs=1e-15) and lrs[3] == pytest.approx(2e-3 * 0.5)
    else:
        assert lrs[-1] == pytest.approx(2e-3 * math.sqrt(2 / 7))


# ---------------------------------------------------------------------------------------------------
# bf16-mixed, gradient checkpointing
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which,kw", [("tiny_llama_dir", {"precision": "bf16-mixed"}),
                                     ("tiny_gpt2_dir", {"gradient_checkpointing": True}),
                                     ("tiny_llama_dir", {"precision": "bf16-mixed", "gradient_checkpointing": True})],
                         ids=["llama-bf16-mixed", "gpt2-gc", "llama-both"])
def test_bf16_mixed_and_gradient_checkpointing(kw, which, request, small_jsonl, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    model_dir = request.getfixturevalue(which)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    sapo.train(tiny_cfg(model_dir, small_jsonl, tmp_path / "o", max_steps=2, **kw))
    metrics = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
    assert metrics[-1]["nonfinite/skipped"] == 0
    final = load_file(str(tmp_path / "o" / "final" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in final.values())          # fp32 master weights
    named = dict(start.named_parameters())
    changed = [not torch.equal(named[k], v) for k, v in final.items() if k in named]
    assert changed and sum(changed) > len(changed) // 2


def test_gradient_checkpointing_gives_the_same_step(tiny_llama_dir, small_jsonl, tmp_path):
    """Recomputing activations changes memory, not the numbers: same weights after 2 steps (to float rounding)."""
    from safetensors.torch import load_file
    for name, gc in (("plain", False), ("gc", True)):
        sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / name, max_steps=2, gradient_checkpointing=gc))
    a, b = (load_file(str(tmp_path / n / "final" / "model.safetensors")) for n in ("plain", "gc"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---------------------------------------------------------------------------------------------------
# EOS at the edges of a segment
# ---------------------------------------------------------------------------------------------------

EOS = 2


def test_splice_with_eos_first_last_and_beyond():
    y = list(range(100, 120))
    assert sapo.splice_negative(y, 5, 4, [EOS, 7, 8, 9], [EOS]) == (y[:5] + [EOS], 1)          # first: y+[:t] + EOS
    assert sapo.splice_negative(y, 5, 4, [7, 8, 9, EOS], [EOS]) == (y[:5] + [7, 8, 9, EOS], 4)  # last: no suffix
    assert sapo.splice_negative(y, 5, 4, [7, 8, 9, 6, EOS], [EOS]) == (y[:5] + [7, 8, 9, 6] + y[9:], 4)  # past G: ignored
    assert sapo.splice_negative(y, 0, 4, [EOS], [EOS]) == ([EOS], 1)                            # t = 0: y- is EOS alone
    assert sapo.splice_negative(y, 5, 4, [7, 8], [EOS]) == (y[:5] + [7, 8] + y[9:], 2)           # short segment


def test_make_negatives_with_eos_at_segment_edges(tiny_llama_dir, monkeypatch):
    """generate_segments stubbed: row 0's segment starts with EOS, row 1's ends with it, row 2 (a short y+, t = 0)
    is EOS alone. The negatives stop at the EOS with no suffix, and score like any other."""
    model, tok = load(tiny_llama_dir)
    model.eval()
    eos = tok.eos_token_id
    makers = [lambda n: [eos] + [300] * (n - 1), lambda n: [301] * (n - 1) + [eos], lambda n: [eos] * n]
    stub = lambda model, contexts, max_new, *a, **k: [f(n) for f, n in zip(makers, max_new)]  # noqa: E731
    y = [20 + j for j in range(30)] + [eos]
    examples = [sapo.Example([5, 6, 7], y), sapo.Example([5, 6, 7, 8], y), sapo.Example([5, 6], [40, 41, eos])]
    seen_t = set()
    for trial in range(6):
        plan_rng = random.Random(trial)            # the same draws make_negatives makes, in the same order
        (t0, G0), (t1, G1), (t2, _) = [sapo.truncation_point(len(e.chosen_ids), len(e.prompt_ids), 6, 128, plan_rng)
                                       for e in examples]
        out = sapo.make_negatives(model, examples, 6, 128, random.Random(trial), tok.pad_token_id, [eos],
                                  GREEDY, generate=stub)
        assert [o["t"] for o in out] == [t0, t1, t2] and G0 == G1 == 6 and t2 == 0
        assert out[0]["rejected_ids"] == y[:t0] + [eos] and out[0]["segment_len"] == 1
        assert out[1]["rejected_ids"] == y[:t1] + [301] * 5 + [eos] and out[1]["segment_len"] == 6
        assert out[2]["rejected_ids"] == [eos] and out[2]["segment_len"] == 1
        assert all(o["chosen_ids"] == e.chosen_ids for o, e in zip(out, examples))
        seen_t.update((t0, t1))
        with torch.no_grad():
            _, neg, _, n_neg = sapo.preference_logps(model, out, tok.pad_token_id, "cpu")
        assert n_neg.tolist() == [len(o["rejected_ids"]) for o in out]
        for o, v in zip(out, neg):
            x, yn = o["prompt_ids"], o["rejected_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([x + yn])).logits[0, :-1].double(), -1)
            assert v.item() == pytest.approx(sum(lp[len(x) - 1 + j, yn[j]].item() for j in range(len(yn))), abs=1e-4)
    assert max(seen_t) > 0                        # an EOS inside y+, not only at its start


# ---------------------------------------------------------------------------------------------------
# Held-out prompts are never trained on
# ---------------------------------------------------------------------------------------------------


def test_held_out_prompts_never_trained_on(tiny_llama_dir, small_jsonl, tmp_path, monkeypatch):
    held = {}
    real_eval = sapo.evaluate

    def evaluate(policy, eval_tuples, *a, **k):
        held.setdefault("prompts", [tuple(t["prompt_ids"]) for t in eval_tuples])
        return real_eval(policy, eval_tuples, *a, **k)
    monkeypatch.setattr(sapo, "evaluate", evaluate)
    out = tmp_path / "o"
    # 24 rows, 4 held out, 20 trained: 5 steps of 4 prompts is exactly one epoch
    summary = sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, out, max_steps=5, batch_size=4, eval_size=4, num_samples=100))
    _, tok = load(tiny_llama_dir)
    all_prompts = {tuple(sapo.encode_prompt(tok, [{"role": "user", "content": r["prompt"]}])) for r in read_jsonl(small_jsonl)}
    eval_prompts = set(held["prompts"])
    assert summary["n_eval"] == 4 and len(eval_prompts) == 4 and eval_prompts <= all_prompts
    items = json.loads((ckpt(out) / "state.json").read_text())["buffer"]["items"]
    trained = {tuple(it["prompt_ids"]) for it in items}
    assert len(items) == 20 and trained == all_prompts - eval_prompts        # every other prompt, once
    sample_prompts = {s["prompt"] for s in read_jsonl(out / "samples.jsonl")}
    assert len(sample_prompts) == 20 and not sample_prompts & {tok.decode(list(p)) for p in eval_prompts}


# ---------------------------------------------------------------------------------------------------
# ORPO's NLL: chosen response tokens only, prompt and padding masked
# ---------------------------------------------------------------------------------------------------


def test_orpo_nll_masks_prompt_and_padding(tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    model.eval()
    V, pad = model.config.vocab_size, tok.pad_token_id
    rng = random.Random(0)
    r = lambda n: [rng.randrange(3, V) for _ in range(n)]  # noqa: E731
    y1, y2 = r(3), r(9)
    batch = [{"prompt_ids": r(7), "chosen_ids": y1, "rejected_ids": y1[:1] + r(4)},     # short y+: padded in two rows
             {"prompt_ids": r(2), "chosen_ids": y2, "rejected_ids": y2[:5] + r(2)}]
    cfg = sapo.Config(orpo_lambda=0.05)
    with torch.no_grad():
        loss, m = sapo.batch_loss("orpo", cfg, model, None, batch, pad, "cpu", sapo.ops_for(cfg, "cpu"))

    def sums(x, y):   # one unpadded row, full logits, log_softmax, response tokens by hand
        lp = torch.log_softmax(model(input_ids=torch.tensor([x + y])).logits[0].double(), -1)
        resp = sum(lp[len(x) - 1 + j, y[j]].item() for j in range(len(y)))
        prompt = sum(lp[j - 1, x[j]].item() for j in range(1, len(x)))
        return resp, prompt
    with torch.no_grad():
        pos = [sums(b["prompt_ids"], b["chosen_ids"]) for b in batch]
        neg = [sums(b["prompt_ids"], b["rejected_ids"])[0] for b in batch]
    n_tokens = sum(len(b["chosen_ids"]) for b in batch)
    nll = -sum(p for p, _ in pos) / n_tokens
    assert m["nll_loss"] == pytest.approx(nll, abs=1e-5)
    # the authors' NLL (prompt tokens too) would be a different number: masking is observable here
    with_prompt = -sum(p + q for p, q in pos) / (n_tokens + sum(len(b["prompt_ids"]) - 1 for b in batch))
    assert abs(with_prompt - nll) > 1e-3
    avg_pos = [p / len(b["chosen_ids"]) for (p, _), b in zip(pos, batch)]
    avg_neg = [n / len(b["rejected_ids"]) for n, b in zip(neg, batch)]
    log_odds = [(a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b))) for a, b in zip(avg_pos, avg_neg)]
    expected = nll - 0.05 * sum(-math.log1p(math.exp(-z)) for z in log_odds) / len(log_odds)
    assert loss.item() == pytest.approx(expected, abs=1e-5) and m["loss"] == pytest.approx(expected, abs=1e-5)
    assert m["log_odds_chosen"] == pytest.approx(sum(log_odds) / 2, abs=1e-4)


# ---------------------------------------------------------------------------------------------------
# Buffer sample counts across a resume
# ---------------------------------------------------------------------------------------------------


def test_buffer_counts_survive_a_resume(tiny_llama_dir, small_jsonl, tmp_path):
    kw = dict(schedule="constant", warmup_ratio=0.0, save_steps=2, keep_checkpoints=3, segment_len=4)
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "full", max_steps=5, **kw))
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "part", max_steps=3, **kw))     # checkpoints 2, 3
    assert [c.name for c in sorted((tmp_path / "part" / "checkpoints").glob("step-*"))] == ["step-00000002", "step-00000003"]
    shutil.rmtree(tmp_path / "part" / "final")
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "part", max_steps=5, resume=True, **kw))
    full = json.loads((ckpt(tmp_path / "full") / "state.json").read_text())["buffer"]["items"]
    part = json.loads((ckpt(tmp_path / "part") / "state.json").read_text())["buffer"]["items"]
    counts = [it["times_sampled"] for it in full]
    assert len(full) == 10 and sum(counts) == 10 and max(counts) > 0
    assert [it["times_sampled"] for it in part] == counts
    assert [(it["prompt_ids"], it["rejected_ids"]) for it in part] == [(it["prompt_ids"], it["rejected_ids"]) for it in full]
    # the checkpoint the run resumed from held its 6 draws (the authors keyed counts by object id: reset to 0)
    mid = json.loads((tmp_path / "part" / "checkpoints" / "step-00000003" / "state.json").read_text())["buffer"]["items"]
    assert sum(it["times_sampled"] for it in mid) == 6


# ---------------------------------------------------------------------------------------------------
# check_config: every branch, the flag named
# ---------------------------------------------------------------------------------------------------

BAD_CONFIGS = [(dict(batch_size=0), "--batch-size"), (dict(grad_accum=0), "--grad-accum"), (dict(segment_len=0), "--segment-len"),
               (dict(buffer_capacity=0), "--buffer-capacity"), (dict(max_length=0), "--max-length"),
               (dict(max_prompt_length=0), "--max-prompt-length"), (dict(log_every=0), "--log-every"),
               (dict(spin_iterations=0), "--spin-iterations"), (dict(eval_size=0), "--eval-size"),
               (dict(keep_checkpoints=0), "--keep-checkpoints"), (dict(ema_decay=-0.01), "--ema-decay"),
               (dict(ema_decay=1.01), "--ema-decay"), (dict(max_steps=-1), "--max-steps"), (dict(lr=0.0), "--lr"),
               (dict(lr=-1e-5), "--lr"), (dict(temperature=0.0), "--temperature"),
               (dict(max_prompt_length=512, max_length=512), "--max-prompt-length"),
               (dict(max_prompt_length=600, max_length=512), "--max-length"), (dict(save_steps=-2), "--save-steps")]


@pytest.mark.parametrize("kw,flag", BAD_CONFIGS, ids=[f"{k}={v}" for kw, _ in BAD_CONFIGS for k, v in list(kw.items())[:1]])
def test_check_config_names_the_flag(kw, flag):
    with pytest.raises(sapo_utils.errors.UserError) as e:
        sapo_utils.cli.check_config(sapo.Config(**kw))
    assert flag in str(e.value) and "\n" not in str(e.value)


def test_check_config_accepts_the_edges(tmp_path, tiny_llama_dir, capsys):
    for kw in (dict(), dict(ema_decay=0.0), dict(ema_decay=1.0), dict(max_steps=0), dict(save_steps=-1),
               dict(max_prompt_length=511, max_length=512), dict(batch_size=1, grad_accum=1, eval_size=1, keep_checkpoints=1)):
        sapo_utils.cli.check_config(sapo.Config(**kw))
    # and through the CLI: exit code 2, one line, the flag named
    assert sapo.main(["--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "o"), "--ema-decay", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ema-decay" in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_checkpoint_folder_loads_as_a_model(tiny_llama_dir, small_jsonl, tmp_path):
    """--model runs/x/checkpoints/step-N: the step's policy weights over the model the run started from, for
    training, --eval-only or a new run; a checkpoint that does not verify is a one-line error."""
    seen = {}
    out = tmp_path / "o"
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, out, max_steps=2, save_steps=1, keep_checkpoints=2),
               on_step=lambda step, policy, m: seen.update({step: {k: v.clone() for k, v in policy.state_dict().items()}}))
    step1 = out / "checkpoints" / "step-00000001"
    model = sapo_utils.models.load_model(str(step1))
    assert all(torch.equal(v, seen[1][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, seen[2][k]) for k, v in model.state_dict().items())
    assert sapo_utils.models.load_tokenizer(str(step1)).eos_token_id is not None
    (step1 / "policy.safetensors").write_bytes(b"broken")
    with pytest.raises(sapo_utils.errors.UserError, match="does not verify"):
        sapo_utils.models.load_model(str(step1))
