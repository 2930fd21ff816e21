"""Tests for sapo.py: the math by hand, the invariants of each piece, and short real runs."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_jsonl

import sapo
import sapo_utils.checkpoints
import sapo_utils.data
import sapo_utils.errors
import sapo_utils.models

# ---------------------------------------------------------------------------------------------------
# Losses, computed by hand
# ---------------------------------------------------------------------------------------------------


def test_dpo_loss_by_hand():
    """pi(y+) = -10, pi(y-) = -12, ref(y+) = ref(y-) = -11, beta = 0.1:
    r+ = 0.1 * (-10 + 11) = 0.1, r- = 0.1 * (-12 + 11) = -0.1, loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139."""
    loss, r_pos, r_neg = sapo.dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                                       torch.tensor([-11.0]), beta=0.1)
    assert r_pos.item() == pytest.approx(0.1) and r_neg.item() == pytest.approx(-0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)


def test_dpo_loss_is_batch_mean_and_zero_margin_is_log2():
    loss, _, _ = sapo.dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    two, _, _ = sapo.dpo_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -5.0]), torch.tensor([-11.0, -5.0]),
                              torch.tensor([-11.0, -5.0]), beta=0.1)
    assert two.item() == pytest.approx((0.598139 + math.log(2)) / 2, abs=1e-6)


def test_orpo_loss_by_hand():
    """lp+ = log 0.5 -> odds 1, log odds 0; lp- = log 0.2 -> odds 0.25, log odds -1.386294.
    log_odds = 1.386294; log sigmoid(1.386294) = -log(1 + 0.25) = -0.223144;
    loss = NLL + lambda * 0.223144 = 2.0 + 0.05 * 0.223144 = 2.0111572."""
    loss, log_odds, r_pos, r_neg = sapo.orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]),
                                                  torch.tensor(2.0), lam=0.05)
    assert log_odds.item() == pytest.approx(math.log(4), abs=1e-6)
    assert loss.item() == pytest.approx(2.0 + 0.05 * math.log(1.25), abs=1e-6)
    assert r_pos.item() == pytest.approx(0.05 * math.log(0.5))


def test_log1mexp_stable_at_both_ends():
    x = torch.tensor([-1e-10, -1e-3, -0.5, -math.log(2), -1.0, -10.0, -50.0, -200.0], requires_grad=True)
    y = sapo.log1mexp(x)
    import mpmath   # a requirement (requirements.txt): the exact reference must not be skipped silently
    mpmath.mp.dps = 50
    exact = torch.tensor([float(mpmath.log(1 - mpmath.exp(mpmath.mpf(v)))) for v in x.tolist()], dtype=torch.float64)
    assert torch.isfinite(y).all()
    assert torch.allclose(y.double(), exact, rtol=1e-5, atol=0)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # the naive formula loses everything near 0 in float32: log1p(-exp(-1e-10)) = log1p(-1) = -inf
    assert torch.isinf(torch.log1p(-torch.exp(torch.tensor(-1e-10))))


# ---------------------------------------------------------------------------------------------------
# Log-probs: masking, sum vs mean, the head-only path
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tok = sapo_utils.models.load_model_and_tokenizer(str(tiny_llama_dir))
    return model.eval(), tok


def reference_logp(model, x, y):
    """The plain computation: full logits, log_softmax, sum over the response tokens only."""
    ids = torch.tensor([x + y])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    return sum(logp[len(x) - 1 + j, y[j]].item() for j in range(len(y)))


def test_sequence_logps_masks_prompt_and_padding(llama):
    model, tok = llama
    x1, y1 = [5, 6, 7, 8], [9, 10, 11]
    x2, y2 = [12, 13], [14, 15, 16, 17, 18, 19, 20, 21]   # longer: row 1 gets right padding
    with torch.no_grad():
        logps, counts = sapo.sequence_logps(model, **sapo.collate([(x1, y1), (x2, y2)], tok.pad_token_id, "cpu"))
        alone, _ = sapo.sequence_logps(model, **sapo.collate([(x1, y1)], tok.pad_token_id, "cpu"))
        other_pad, _ = sapo.sequence_logps(model, **sapo.collate([(x1, y1), (x2, y2)], 3, "cpu"))
    assert counts.tolist() == [3, 8]                       # response tokens only: sum vs mean uses these
    assert logps[0].item() == pytest.approx(reference_logp(model, x1, y1), abs=1e-4)
    assert logps[1].item() == pytest.approx(reference_logp(model, x2, y2), abs=1e-4)
    assert logps[0].item() == pytest.approx(alone[0].item(), abs=1e-5)      # padding never counts
    assert torch.allclose(logps, other_pad, atol=1e-5)                       # nor does the pad token's id


def test_prompt_tokens_are_context_not_targets(llama):
    """Changing the last prompt token changes the context, but the count of scored tokens stays |y|."""
    model, tok = llama
    batch = sapo.collate([([5, 6, 7], [9, 10]), ([5, 6, 8], [9, 10])], tok.pad_token_id, "cpu")
    assert batch["loss_mask"].sum(-1).tolist() == [2, 2]
    assert batch["loss_mask"][0].tolist() == [False, False, False, True, True]


# ---------------------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------------------


def test_ema_update_formula():
    policy, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = [p.detach().clone() for p in ema.parameters()]
    sapo.ema_update(ema, policy, decay=0.5)
    for p_e, p_old, p in zip(ema.parameters(), old, policy.parameters()):
        assert torch.allclose(p_e, 0.5 * p_old + 0.5 * p)
    before = [p.detach().clone() for p in ema.parameters()]
    sapo.ema_update(ema, policy, decay=0.9)
    for p_e, p_old, p in zip(ema.parameters(), before, policy.parameters()):
        assert torch.allclose(p_e, 0.9 * p_old + 0.1 * p)
    sapo.ema_update(ema, policy, decay=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), policy.parameters()))


# ---------------------------------------------------------------------------------------------------
# Truncation and segment regeneration
# ---------------------------------------------------------------------------------------------------


def test_truncation_point_range_and_short_responses():
    rng = random.Random(0)
    for _ in range(2000):
        n, G0, x_len = rng.randint(1, 120), rng.randint(1, 40), rng.randint(1, 50)
        max_len = x_len + n + rng.randint(0, 20)
        t, G = sapo.truncation_point(n, x_len, G0, max_len, rng)
        assert G == min(G0, n)
        hi = min(n - 3 - G, max_len - x_len - G)
        if hi <= 0:
            assert t == 0                                   # short responses regenerate from 0 (SPIN-like)
        else:
            assert 0 <= t <= hi and x_len + t + G <= max_len
    seen = {sapo.truncation_point(100, 10, 20, 1000, rng)[0] for _ in range(3000)}
    assert seen == set(range(0, 78))                        # uniform over {0 .. |y+| - 3 - G}


def test_splice_negative_keeps_suffix_or_stops_at_eos():
    y_pos = list(range(100, 120))                           # 20 tokens
    y_neg, kept = sapo.splice_negative(y_pos, t=5, G=4, segment=[1, 2, 3, 4, 7, 7], stop_ids=[0])
    assert y_neg == y_pos[:5] + [1, 2, 3, 4] + y_pos[9:] and kept == 4 and len(y_neg) == len(y_pos)
    y_neg, kept = sapo.splice_negative(y_pos, t=5, G=4, segment=[1, 0, 3, 4], stop_ids=[0])
    assert y_neg == y_pos[:5] + [1, 0] and kept == 2       # EOS kept, nothing after it, no suffix


def test_make_negatives_invariants(llama):
    model, tok = llama
    rng = random.Random(0)
    stop = sapo_utils.models.stop_token_ids(model, tok)
    examples = [sapo.Example([5, 6, 7, 8][: 2 + i % 3], [20 + (j * 7 + i) % 300 for j in range(n)] + [tok.eos_token_id])
                for i, n in enumerate([2, 5, 30, 40, 60, 80])]
    torch.manual_seed(0)
    for _ in range(3):
        tuples = sapo.make_negatives(model, examples, 8, 256, rng, tok.pad_token_id, stop,
                                     sapo.segment_sampling(1.5, 50, 0.95))
        for e, tpl in zip(examples, tuples):
            y_pos, y_neg, t, k = e.chosen_ids, tpl["rejected_ids"], tpl["t"], tpl["segment_len"]
            assert tpl["chosen_ids"] == y_pos                        # y+ is never truncated
            assert y_neg[:t] == y_pos[:t]                           # starts with the chosen prefix
            segment = y_neg[t: t + k]
            if any(s in stop for s in segment):
                assert segment[-1] in stop and len(y_neg) == t + k   # nothing after the EOS
            else:
                G = min(8, len(y_pos))
                assert k == G and y_neg[t + k:] == y_pos[t + G:]     # the exact original suffix
            if len(y_pos) - 3 - min(8, len(y_pos)) <= 0:
                assert t == 0


# ---------------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------------


def item(i, n=0):
    return {"id": i, "times_sampled": n}


def test_buffer_fifo_eviction():
    buf = sapo.ReplayBuffer(capacity=3)
    buf.push([item(0), item(1)])
    buf.push([item(2), item(3), item(4)])
    assert [x["id"] for x in buf.items] == [2, 3, 4] and len(buf) == 3


def test_buffer_weighted_sampling():
    buf = sapo.ReplayBuffer(capacity=10)
    buf.push([item(0, 0), item(1, 1), item(2, 3)])
    assert buf.weights() == [1.0, 0.5, 0.25]
    rng = random.Random(0)
    counts = [0, 0, 0]
    for _ in range(20000):
        for x in buf.items:
            x["times_sampled"] = {0: 0, 1: 1, 2: 3}[x["id"]]      # hold the weights fixed
        counts[buf.sample(1, rng)[0]["id"]] += 1
    freqs = [c / 20000 for c in counts]
    for f, w in zip(freqs, [1 / 1.75, 0.5 / 1.75, 0.25 / 1.75]):
        assert f == pytest.approx(w, abs=0.015)
    before = sum(x["times_sampled"] for x in buf.items)
    buf.sample(4, rng)
    assert sum(x["times_sampled"] for x in buf.items) == before + 4    # counts go up by one per pick


def test_buffer_uniform_and_state_roundtrip():
    buf = sapo.ReplayBuffer(capacity=4, sampling="uniform")
    buf.push([item(i, i) for i in range(4)])
    assert buf.weights() == [1.0] * 4
    other = sapo.ReplayBuffer(capacity=4, sampling="uniform")
    other.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert list(other.items) == list(buf.items)
    other.push([item(9)])
    assert [x["id"] for x in other.items] == [1, 2, 3, 9]


# ---------------------------------------------------------------------------------------------------
# Data formats
# ---------------------------------------------------------------------------------------------------


def test_row_formats():
    p, c, r = sapo_utils.data.parse_row({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"}, "f:1")
    assert p == [{"role": "user", "content": "Hi"}] and c == "Hello" and r == "Go away"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"},
            {"role": "assistant", "content": "B."}, {"role": "user", "content": "C?"}, {"role": "assistant", "content": "D."}]
    p, c, r = sapo_utils.data.parse_row({"messages": msgs}, "f:2")
    assert p == msgs[:-1] and c == "D." and r is None
    p, c, r = sapo_utils.data.parse_row({"prompt": msgs[:2], "chosen": [{"role": "assistant", "content": "B."}]}, "f:3")
    assert p == msgs[:2] and c == "B."
    # capybara-style: `prompt` is the first user turn only, `chosen`/`rejected` are whole conversations
    p, c, r = sapo_utils.data.parse_row({"prompt": "A?", "chosen": msgs[1:], "rejected": msgs[1:4] + [{"role": "assistant", "content": "E."}]}, "f:4")
    assert p == msgs[1:4] and c == "D." and r == "E."


def test_multi_turn_prompt_holds_every_turn(llama):
    _, tok = llama
    msgs = [{"role": "user", "content": "tea?"}, {"role": "assistant", "content": "hot water."},
            {"role": "user", "content": "magnet?"}]
    text = tok.decode(sapo.encode_prompt(tok, msgs))
    assert text.count("<|im_start|>") == 4 and text.endswith("<|im_start|>assistant\n") and "hot water." in text
    assert sapo.encode_response(tok, "tea")[-1] == tok.eos_token_id


def test_plain_format_without_chat_template(tiny_gpt2_dir):
    _, tok = sapo_utils.models.load_model_and_tokenizer(str(tiny_gpt2_dir))
    assert tok.pad_token_id == tok.eos_token_id                  # gpt2-like: pad token added
    x = sapo.encode_prompt(tok, [{"role": "user", "content": "tea?"}])
    assert tok.decode(x) == "User: tea?\n\nAssistant:"
    assert tok.decode(sapo.encode_response(tok, "Hot water.")) == " Hot water.<|endoftext|>"


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, naming file, line and field; exit code 2; no output folder
# ---------------------------------------------------------------------------------------------------

BAD_ROWS = {
    "malformed_json": (['{"prompt": "a", "chosen": "b"}', '{"prompt": "a", "chosen": '], ":2: invalid JSON"),
    "missing_field": ([{"prompt": "a", "chosen": "b"}, {"prompt": "a"}], ":2: field 'chosen' is missing"),
    "empty_field": ([{"prompt": "a", "chosen": "  "}], ":1: field 'chosen' is empty"),
    "wrong_type": ([{"prompt": 3, "chosen": "b"}], ":1: field 'prompt' must be a string"),
    "not_object": (["[1, 2]"], ":1: expected a JSON object"),
    "bad_messages": ([{"messages": [{"role": "user", "content": "a"}]}], ":1: field 'messages' must end with an assistant"),
    "bad_message_item": ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}], ":1: field 'messages[0]'"),
    "too_long": ([{"prompt": "tea " * 400, "chosen": "b"}], "no usable examples"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_give_one_line_errors(case, tmp_path, tiny_llama_dir, capsys):
    rows, expected = BAD_ROWS[case]
    data = write_jsonl(tmp_path / f"{case}.jsonl", rows)
    out = tmp_path / "out"
    code = sapo.main(["--model", str(tiny_llama_dir), "--dataset", str(data), "--output-dir", str(out),
                      "--max-length", "64", "--max-prompt-length", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert str(data) in err or case == "too_long"
    assert not out.exists()                                    # nothing half-written


def test_bad_files_and_models(tmp_path, tiny_llama_dir, capsys):
    bin_file = tmp_path / "bytes.jsonl"
    bin_file.write_bytes(b'{"prompt": "a", "chosen": "b"}\n\xff\xfe\x00garbage\n')
    cases = [(["--dataset", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such file"),
             (["--dataset", str(bin_file)], "bytes.jsonl:2: not UTF-8"),
             (["--model", str(tmp_path)], "model '"),
             (["--batch-size", "0"], "--batch-size must be >= 1")]
    for args, expected in cases:
        argv = ["--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "o")] + args
        assert sapo.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err


def test_some_long_examples_are_skipped_and_counted(tmp_path, tiny_llama_dir, capsys):
    rows = [{"prompt": "tea " * 100, "chosen": "b"}] + [{"prompt": f"tea {i}?", "chosen": "hot water."} for i in range(10)]
    _, tok = sapo_utils.models.load_model_and_tokenizer(str(tiny_llama_dir))
    ex = sapo.load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), tok, max_length=64, max_prompt_length=32)
    assert len(ex) == 10 and "skipped 1 prompts longer than --max-prompt-length=32" in capsys.readouterr().out


def test_cli_errors_exit_2_without_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in (["--model", "no-such-org/no-such-model"], ["--dataset", str(tmp_path / "nope.jsonl")]):
        p = subprocess.run([sys.executable, str(ROOT / "sapo.py"), "--output-dir", str(tmp_path / "o"), *args],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 2 and "Traceback" not in p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("error: ")


def test_output_dir_is_not_overwritten(tmp_path, tiny_llama_dir, small_jsonl, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert sapo.main(["--model", str(tiny_llama_dir), "--dataset", str(small_jsonl), "--output-dir", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------------
# Runs on tiny models: parameters change, outputs load back, every method of the one loop runs
# ---------------------------------------------------------------------------------------------------


def tiny_cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), dataset=str(data), output_dir=str(out), max_steps=3, batch_size=2, lr=1e-3,
                segment_len=6, eval_size=2, save_steps=0, log_every=100)
    return sapo.Config(**{**base, **kw})


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_gpt2_dir"])
@pytest.mark.parametrize("method", ["sapo-dpo", "sapo-orpo"])
def test_tiny_run_changes_parameters_and_loads_back(which, method, request, small_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM
    model_dir = request.getfixturevalue(which)
    start = AutoModelForCausalLM.from_pretrained(model_dir)
    summary = sapo.train(tiny_cfg(model_dir, small_jsonl, tmp_path / "out", method=method))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    changed = [not torch.equal(a, b) for a, b in zip(start.parameters(), final.parameters())]
    assert sum(changed) > len(changed) // 2
    metrics = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "buffer/size", "gen/tokens_per_s"):
        assert math.isfinite(metrics[-1][key]), key
    assert [m["buffer/size"] for m in metrics] == [2, 4, 6]
    samples = [json.loads(l) for l in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert samples
    for s in samples:                      # y- = y+[:t] + [[segment]] + suffix, and the marks sit where t says
        head, rest = s["rejected_marked"].split("[[", 1)
        segment, tail = rest.rsplit("]]", 1)
        assert s["segment_tokens"] >= 1 and segment and head + segment + tail == s["rejected"]
        assert s["chosen"].startswith(head) and (s["t"] == 0) == (head == "")
    assert summary["before"] and summary["after"]


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo", "spin"])
def test_baselines_are_configurations_of_the_loop(method, tiny_llama_dir, tmp_path):
    rows = [{"prompt": f"tea {i}?", "chosen": "Pour hot water on the leaves.", "rejected": "No."} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    sapo.train(tiny_cfg(tiny_llama_dir, data, tmp_path / "out", method=method, max_steps=4, spin_iterations=2))
    metrics = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(m["buffer/size"] == 0 for m in metrics)   # offline: no replay buffer
    samples = [json.loads(l) for l in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    if method in ("dpo", "orpo"):
        assert all(s["rejected"] == "No." for s in samples)                       # the dataset's own y-
    if method == "spin":
        assert samples and all(s["t"] == 0 and s["rejected_marked"].startswith("[[") for s in samples)


def test_offline_methods_need_rejected(tiny_llama_dir, small_jsonl, tmp_path):
    with pytest.raises(sapo_utils.errors.UserError, match="needs a 'rejected'"):
        sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, tmp_path / "out", method="dpo"))


# ---------------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------------


def final_state(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "final" / "model.safetensors"))


@pytest.mark.parametrize("method", ["sapo-dpo", "spin"])
def test_resume_is_bit_exact(method, tiny_llama_dir, small_jsonl, tmp_path):
    rows = [{"prompt": f"tea {i}?", "chosen": "Pour hot water on the leaves, then wait.", "rejected": "No."} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    kw = dict(max_steps=6, save_steps=2, keep_checkpoints=2, ref_update_steps=3, method=method, spin_iterations=2)
    sapo.train(tiny_cfg(tiny_llama_dir, data, tmp_path / "full", **kw))
    sapo.train(tiny_cfg(tiny_llama_dir, data, tmp_path / "part", **{**kw, "max_steps": 6, "save_steps": 2}))
    # simulate a kill after step 4: drop the newest checkpoint and the final output, then resume
    part = tmp_path / "part"
    ckpts = sorted((part / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000004", "step-00000006"]
    import shutil
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(part / "final")
    sapo.train(tiny_cfg(tiny_llama_dir, data, part, resume=True, **kw))
    a, b = final_state(tmp_path / "full"), final_state(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_m = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_m = (part / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if not k.startswith(("time/", "gen/"))} for l in lines]  # noqa
    assert strip(full_m) == strip(part_m)


def test_corrupt_checkpoint_is_skipped(tiny_llama_dir, small_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    sapo.train(tiny_cfg(tiny_llama_dir, small_jsonl, out, max_steps=4, save_steps=2, keep_checkpoints=2))
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    with open(newest / "policy.safetensors", "r+b") as fh:
        fh.truncate(100)
    assert sapo_utils.checkpoints.latest_checkpoint(out / "checkpoints").name == "step-00000002"
    assert "does not match its manifest" in capsys.readouterr().out
    assert sapo_utils.checkpoints.verify_checkpoint(newest) is not None


# ---------------------------------------------------------------------------------------------------
# The real default model (bundled SmolLM2-135M-Instruct), one short run through the CLI
# ---------------------------------------------------------------------------------------------------


def test_real_default_model_short_run(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "sapo.py"), "--output-dir", str(out), "--max-steps", "2",
                        "--batch-size", "2", "--eval-size", "2", "--segment-len", "8"],
                       capture_output=True, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "eval/preference_accuracy" in p.stdout and "before" in p.stdout
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    # real chat-formatted negatives: the prompt is ChatML and the rejected text is real decoded text
    s = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    head, rest = s["rejected_marked"].split("[[", 1)
    assert s["prompt"].startswith("<|im_start|>") and s["rejected"] != s["chosen"]
    assert s["chosen"].startswith(head) and rest.split("]]", 1)[0]   # y+[:t], then a non-empty regenerated segment
