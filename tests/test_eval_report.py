"""What a run reports: held-out rewards against the starting model (TRL's names), --eval-steps, metrics.png,
--report-to tensorboard, and the printed summary."""
import builtins
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sapo
import sapo_utils.errors
import sapo_utils.models
import sapo_utils.report
from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
EVAL_KEYS = ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/rewards/accuracies",
             "eval/logps_chosen_per_token", "eval/logps_rejected_per_token", "eval/preference_accuracy",
             "eval/log_odds_chosen")


def cfg(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), dataset=str(data), output_dir=str(out), max_steps=4, batch_size=2, lr=5e-3,
                segment_len=6, eval_size=4, save_steps=0, log_every=100, eval_steps=2)
    return sapo.Config(**{**base, **kw})


@pytest.fixture
def rows_jsonl(tmp_path):
    rows = [{"prompt": f"Explain tea number {i}.", "chosen": f"Tea {i} is brewed by pouring hot water over leaves. "
             "Wait a few minutes and drink it."} for i in range(24)]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_heldout_rewards_against_the_start_model(tiny_llama_dir, rows_jsonl, tmp_path):
    out = tmp_path / "out"
    summary = sapo.train(cfg(tiny_llama_dir, rows_jsonl, out))
    before, after = summary["before"], summary["after"]
    for key in EVAL_KEYS:
        assert math.isfinite(before[key]) and math.isfinite(after[key]), key
    # step 0: the policy is the start model, so every implicit reward is exactly 0 and none is "accurate"
    assert before["eval/rewards/chosen"] == before["eval/rewards/rejected"] == before["eval/rewards/margins"] == 0
    assert before["eval/rewards/accuracies"] == 0
    # after: r(y) = beta * (log pi(y|x) - log pi_0(y|x)), per prompt, from the summed log-probs before and after
    b, a, beta = before["per_prompt"], after["per_prompt"], 0.1
    margins = [beta * ((pc - sc) - (pr - sr)) for pc, sc, pr, sr in
               zip(a["logps_chosen"], b["logps_chosen"], a["logps_rejected"], b["logps_rejected"])]
    assert a["rewards_margin"] == pytest.approx(margins, abs=1e-5)
    assert after["eval/rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert after["eval/rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert after["eval/rewards/margins"] != 0            # lr 5e-3 on a tiny model: training moved the policy
    # --eval-steps 2: the held-out measures sit on steps 2 and 4 of metrics.jsonl, not on 1 and 3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [("eval/rewards/margins" in m) for m in metrics] == [False, True, False, True]
    assert metrics[-1]["eval/rewards/margins"] == pytest.approx(after["eval/rewards/margins"], abs=1e-6)


def test_heldout_rewards_equal_an_independent_computation(tiny_llama_dir):
    """sapo.evaluate against the plain formula on two models: full logits, log_softmax, sums over y."""
    policy = sapo_utils.models.load_model(str(tiny_llama_dir))
    start = sapo_utils.models.load_model(str(tiny_llama_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tuples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [8, 12, 13]},
              {"prompt_ids": [14, 15], "chosen_ids": [16, 17, 18], "rejected_ids": [19, 20, 21, 22, 23]}]

    def logp(model, x, y):
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([x + y])).logits[0, :-1].double(), -1)
        return sum(lp[len(x) - 1 + j, t].item() for j, t in enumerate(y))

    s0 = sapo.evaluate(start, tuples, 0, torch.device("cpu"), beta=0.1)["per_prompt"]
    got = sapo.evaluate(policy, tuples, 0, torch.device("cpu"), beta=0.1,
                        start=(s0["logps_chosen"], s0["logps_rejected"]))
    r = [(0.1 * (logp(policy, t["prompt_ids"], t["chosen_ids"]) - logp(start, t["prompt_ids"], t["chosen_ids"])),
          0.1 * (logp(policy, t["prompt_ids"], t["rejected_ids"]) - logp(start, t["prompt_ids"], t["rejected_ids"])))
         for t in tuples]
    assert got["eval/rewards/chosen"] == pytest.approx(sum(c for c, _ in r) / 2, abs=1e-5)
    assert got["eval/rewards/rejected"] == pytest.approx(sum(n for _, n in r) / 2, abs=1e-5)
    assert got["eval/rewards/accuracies"] == sum(c > n for c, n in r) / 2


def test_metrics_png_and_printed_summary(tiny_llama_dir, rows_jsonl, tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "sapo.py"), "--model", str(tiny_llama_dir), "--dataset",
                        str(rows_jsonl), "--output-dir", str(out), "--max-steps", "3", "--batch-size", "2",
                        "--segment-len", "6", "--eval-size", "4", "--save-steps", "0", "--lr", "5e-3"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    png = out / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"metrics plot: {png}" in p.stdout
    for key in ("eval/rewards/margins", "eval/rewards/accuracies"):
        line = next(line for line in p.stdout.splitlines() if line.strip().startswith(key))
        assert "before" in line and "after" in line
    assert json.loads((out / "summary.json").read_text())["plot"] == str(png)


def test_tensorboard_scalars(tiny_llama_dir, rows_jsonl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    sapo.train(cfg(tiny_llama_dir, rows_jsonl, out, report_to="tensorboard"))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "rewards/margins", "eval/rewards/margins"} <= set(tags)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/rewards/margins")] == [2, 4]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([m["loss"] for m in jsonl], rel=1e-6)


def test_tensorboard_missing_is_one_line(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(sapo_utils.errors.UserError, match="--report-to tensorboard needs the tensorboard package"):
        sapo_utils.report.MetricsLog(tmp_path, 0, "tensorboard")


def test_metrics_png_leaves_the_matplotlib_backend_alone(tmp_path):
    """A notebook that calls sapo.train keeps its inline plots: writing metrics.png switches no global backend."""
    import matplotlib
    import sapo_utils.report  # noqa: F811
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        rows = [{"step": s, "loss": 0.7 - 0.01 * s, "rewards/margins": 0.01 * s, "rewards/accuracies": 1.0}
                for s in (1, 2, 3)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        png = sapo_utils.report.plot_metrics(tmp_path, before={"eval/rewards/margins": 0.0, "eval/rewards/accuracies": 0.0})
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
