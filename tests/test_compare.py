"""bench/compare.py: the --quick table runs end to end (CI keeps the script working), its numbers are the ones
sapo.evaluate_model gives, and evaluating the policy during training (the curve) leaves the training unchanged."""
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sapo  # noqa: E402
import tasks.ifeval_lite  # noqa: E402
from bench import compare  # noqa: E402


def run_quick(tmp: Path, *extra):
    cmd = [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--work-dir", str(tmp / "work"),
           "--out", str(tmp / "out"), "--keep-models", *extra]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    p = run_quick(tmp)
    return {"tmp": tmp, "stdout": p.stdout,
            "results": json.loads((tmp / "out" / "results.json").read_text())}


def test_quick_table_has_every_method_with_finite_metrics(quick):
    res = quick["results"]
    assert quick["stdout"].startswith("command: python bench/compare.py --quick")
    assert set(res["summary"]) == set(compare.METHODS)
    assert sorted((r["method"], r["seed"]) for r in res["runs"]) == sorted((m, 0) for m in compare.METHODS)
    for ev in [res["stage1"]["base"], res["stage1"]["sft"]] + [r["final"] for r in res["runs"]]:
        assert ev["n"] == 8
        assert all(math.isfinite(ev[k]) for k in compare.METRICS)
        assert 0 <= ev["prompt_strict_acc"] <= 1 and 0 <= ev["instruction_loose_acc"] <= 1 and 0 <= ev["pair_acc"] <= 1
    for m, d in res["summary"].items():
        assert all(math.isfinite(d[k]["mean"]) and d[k]["n"] == 1 for k in compare.METRICS), m
        assert d["train_min"]["mean"] > 0
    # every run trained: its held-out log-prob of y+ moved away from the shared SFT start
    sft_start = res["stage1"]["sft"]["logps_chosen_per_token"]
    for r in res["runs"]:
        assert abs(r["final"]["logps_chosen_per_token"] - sft_start) > 1e-4, r["method"]
        assert r["skipped_steps"] == 0
    # the curve: step 0 is the SFT model, then every step (--curve-every 1), the last is the final evaluation
    for r in res["runs"]:
        assert [p["step"] for p in r["curve"]] == [0, 1, 2, 3]
        assert r["curve"][0]["prompt_strict_acc"] == res["stage1"]["sft"]["prompt_strict_acc"]
        assert r["curve"][-1]["prompt_strict_acc"] == r["final"]["prompt_strict_acc"]   # curve size = eval size in --quick


def test_quick_writes_table_and_plot(quick):
    out = quick["tmp"] / "out"
    text = (out / "table.md").read_text()
    assert text.startswith("`python bench/compare.py --quick")
    for m in compare.METHODS:
        assert f"| {m} |" in text
    assert "| SFT start" in text and "| base model" in text
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 800 and height > 300


def test_quick_metrics_match_sapo_evaluate_model(quick, one_thread):
    """The in-memory evaluation is sapo.evaluate_model's (`python sapo.py --eval-only`), on the saved final model."""
    run = next(r for r in quick["results"]["runs"] if r["method"] == "sapo-dpo")
    cfg = sapo.Config(model=run["final_dir"], eval_size=8, eval_max_new_tokens=16, batch_size=16, device="cpu")
    ref = sapo.evaluate_model(cfg, tasks.ifeval_lite)
    assert ref["eval/prompt_strict_acc"] == run["final"]["prompt_strict_acc"]
    assert ref["eval/instruction_loose_acc"] == run["final"]["instruction_loose_acc"]
    assert ref["eval/logps_chosen_per_token"] == pytest.approx(run["final"]["logps_chosen_per_token"], abs=1e-4)


def test_quick_rerun_reuses_finished_runs_and_refuses_other_settings(quick, capsys, one_thread):
    tmp = quick["tmp"]
    assert compare.main(["--quick", "--work-dir", str(tmp / "work"), "--out", str(tmp / "out"), "--keep-models"]) == 0
    assert capsys.readouterr().out.count("reusing") == 1 + len(compare.METHODS)
    again = json.loads((tmp / "out" / "results.json").read_text())
    assert again["summary"] == quick["results"]["summary"]
    with pytest.raises(SystemExit, match="--fresh"):
        compare.main(["--quick", "--steps", "2", "--work-dir", str(tmp / "work"), "--out", str(tmp / "out2")])


def test_curve_evaluation_leaves_training_unchanged(quick, tmp_path, one_thread):
    """The curve evaluates the live policy from sapo.train's on_step hook; greedy decoding draws no random
    numbers, so the final weights are bit-identical with and without it; no checkpoint is written."""
    from safetensors.torch import load_file
    model = quick["tmp"] / "work" / "tiny-llama"
    files = compare.split_train(4, tmp_path / "data")
    heldout = compare.HeldOut(str(model), 4, 8)
    weights, curves = [], []
    for every in (1, 0):
        cfg = sapo.Config(model=str(model), dataset=str(files["pref"]), eval_dataset=str(files["stub"]), eval_size=1,
                          method="sapo-dpo", max_steps=3, batch_size=2, lr=1e-3, device="cpu", overwrite=True,
                          output_dir=str(tmp_path / f"every{every}"))
        r = compare.run(cfg, heldout, every, 4)
        weights.append(load_file(str(Path(r["final_dir"]) / "model.safetensors")))
        curves.append([p["step"] for p in r["curve"]])
        assert not (Path(cfg.output_dir) / "checkpoints").exists()     # --save-steps -1: nothing written
    assert curves == [[1, 2, 3], [3]]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
