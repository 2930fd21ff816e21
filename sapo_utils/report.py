"""What a run writes about itself: metrics.jsonl (and TensorBoard scalars), samples.jsonl, metrics.png,
summary.json, and the summary printed at the end."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from sapo_utils.checkpoints import replace_text
from sapo_utils.errors import UserError


def step_metrics(accum: list[dict], step: int, lr: float, grad_norm: float, skipped: int,
                 buffer) -> dict:
    """One step's metrics line: the micro-batches' metrics averaged, with the step's bookkeeping."""
    metrics = {k: sum(m[k] for m in accum) / len(accum) for k in accum[0]} if accum else {}
    metrics.update({"step": step, "lr": lr, "grad_norm": grad_norm, "nonfinite/skipped": skipped,
                    "buffer/size": len(buffer)})
    return metrics


def preference_metrics(loss, r_pos, r_neg, pi_pos, pi_neg, extra=None) -> dict:
    """A preference loss's metrics under the names TRL and torchtune use: the implicit rewards r(y+), r(y-),
    their margin and how often r(y+) > r(y-), and the summed log-probs of y+ and y-."""
    return {"loss": loss.item(),
            "rewards/chosen": r_pos.mean().item(),
            "rewards/rejected": r_neg.mean().item(),
            "rewards/margins": (r_pos - r_neg).mean().item(),
            "rewards/accuracies": (r_pos > r_neg).float().mean().item(),
            "logps/chosen": pi_pos.detach().mean().item(),
            "logps/rejected": pi_neg.detach().mean().item(),
            **(extra or {})}


def held_out_metrics(pi_pos, pi_neg, avg_pos, avg_neg, r_pos, r_neg, log_odds, regions=None) -> dict:
    """sapo.evaluate's measures as eval/* numbers (means over the held-out prompts), and the per-prompt values
    under "per_prompt": summed (pi_*) and per-token (avg_*) log-probs of y+ and y-, rewards, log odds.
    regions: sapo.region_logps' sums, each (B,), reported as eval/logps/<region> means."""
    by_region = {f"eval/logps/{k}": v.mean().item() for k, v in (regions or {}).items()}
    return {**by_region,
            "eval/rewards/chosen": r_pos.mean().item(),
            "eval/rewards/rejected": r_neg.mean().item(),
            "eval/rewards/margins": (r_pos - r_neg).mean().item(),
            "eval/rewards/accuracies": (r_pos > r_neg).float().mean().item(),
            "eval/logps_chosen_per_token": avg_pos.mean().item(),
            "eval/logps_rejected_per_token": avg_neg.mean().item(),
            "eval/preference_accuracy": (avg_pos > avg_neg).float().mean().item(),
            "eval/log_odds_chosen": log_odds.mean().item(),
            "per_prompt": {"logps_chosen": pi_pos.tolist(), "logps_rejected": pi_neg.tolist(),
                           "rewards_margin": (r_pos - r_neg).tolist(),
                           "chosen_per_token": avg_pos.tolist()}}


def identical(tuples: list[dict]) -> list[bool]:
    """Which negatives equal y+ token for token (the generator wrote y+ back): the negatives/identical
    metric, and what --skip-identical-negatives drops."""
    return [tpl["rejected_ids"] == tpl["chosen_ids"] for tpl in tuples]


def describe_tuple(tok, tpl: dict, step: int) -> dict:
    """A replay tuple as text, with the regenerated segment marked by [[ ]]."""
    t, k, y_neg = tpl["t"], tpl["segment_len"], tpl["rejected_ids"]
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    return {"step": step, "prompt": tok.decode(tpl["prompt_ids"]), "chosen": dec(tpl["chosen_ids"]),
            "rejected": dec(y_neg), "rejected_marked": dec(y_neg[:t]) + "[[" + dec(y_neg[t: t + k]) + "]]"
            + dec(y_neg[t + k:]), "t": t, "segment_tokens": k}


