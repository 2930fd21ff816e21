"""Reliability: a SIGKILLed run resumes bit-exactly, non-finite steps are handled, and no input crashes the loader."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, write_jsonl

import sapo
import sapo_utils.checkpoints
import sapo_utils.errors
import sapo_utils.models

ROWS = [{"prompt": f"How do I brew tea number {i}?", "chosen": "Pour hot water over the leaves, wait three minutes, "
         "then remove them."} for i in range(16)]


def run_cli(args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "sapo.py"), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_llama_dir):
    """Kill a real run with SIGKILL at a random step (possibly mid-checkpoint), resume it, compare weights bit for bit."""
    from safetensors.torch import load_file
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    common = ["--model", tiny_llama_dir, "--dataset", data, "--max-steps", 10, "--batch-size", 2, "--lr", 1e-3,
              "--segment-len", 6, "--eval-size", 2, "--save-steps", 1, "--keep-checkpoints", 2, "--ref-update-steps", 3]
    full = run_cli(common + ["--output-dir", tmp_path / "full"])
    assert full.wait(timeout=600) == 0, full.stderr.read()
    kill_after = random.Random(os.getpid()).randint(2, 7)
    part = run_cli(common + ["--output-dir", tmp_path / "part"])
    ckpts = tmp_path / "part" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpts / f"step-{kill_after:08d}").exists():
        assert part.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    part.send_signal(signal.SIGKILL)
    part.wait()
    assert not (tmp_path / "part" / "final").exists()
    resumed = run_cli(common + ["--output-dir", tmp_path / "part", "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))                       # no step lost, none logged twice


def nan_on_step(monkeypatch, bad_call):
    calls = {"n": 0}
    real = sapo.batch_loss

    def flaky(*args, **kw):
        loss, m = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == bad_call:
            loss = loss * float("nan")
            m = {**m, "loss": float("nan")}
        return loss, m
    monkeypatch.setattr(sapo, "batch_loss", flaky)


def test_nonfinite_step_is_skipped(monkeypatch, tmp_path, tiny_llama_dir):
    nan_on_step(monkeypatch, 2)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = sapo.Config(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / "o"), max_steps=3,
                      batch_size=2, lr=1e-3, segment_len=6, eval_size=2, save_steps=0)
    sapo.train(cfg)
    metrics = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [m["nonfinite/skipped"] for m in metrics] == [0, 1, 1]
    final = sapo_utils.models.load_model(str(tmp_path / "o" / "final"))
    assert all(torch.isfinite(p).all() for p in final.parameters())


def test_nonfinite_step_can_stop(monkeypatch, tmp_path, tiny_llama_dir):
    nan_on_step(monkeypatch, 2)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    cfg = sapo.Config(model=str(tiny_llama_dir), dataset=str(data), output_dir=str(tmp_path / "o"), max_steps=3,
                      batch_size=2, segment_len=6, eval_size=2, save_steps=1, on_nonfinite="stop")
    with pytest.raises(sapo_utils.errors.UserError, match="non-finite loss or gradient at step 2"):
        sapo.train(cfg)
    assert sapo_utils.checkpoints.latest_checkpoint(tmp_path / "o" / "checkpoints").name == "step-00000001"
    assert not (tmp_path / "o" / "final").exists()


def test_nan_weights_are_never_saved(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(sapo_utils.errors.UserError, match="NaN/inf"):
        sapo_utils.checkpoints.save_checkpoint(tmp_path, 1, {"policy": model}, {}, {}, keep=1)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# The loader never crashes: any JSON structure or byte string is a clean load, a counted skip, or a UserError
# ---------------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
row_like = st.fixed_dictionaries({}, optional={
    "prompt": json_values | st.text(max_size=30), "chosen": json_values | st.text(max_size=30),
    "rejected": json_values | st.text(max_size=30),
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system", 3]),
                                                            "content": json_values | st.text(max_size=20)}), max_size=4)})


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return sapo_utils.models.load_tokenizer(str(tiny_llama_dir))


def load_or_user_error(path, tok):
    try:
        examples = sapo.load_examples(str(path), tok, max_length=128, max_prompt_length=64, verbose=False)
        assert examples and all(e.chosen_ids[-1] == tok.eos_token_id for e in examples)
    except sapo_utils.errors.UserError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row_like | json_values, min_size=0, max_size=5))
def test_random_json_rows(rows, tok, tmp_path):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    load_or_user_error(path, tok)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=300))
def test_random_bytes(blob, tok, tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(blob)
    load_or_user_error(path, tok)


# ---------------------------------------------------------------------------------------------------
# Models that cannot be trained give one-line errors
# ---------------------------------------------------------------------------------------------------


def test_non_causal_model_and_tokenizer_without_eos(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=400, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(bert)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bert)
    with pytest.raises(sapo_utils.errors.UserError, match="model '.*bert'"):
        sapo_utils.models.load_model(str(bert))
    no_eos = tmp_path / "no_eos"
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.eos_token, tok.pad_token = None, None
    tok.save_pretrained(no_eos)
    with pytest.raises(sapo_utils.errors.UserError, match="no EOS token"):
        sapo_utils.models.load_tokenizer(str(no_eos))
