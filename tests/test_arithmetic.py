"""Tests for tasks/arithmetic.py (data, scorer, tokenizer, model folder) and a bench/evidence.py --quick smoke run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import arithmetic as ar  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return ar.make_splits(seed=3, n_train=3000, n_heldout=300, n_test=500)


def problem(row):
    a, b = map(int, row["prompt"].rstrip("=").split("+"))
    return a, b


# ----------------------------------------------------------------------------- data


def test_generator_is_seeded(splits):
    assert ar.make_splits(seed=3, n_train=3000, n_heldout=300, n_test=500) == splits
    assert ar.make_splits(seed=4, n_train=3000, n_heldout=300, n_test=500)["test"] != splits["test"]


def test_splits_are_disjoint_problems(splits):
    """No problem (the unordered pair {a, b}) is in two splits, nor twice in one."""
    sets = {name: [frozenset(problem(r)) if problem(r)[0] != problem(r)[1] else frozenset([problem(r)[0]])
                   for r in rows] for name, rows in splits.items()}
    assert {k: len(v) for k, v in sets.items()} == {"train": 3000, "heldout": 300, "test": 500}
    for name, s in sets.items():
        assert len(set(s)) == len(s), f"{name} repeats a problem"
    assert not set(sets["train"]) & set(sets["heldout"])
    assert not set(sets["train"]) & set(sets["test"])
    assert not set(sets["heldout"]) & set(sets["test"])


def test_rows_are_correct_and_rejected_is_wrong(splits):
    kinds = set()
    for row in splits["train"] + splits["test"]:
        a, b = problem(row)
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert row["answer"] == str(a + b)
        assert row["chosen"].splitlines()[-1] == row["answer"]
        assert len(row["chosen"].splitlines()) == 4
        assert row["rejected"] != row["chosen"]
        assert ar.score([row["rejected"]], [row])["exact_match"] == 0.0
        assert ar.score([row["chosen"]], [row]) == {"exact_match": 1.0, "digit_acc": 1.0, "working_exact": 1.0}
        kinds.add(row["fault"].split(" at ")[0])
    assert kinds == set(ar.FAULTS)


def test_working_by_hand():
    assert ar.answer_text(347, 285) == "7+5=12\n4+8+1=13\n3+2+1=6\n632"
    assert ar.answer_text(947, 285) == "7+5=12\n4+8+1=13\n9+2+1=12\n1232"
    # a dropped carry into the tens: 4 + 8 = 12 instead of 13; the result's tens digit is one lower
    assert ar.answer_text(347, 285, fault=("drop_carry", 1, 0)) == "7+5=12\n4+8=12\n3+2+1=6\n622"
    assert ar.answer_text(347, 285, fault=("off_by_one", 0, 1)) == "7+5=13\n4+8+1=13\n3+2+1=6\n633"
    assert ar.prompt_text(347, 285) == "347+285="


def test_every_possible_fault_changes_the_result():
    for a, b in [(347, 285), (999, 999), (100, 100), (505, 495), (190, 810)]:
        faults = ar.possible_faults(a, b)
        assert faults
        for fault in faults:
            assert ar.column_steps(a, b, fault=fault)[1] != str(a + b), (a, b, fault)


def test_write_splits_round_trip(tmp_path):
    paths = ar.write_splits(tmp_path, seed=1, n_train=50, n_heldout=10, n_test=20)
    assert [len(ar.read_rows(paths[k])) for k in ("train", "heldout", "test")] == [50, 10, 20]
    assert ar.read_rows(paths["test"]) == ar.make_splits(1, 50, 10, 20)["test"]


# ----------------------------------------------------------------------------- scorer


def test_score_is_exact():
    rows = [{"answer": "632", "chosen": "7+5=12\n4+8+1=13\n3+2+1=6\n632"}, {"answer": "1232"}]
    assert ar.score(["7+5=12\n4+8+1=13\n3+2+1=6\n632", "1232"], rows) == {
        "exact_match": 1.0, "digit_acc": 1.0, "working_exact": 0.5}
    # the result line is the last non-empty line; trailing blank lines and spaces are ignored
    assert ar.score(["x\n632 \n\n", "1232"], rows)["exact_match"] == 1.0
    # one digit of four wrong: not an exact match, 3/4 of the digits
    per = ar.per_problem(["632", "1332"], rows)
    assert per["exact_match"] == [1.0, 0.0] and per["digit_acc"] == [1.0, 0.75]
    # digits align from the units: a dropped leading 1 keeps three digits right; junk scores nothing
    assert ar.per_problem(["", "232"], rows)["digit_acc"] == [0.0, 0.75]
    assert ar.per_problem(["63a", "12 32"], rows)["digit_acc"] == [0.0, 0.0]
    assert ar.score(["6320", "0632"], [rows[0], rows[0]])["exact_match"] == 0.0
    with pytest.raises(ValueError):
        ar.score(["1"], rows)


# ----------------------------------------------------------------------------- tokenizer and model


def test_tokenizer_round_trips_newlines_and_eos():
    tok = ar.make_tokenizer()
    text = "347+285=\n7+5=12\n4+8+1=13\n3+2+1=6\n632"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)                          # one token per character
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    with_eos = ids + [tok.eos_token_id]
    assert tok.decode(with_eos, skip_special_tokens=True) == text
    assert tok.decode(with_eos).endswith("</s>")
    assert tok.pad_token_id != tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "347+285="}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "347+285=\n"


def test_model_folder_loads_like_sapo_loads_it(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ar.make_model(tmp_path / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert 1e6 < ar.n_params(model) < 3e6
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    text = "7+5=12\n632"
    assert tok.decode(tok(text).input_ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.chat_template == ar.CHAT_TEMPLATE
    with torch.no_grad():
        logits = model(torch.tensor([tok("347+285=\n").input_ids])).logits
    assert logits.shape == (1, 9, len(tok))
    import sapo
    x = sapo.encode_prompt(sapo.load_tokenizer(str(tmp_path / "m")), [{"role": "user", "content": "347+285="}])
    y = sapo.encode_response(sapo.load_tokenizer(str(tmp_path / "m")), text)
    assert tok.decode(x) == "347+285=\n" and y[-1] == tok.eos_token_id and tok.decode(y[:-1]) == text


# ----------------------------------------------------------------------------- the evidence run, quick


def test_evidence_quick_runs(tmp_path):
    """bench/evidence.py --quick end to end: every method trains from the SFT start and is scored on the test split."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "evidence.py"), "--quick", "--out", str(tmp_path / "out"),
                           "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "evidence.json").read_text())
    methods = {r["method"] for r in result["runs"]}
    assert methods == set(result["protocol"]["methods"]) and "sft" in methods and "sapo-dpo" in methods
    for run in result["runs"]:
        assert 0.0 <= run["test"]["exact_match"] <= 1.0
        assert run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == result["protocol"]["steps"]
        assert run["budget"]["optimizer_steps"] == result["protocol"]["steps"]
        assert run["budget"]["prompts"] == result["protocol"]["steps"] * result["protocol"]["batch_size"]
    start = result["start"]["test"]["exact_match"]
    assert 0.0 <= start <= 1.0
    compared = [row for row in result["table"] if "vs_sft" in row]
    assert {row["method"] for row in compared} == methods - {"sft"}
    for row in compared:
        lo, hi = row["vs_sft"]["ci95"]
        assert lo <= row["vs_sft"]["diff"] <= hi
    assert any(n["rejected"] != n["chosen"] for n in result["negatives"])
    assert (tmp_path / "out" / "evidence.png").stat().st_size > 10_000
    assert "| method |" in (tmp_path / "out" / "evidence.md").read_text()


def test_scorable():
    assert ar.scorable({"answer": "632"}) and not ar.scorable({"prompt": "x"}) and not ar.scorable({"answer": 632})