def write_summary(out: Path, tok, eval_examples, before, after, last: dict) -> dict:
    """summary.json: before/after held-out measures, the last step's metrics, greedy answers before and after."""
    responses = {"before": (before or {}).pop("responses", []), "after": (after or {}).pop("responses", [])}
    summary = {"before": before, "after": after, "last": last, "final_dir": str(out / "final"),
               "n_eval": len(eval_examples) if after else 0,
               "eval_responses": [{"prompt": tok.decode(e.prompt_ids, skip_special_tokens=True), "before": b,
                                   "after": a}
                                  for e, b, a in zip(eval_examples, responses["before"], responses["after"])]}
    plot = plot_metrics(out, {k: v for k, v in (before or {}).items() if k.startswith("eval/")})
    summary["plot"] = str(plot) if plot else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def append_samples(path: Path, tok, tuples: list[dict], step: int, room: int) -> int:
    """Append up to `room` tuples to samples.jsonl as text; returns how many were written."""
    with open(path, "a") as fh:
        for tpl in tuples[: max(0, room)]:
            fh.write(json.dumps(describe_tuple(tok, tpl, step), ensure_ascii=False) + "\n")
    return min(len(tuples), max(0, room))


def plot_metrics(out: Path, before: dict | None = None) -> Path | None:
    """<out>/metrics.png from metrics.jsonl: training loss, reward margins and accuracies (train, and held-out
    against the starting model where evaluated; `before` is step 0). Written atomically; None without matplotlib."""
    try:     # a Figure without pyplot: no global backend switch (a notebook calling train keeps its inline plots)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = ([{"step": 0, **before}] if before else []) + [r for r in rows if "eval/rewards/margins" in r]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    panels = [("loss", "training loss", None),
              ("rewards/margins", "reward margin  r(y+) - r(y-)", "eval/rewards/margins"),
              ("rewards/accuracies", "reward accuracy  r(y+) > r(y-)", "eval/rewards/accuracies")]
    for ax, (key, title, eval_key) in zip(axes, panels):
        train = [(r["step"], r[key]) for r in rows if key in r]
        if train:
            ax.plot(*zip(*train), color="tab:blue", alpha=0.8, label="train batch (vs pi_ref)")
        if eval_key and any(eval_key in r for r in evals):
            ax.plot(*zip(*[(r["step"], r[eval_key]) for r in evals if eval_key in r]), "o-", color="tab:orange",
                    label="held-out (vs start model)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if eval_key:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out / ".metrics.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out / "metrics.png")
    return out / "metrics.png"


def print_summary(summary: dict) -> None:
    b, a = summary["before"], summary["after"]
    if a:
        print(f"\n{summary['n_eval']} held-out prompts (negatives fixed: written once by the initial model):")
        for key in (k for k in a if k.startswith("eval/")):
            print(f"  {key:34s} before {b[key]: .4f}   after {a[key]: .4f}" if b and key in b
                  else f"  {key:34s} after {a[key]: .4f}")
    print(f"final policy: {summary['final_dir']}")
    if summary.get("plot"):
        print(f"metrics plot: {summary['plot']}")



def trim_jsonl(path: Path, step: int) -> int:
    """Drop lines from steps after `step` (a resumed run redoes them); returns how many lines are left. The file
    is replaced whole, so a run killed meanwhile loses none of its lines."""
    if not path.exists():
        return 0
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    replace_text(path, "".join(line + "\n" for line in kept))
    return len(kept)


class MetricsLog:
    """metrics.jsonl (every step, resumable), TensorBoard scalars with report_to='tensorboard', and metrics.png."""

    def __init__(self, out: Path, step: int, report_to: str = "none"):
        self.path, self.out = out / "metrics.jsonl", out
        trim_jsonl(self.path, step)
        self.tb = None
        if report_to == "tensorboard":
            self.tb = self.tensorboard_writer()(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    @staticmethod
    def tensorboard_writer():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter

    def write(self, metrics: dict, echo=None) -> None:
        if echo is not None:     # a line on the terminal: echo=print, or tqdm's bar.write
            echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

