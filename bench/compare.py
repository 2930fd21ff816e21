"""The comparison table: SAPO-DPO, SAPO-ORPO and the baselines (DPO, ORPO, SPIN, SFT), same start, same budget.

    python bench/compare.py             # the full table: 3 seeds, SmolLM2-135M-Instruct; ~56 min on 2 idle CPU cores
                                        # (estimate; printed at the start, re-scaled after stage 1)
    python bench/compare.py --quick     # 1 seed, 3 steps, a tiny random Llama: checks the script runs (< 3 min;
                                        # tests/test_compare.py runs it in CI)

Writes bench/results/results.json, bench/results/table.md and bench/results/compare.png (--out); the per-run
details (greedy answers, training metrics) stay in runs/compare/ (--work-dir), where a killed run restarts
without redoing finished runs. docs/comparison.md says what the table does and does not show.

The protocol, and where each choice is made:
  stage 0  data: the bundled IFEval-lite train split is cut once (seed 0) into a preference subset of
           --n-prompts rows, used by every stage-2 run, and the rest, used only by stage 1. The preference
           stage sees prompts the SFT model never trained on, as in the paper (Zephyr-SFT was trained on
           UltraChat, SAPO on Capybara).
  stage 1  SFT: `sapo.train(method="sft")` of --model on the rest of the split, once, seed 0: every stage-2
           run, every seed, starts from this one model (the seeds vary stage 2 only). The paper starts its
           DPO methods from an SFT model and ORPO from the base model; with one small instruct model here,
           every method starts from the same SFT model.
  stage 2  for each seed and method: `sapo.train(method=m)` from the SFT model on the preference subset,
           the same --steps, --batch-size, --lr, optimizer and schedule for every method (one lr for all, not
           tuned per method; the paper tunes them at 7-8B). `sft` continued is the control: same data,
           NLL only. `dpo`/`orpo` use the dataset's `rejected` (paired data); SAPO and SPIN write their own.
           With the defaults (32 prompts, 16 steps of 4) every method makes two passes over the subset, and
           each of SPIN's 2 iterations regenerates all 32 negatives and trains one pass on them.
  eval     greedy answers to the first --eval-size held-out prompts (topics disjoint from train), scored by
           tasks/ifeval_lite.py: strict prompt-level accuracy (every constraint met) and loose
           instruction-level accuracy (IFEval's); the held-out chosen log-prob per token; and the pair accuracy
           (how often log pi(y+) per token beats the held-out dataset `rejected`, which differs from y+ by one
           broken constraint; offline dpo/orpo train on exactly such pairs, SAPO/SPIN never see one). The same
           numbers as `sapo.evaluate_model` (tests/test_compare.py checks it), computed in memory.
  curve    held-out accuracy over training steps: every --curve-every steps the live policy answers the first
           --curve-size held-out prompts, from sapo.train's on_step hook, in memory (no checkpoint is written);
           greedy decoding draws no random numbers, so the trained weights are the same with or without the
           curve (tested). Step 0 is the SFT model; the last point is the final evaluation's
           first --curve-size prompts (same batches, so the same answers).
  time     wall-clock minutes of each `sapo.train` call (loading, generation, training, saving), without the
           evaluations; the evaluation minutes are reported apart. SAPO and SPIN minutes include their generation.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import sapo  # noqa: E402
import sapo_utils.data  # noqa: E402
import tasks.ifeval_lite  # noqa: E402
from sapo_utils.evaluation import task_scores  # noqa: E402
from tasks.ifeval_lite import check, check_loose, score  # noqa: E402

METHODS = ("sapo-dpo", "sapo-orpo", "dpo", "orpo", "spin", "sft")   # table order: fixed, never sorted by score
METRICS = {   # key in the evaluation -> column title
    "prompt_strict_acc": "strict prompt acc",
    "instruction_loose_acc": "loose instruction acc",
    "logps_chosen_per_token": "chosen log-prob / token",
    "pair_acc": "pair acc vs dataset y-",
    "reward_acc": "reward acc vs SFT start",
    "reward_margin": "reward margin vs SFT start",
}
PAIRED = ("prompt_strict_acc", "instruction_loose_acc", "reward_acc", "reward_margin")   # bootstrapped differences
BETA = 0.1          # the implicit reward's beta (sapo.Config's default), r(y) = BETA * (log pi(y|x) - log pi_sft(y|x))
N_BOOTSTRAP = 10_000
# Seconds on 2 idle cores for SmolLM2-135M at batch 4 (fp32), for the time estimate printed at the start. Measured
# as single-thread CPU time on a busy machine (SFT step 6.5 s, DPO 19.3, ORPO 13.5, a SAPO segment batch 6.3 + EMA 0.4,
# SPIN's whole responses 10.5 per 4 prompts, one greedy held-out answer of <= 96 tokens 2.7), all divided by the one
# factor (2.6) that makes a SAPO-DPO step ~10 s, its idle-machine time. The script re-scales them with its own measured
# stage-1 time and prints the result.
QUIET_STEP_S = {"sft": 2.5, "dpo": 7.4, "orpo": 5.2, "sapo-dpo": 10.0, "sapo-orpo": 7.8, "spin": 7.4}
QUIET_SPIN_GEN_S = 1.0       # one whole response written by SPIN's frozen model, per prompt
QUIET_EVAL_S = 1.05          # one greedy held-out answer (<= 96 new tokens, batch 16) plus its log-probs
QUIET_RUN_OVERHEAD_S = 8.0   # load the start model, copy it into EMA/reference, save final/ per sapo.train call


# --------------------------------------------------------------------------------------------- settings

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 3 steps, a tiny random Llama (bundled tokenizer), 8 held-out "
                   "prompts: checks that the script works (CI), shows nothing about the methods")
    p.add_argument("--model", default=None, help=f"start model before SFT (default {sapo.BUNDLED_MODEL}; --quick: a tiny "
                   "random Llama built in --work-dir)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="stage-2 seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--sft-steps", type=int, default=None, help="stage-1 SFT steps (default 50; --quick: 2)")
    p.add_argument("--sft-lr", type=float, default=None, help="stage-1 SFT peak learning rate (default 2e-5; --quick: 1e-3)")
    p.add_argument("--steps", type=int, default=None, help="stage-2 optimizer steps, every method (default 16; --quick: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per step, both stages (default 4; --quick: 2)")
    p.add_argument("--lr", type=float, default=None, help="stage-2 peak learning rate, every method (AdamW, linear, 10%% "
                   "warmup; default 5e-6; --quick: 1e-3, so that a tiny random model visibly moves)")
    p.add_argument("--n-prompts", type=int, default=None, help="preference-stage prompts cut from the train split, the same "
                   "for every method and seed (default 32; --quick: 4)")
    p.add_argument("--spin-iterations", type=int, default=2, help="SPIN iterations within --steps (each regenerates "
                   "all --n-prompts negatives)")
    p.add_argument("--eval-size", type=int, default=None, help="held-out prompts in the final evaluation (default 32; --quick: 8)")
    p.add_argument("--curve-size", type=int, default=None, help="held-out prompts at each curve point: the first ones of "
                   "the evaluation set; a multiple of 16 or --eval-size (default 16; --quick: 8)")
    p.add_argument("--curve-every", type=int, default=None, help="steps between curve points, 0: none (default 8; --quick: 1)")
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="longest greedy answer (default 96: every held-out "
                   "chosen answer is <= 81 tokens; --quick: 16)")
    p.add_argument("--out", default=None, help="results.json, table.md, compare.png (default bench/results; --quick: "
                   "runs/compare-quick/results)")
    p.add_argument("--work-dir", default=None, help="models and per-run files (default runs/compare; --quick: runs/compare-quick)")
    p.add_argument("--fresh", action="store_true", help="delete --work-dir first instead of reusing finished runs")
    p.add_argument("--keep-models", action="store_true", help="keep every stage-2 final/ model (540 MB each at 135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core; --quick: 1, "
                   "as a tiny model's small ops gain nothing from more and stall on a busy machine)")
    args = p.parse_args(argv)
    full = dict(seeds=[0, 1, 2], sft_steps=50, sft_lr=2e-5, lr=5e-6, steps=16, batch_size=4, n_prompts=32, eval_size=32,
                curve_size=16, curve_every=8, eval_max_new_tokens=96, out="bench/results", work_dir="runs/compare")
    quick = dict(seeds=[0], sft_steps=2, sft_lr=1e-3, lr=1e-3, steps=3, batch_size=2, n_prompts=4, eval_size=8, curve_size=8,
                 curve_every=1, eval_max_new_tokens=16, out="runs/compare-quick/results", work_dir="runs/compare-quick")
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.command = "python " + shlex.join(["bench/compare.py", *(sys.argv[1:] if argv is None else argv)])
    for name in ("sft_steps", "steps", "batch_size", "n_prompts", "eval_size", "curve_size", "spin_iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.curve_size > args.eval_size or (args.curve_size != args.eval_size and args.curve_size % EVAL_BATCH):
        p.error(f"--curve-size must be --eval-size or a multiple of {EVAL_BATCH} below it (so its answers are batched "
                f"exactly as in the final evaluation)")
    return args


EVAL_BATCH = 16   # sapo.evaluate_model answers in batches of max(batch_size, 16); the same here, so answers match


# --------------------------------------------------------------------------------------------- data and models

def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def split_train(n_prompts: int, work: Path) -> dict[str, Path]:
    """Cut the train split once (seed 0): n_prompts rows for the preference stage, the rest for SFT. Also a
    one-row held-out file without constraints, given to sapo.train as its own before/after set so that its
    built-in evaluation costs nothing (the real evaluation is done here)."""
    rows = read_jsonl(sapo.BUNDLED_TRAIN)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    if n_prompts >= len(rows):
        raise SystemExit(f"--n-prompts {n_prompts}: the train split has only {len(rows)} rows (some must stay for SFT)")
    pref, rest = sorted(order[:n_prompts]), sorted(order[n_prompts:])
    stub = {k: v for k, v in read_jsonl(sapo_utils.data.BUNDLED_HELDOUT)[0].items() if k != "constraints"}
    return {"pref": write_jsonl(work / "data" / "preference_prompts.jsonl", [rows[i] for i in pref]),
            "sft": write_jsonl(work / "data" / "sft_rows.jsonl", [rows[i] for i in rest]),
            "stub": write_jsonl(work / "data" / "stub_eval.jsonl", [stub])}


def make_tiny_model(path: Path) -> Path:
    """--quick: a 2-layer random Llama with the bundled model's tokenizer and chat template (fast, learns nothing)."""
    if (path / "config.json").exists():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = sapo.load_tokenizer(sapo.BUNDLED_MODEL)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tmp = path.with_name(path.name + ".tmp")
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- evaluation

class HeldOut:
    """The first eval_size held-out prompts, tokenised with the start model's tokenizer, and how to score a model."""

    def __init__(self, model_name: str, eval_size: int, max_new_tokens: int):
        self.tok = sapo.load_tokenizer(model_name)
        # 512 / 384: sapo.Config's defaults, as sapo.evaluate_model uses them
        self.examples = sapo.load_examples(str(sapo_utils.data.BUNDLED_HELDOUT), self.tok, 512, 384, verbose=False)[:eval_size]
        rows = read_jsonl(sapo_utils.data.BUNDLED_HELDOUT)[:eval_size]
        if len(self.examples) != len(rows):
            raise SystemExit("a held-out row is too long for this tokenizer at max length 512: pairs would not line up")
        self.rejected = [sapo.encode_response(self.tok, r["rejected"]) for r in rows]
        self.max_new_tokens = max_new_tokens
        self.ops = sapo.ops_for(sapo.Config(), torch.device("cpu"))   # the functions sapo.evaluate_model uses
        self.start = None   # the SFT start's per-prompt evaluation, once known: implicit rewards are measured from it

    @torch.no_grad()
    def evaluate(self, model, n: int | None = None) -> dict:
        """Greedy answers and log-probs of the first n prompts (all by default) -> per-prompt lists + metrics."""
        examples, rejected = self.examples[:n], self.rejected[:n]
        was_training = model.training
        model.eval()
        device, pad = next(model.parameters()).device, self.tok.pad_token_id
        pos, neg, n_pos, n_neg = [], [], [], []
        for i in range(0, len(examples), EVAL_BATCH):
            chunk = examples[i: i + EVAL_BATCH]
            pairs = [(e.prompt_ids, e.chosen_ids) for e in chunk] + [(e.prompt_ids, r) for e, r in zip(chunk, rejected[i:])]
            lp, count = self.ops.sequence_logps(model, **sapo.collate(pairs, pad, device))
            pos += lp[: len(chunk)].tolist()
            neg += lp[len(chunk):].tolist()
            n_pos += count[: len(chunk)].tolist()
            n_neg += count[len(chunk):].tolist()
        answers = task_scores(model, self.tok, examples, tasks.ifeval_lite, sapo.stop_token_ids(model, self.tok),
                              self.max_new_tokens, self.ops.answer, EVAL_BATCH)["responses"]
        model.train(was_training)
        return with_metrics({"logps_chosen": [a / n for a, n in zip(pos, n_pos)],
                             "logps_rejected": [a / n for a, n in zip(neg, n_neg)],
                             "sum_chosen": pos, "sum_rejected": neg, "responses": answers,
                             "constraints": [e.row["constraints"] for e in examples]}, start=self.start)


def with_metrics(per_prompt: dict, n: int | None = None, start: dict | None = None) -> dict:
    """Metrics of the first n prompts of a per-prompt evaluation (so a curve point can be read off the final one).
    Per prompt it also keeps what the paired bootstrap resamples: strict (0/1), loose (met, of), and, against the
    SFT start `start`, the implicit rewards r(y) = BETA*(log pi(y|x) - log pi_sft(y|x)) of the held-out y+ and the
    dataset's y-: margin r(y+) - r(y-), and whether it is > 0. With no start, the model is the start (rewards 0)."""
    cut = {k: v[:n] for k, v in per_prompt.items() if isinstance(v, list)}
    rows = [{"constraints": c} for c in cut["constraints"]]
    s = score(cut["responses"], rows)
    cut["strict"] = [float(all(check(r, row["constraints"]))) for r, row in zip(cut["responses"], rows)]
    cut["loose_met"] = [sum(check_loose(r, row["constraints"])) for r, row in zip(cut["responses"], rows)]
    cut["loose_of"] = [len(row["constraints"]) for row in rows]
    base = {k: v[:n] for k, v in start.items() if k in ("sum_chosen", "sum_rejected")} if start else cut
    cut["margin"] = [BETA * ((p - p0) - (r - r0)) for p, p0, r, r0 in
                     zip(cut["sum_chosen"], base["sum_chosen"], cut["sum_rejected"], base["sum_rejected"])]
    pairs = list(zip(cut["logps_chosen"], cut["logps_rejected"]))
    return {**cut, "n": len(pairs), "prompt_strict_acc": s["prompt_strict_acc"], "instruction_loose_acc": s["instruction_loose_acc"],
            "logps_chosen_per_token": statistics.fmean(cut["logps_chosen"]), "pair_acc": statistics.fmean(p > r for p, r in pairs),
            "reward_acc": statistics.fmean(m > 0 for m in cut["margin"]), "reward_margin": statistics.fmean(cut["margin"])}


PER_PROMPT = {   # metric -> (numerator per prompt, denominator per prompt): the metric is sum(num) / sum(den)
    "prompt_strict_acc": lambda ev: (ev["strict"], [1.0] * len(ev["strict"])),
    "instruction_loose_acc": lambda ev: (ev["loose_met"], ev["loose_of"]),
    "reward_acc": lambda ev: ([float(m > 0) for m in ev["margin"]], [1.0] * len(ev["margin"])),
    "reward_margin": lambda ev: (ev["margin"], [1.0] * len(ev["margin"])),
}


def paired_ci(runs_a: list[dict], runs_b: list[dict], key: str, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict:
    """Difference a - b of a metric over the same held-out prompts, each side averaged over its seeds per prompt, with
    a 95% percentile-bootstrap interval from resampling prompts (the same resampled prompts for both sides)."""
    import numpy as np
    def per_prompt(runs):
        parts = [PER_PROMPT[key](r) for r in runs]
        return np.mean([p[0] for p in parts], axis=0), np.mean([p[1] for p in parts], axis=0)
    (num_a, den_a), (num_b, den_b) = per_prompt(runs_a), per_prompt(runs_b)
    idx = np.random.default_rng(seed).integers(0, len(num_a), size=(n_boot, len(num_a)))
    diffs = num_a[idx].sum(1) / den_a[idx].sum(1) - num_b[idx].sum(1) / den_b[idx].sum(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"diff": float(num_a.sum() / den_a.sum() - num_b.sum() / den_b.sum()), "lo": float(lo), "hi": float(hi),
            "n_prompts": len(num_a), "n_boot": n_boot}


def metrics_only(ev: dict) -> dict:
    return {k: ev[k] for k in ("n", *METRICS)}


# --------------------------------------------------------------------------------------------- one training run

def run(cfg: sapo.Config, heldout: HeldOut, curve_every: int, curve_size: int) -> dict:
    """sapo.train(cfg) with held-out evaluations at every curve point (curve_size prompts) and at the end (all),
    from sapo.train's on_step hook; no checkpoint is written (--save-steps -1: policy + EMA + reference + AdamW
    state are 2.7 GB at 135M, and nothing here resumes a run half-way)."""
    curve, final, eval_s, eval_cpu = [], {}, 0.0, 0.0

    def on_step(step, policy, metrics):
        nonlocal eval_s, eval_cpu
        t0, cpu0 = time.perf_counter(), time.process_time()
        if step == cfg.max_steps:
            final.update(heldout.evaluate(policy))
            curve.append({"step": step, **metrics_only(with_metrics(final, curve_size, heldout.start))})
        elif curve_every and step % curve_every == 0:
            curve.append({"step": step, **metrics_only(heldout.evaluate(policy, curve_size))})
        eval_s += time.perf_counter() - t0
        eval_cpu += time.process_time() - cpu0

    cfg = dataclasses.replace(cfg, save_steps=-1)
    t0, cpu0 = time.perf_counter(), time.process_time()
    summary = sapo.train(cfg, on_step=on_step)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"method": cfg.method, "seed": cfg.seed, "final": final, "curve": curve, "last": summary["last"],
            "train_min": (wall - eval_s) / 60, "eval_min": eval_s / 60,
            "train_cpu_min": (cpu - eval_cpu) / 60, "eval_cpu_min": eval_cpu / 60,     # CPU time: all threads together
            "skipped_steps": summary["last"].get("nonfinite/skipped", 0), "final_dir": summary["final_dir"]}


# --------------------------------------------------------------------------------------------- the plan

def estimate_s(args, n_runs_left=None) -> float:
    """Quiet-machine seconds for the whole table at the bundled model's size (see QUIET_STEP_S)."""
    scale = args.batch_size / 4
    points = (args.steps - 1) // args.curve_every if args.curve_every else 0     # intermediate curve points per run
    per_run = {m: args.steps * QUIET_STEP_S[m] * scale + QUIET_RUN_OVERHEAD_S + args.eval_size * QUIET_EVAL_S
               + points * args.curve_size * QUIET_EVAL_S for m in args.methods}
    if "spin" in per_run:
        per_run["spin"] += args.spin_iterations * args.n_prompts * QUIET_SPIN_GEN_S
    stage1 = args.sft_steps * QUIET_STEP_S["sft"] * scale + QUIET_RUN_OVERHEAD_S + 2 * args.eval_size * QUIET_EVAL_S
    return stage1 + len(args.seeds) * sum(per_run.values())


def cpu_name() -> str:
    """The CPU's model name and its widest matrix ISA (AMX / AVX-512 / AVX2), for labelling the minutes."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        flags = next(l for l in info.splitlines() if l.startswith("flags")).split()
        isa = "AMX" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
        return f"{name} ({isa})" if isa else name
    except (OSError, StopIteration):
        return "unknown CPU"


def fingerprint(args) -> str:
    keys = ("model", "quick", "sft_steps", "sft_lr", "steps", "batch_size", "lr", "n_prompts", "spin_iterations", "eval_size",
            "curve_size", "curve_every", "eval_max_new_tokens", "device")
    return hashlib.sha256(json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"command: {args.command}", flush=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    work, out = (Path(p) if Path(p).is_absolute() else ROOT / p for p in (args.work_dir, args.out))
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    args.model = args.model or (str(make_tiny_model(work / "tiny-llama")) if args.quick else sapo.BUNDLED_MODEL)
    stamp = work / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text())["fingerprint"] != fingerprint(args):
        raise SystemExit(f"{work} holds runs made with other settings: pass --fresh to delete them, or another --work-dir")
    stamp.write_text(json.dumps({"fingerprint": fingerprint(args), "command": args.command}))

    est = estimate_s(args)
    print(f"plan: SFT {args.sft_steps} steps, then {len(args.methods)} methods x {len(args.seeds)} seeds x {args.steps} steps "
          f"of {args.batch_size} prompts ({args.n_prompts} preference prompts), {args.eval_size} held-out prompts; "
          f"estimate {est / 60:.0f} min on 2 idle cores" + (" (for SmolLM2-135M; far less for --quick's tiny model)"
                                                            if args.model != sapo.BUNDLED_MODEL else ""), flush=True)
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    files = split_train(args.n_prompts, work)
    heldout = HeldOut(args.model, args.eval_size, args.eval_max_new_tokens)
    base = dict(dataset=str(files["pref"]), eval_dataset=str(files["stub"]), eval_size=1, batch_size=args.batch_size,
                max_steps=args.steps, lr=args.lr, spin_iterations=args.spin_iterations, device=args.device,
                overwrite=True, log_every=max(1, args.steps // 4), num_samples=4)

    # -- stage 1: SFT once, seed 0; every stage-2 run starts from its final/
    sft_file = work / "stage1" / "result.json"
    if sft_file.exists():
        stage1 = json.loads(sft_file.read_text())
        print(f"stage 1: reusing {stage1['final_dir']}", flush=True)
    else:
        print(f"\n== stage 1: SFT of {args.model} on {len(read_jsonl(files['sft']))} train rows", flush=True)
        t0 = time.perf_counter()
        model = sapo.load_model(args.model, device=args.device)
        base_eval = heldout.evaluate(model)
        base_eval_s = time.perf_counter() - t0
        del model
        cfg = sapo.Config(**{**base, "dataset": str(files["sft"]), "max_steps": args.sft_steps, "lr": args.sft_lr},
                          model=args.model, method="sft", seed=0, output_dir=str(work / "stage1" / "run"))
        stage1 = run(cfg, heldout, 0, args.curve_size)
        stage1["base"] = base_eval
        stage1["eval_min"] += base_eval_s / 60
        sft_file.write_text(json.dumps(stage1))
        quiet_s = args.sft_steps * QUIET_STEP_S["sft"] * args.batch_size / 4 + QUIET_RUN_OVERHEAD_S
        print(f"stage 1 took {stage1['train_min']:.1f} min of training (estimate {quiet_s / 60:.1f}) and "
              f"{stage1['eval_min']:.1f} min of evaluation: at this speed the table takes "
              f"~{est * stage1['train_min'] * 60 / quiet_s / 60:.0f} min", flush=True)
    start_model = stage1["final_dir"]
    heldout.start = stage1["final"]                                   # implicit rewards are measured from the SFT start
    stage1["base"] = with_metrics(stage1["base"], start=heldout.start)
    print(f"base model: {fmt_metrics(stage1['base'])}\nSFT model:  {fmt_metrics(stage1['final'])}", flush=True)

    # -- stage 2: every method, every seed, from the SFT model
    runs, reused = [], 0
    todo = [(seed, m) for seed in args.seeds for m in args.methods]
    for k, (seed, method) in enumerate(todo):
        run_dir = work / "runs" / f"{method}-seed{seed}"
        done = run_dir / "result.json"
        if done.exists():
            runs.append(json.loads(done.read_text()))
            reused += 1
            print(f"[{k + 1}/{len(todo)}] {method} seed {seed}: reusing {done}", flush=True)
            continue
        print(f"\n== [{k + 1}/{len(todo)}] {method}, seed {seed}, from the SFT model", flush=True)
        cfg = sapo.Config(**base, model=start_model, method=method, seed=seed, output_dir=str(run_dir / "run"))
        r = run(cfg, heldout, args.curve_every, args.curve_size)
        r["curve"].insert(0, {"step": 0, **metrics_only(with_metrics(stage1["final"], args.curve_size))})
        if not args.keep_models:
            shutil.rmtree(r["final_dir"], ignore_errors=True)
            r["final_dir"] = None
        done.write_text(json.dumps(r))
        runs.append(r)
        elapsed = time.perf_counter() - started
        print(f"{method} seed {seed}: {fmt_metrics(r['final'])}; train {r['train_min']:.1f} min, eval {r['eval_min']:.1f} min; "
              f"{elapsed / 60:.1f} min so far", flush=True)

    results = {"command": args.command, "settings": {k: v for k, v in vars(args).items() if k != "command"},
               "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "loadavg_start": load0,
                           "torch": torch.__version__},
               "estimate_min": est / 60, "total_min": (time.perf_counter() - started) / 60, "reused_runs": reused,
               "stage1": {"base": metrics_only(stage1["base"]), "sft": metrics_only(stage1["final"]),
                          "train_min": stage1["train_min"], "eval_min": stage1["eval_min"]},
               "runs": [{k: v for k, v in r.items() if k != "final"} | {"final": metrics_only(r["final"])} for r in runs],
               "summary": summarize(runs, args.methods),
               "paired": paired_table(runs, stage1["final"], args.methods),
               "per_prompt": {f"{r['method']}-seed{r['seed']}": {k: r["final"][k] for k in PER_PROMPT_KEYS} for r in runs}
               | {"sft-start": {k: stage1["final"][k] for k in PER_PROMPT_KEYS}}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results))
    plot(results, out / "compare.png")
    print("\n" + table(results), flush=True)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'compare.png'}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- reporting

PER_PROMPT_KEYS = ("strict", "loose_met", "loose_of", "margin")   # kept in results.json: the bootstrap can be redone


def paired_table(runs: list[dict], sft_final: dict, methods) -> dict:
    """For each method: the paired difference to the SFT start and to offline dpo, per PAIRED metric, with CIs."""
    by = {m: [r["final"] for r in runs if r["method"] == m] for m in methods}
    out = {}
    for m in methods:
        if not by[m]:
            continue
        out[m] = {"vs_sft_start": {k: paired_ci(by[m], [sft_final], k) for k in PAIRED}}
        if m != "dpo" and by.get("dpo"):
            out[m]["vs_dpo"] = {k: paired_ci(by[m], by["dpo"], k) for k in PAIRED}
    return out


def fmt_ci(c: dict, f: str = "+.3f") -> str:
    star = " *" if c["lo"] > 0 or c["hi"] < 0 else ""     # the interval excludes 0
    return f"{c['diff']:{f}} [{c['lo']:{f}}, {c['hi']:{f}}]{star}"

def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs), "values": xs}


def summarize(runs: list[dict], methods) -> dict:
    summary = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if rs:
            summary[m] = {k: mean_std([r["final"][k] for r in rs]) for k in METRICS}
            summary[m].update({k: mean_std([r[k] for r in rs]) for k in ("train_min", "eval_min", "train_cpu_min", "eval_cpu_min")})
    return summary


def fmt_metrics(ev: dict) -> str:
    return ", ".join(f"{METRICS[k]} {ev[k]:.3f}" for k in METRICS)


def table(res: dict) -> str:
    s, st1 = res["settings"], res["stage1"]
    pm = lambda d, f=".3f": f"{d['mean']:{f}} ± {d['std']:{f}}" if d["n"] > 1 else f"{d['mean']:{f}}"  # noqa: E731
    lines = [f"`{res['command']}`", "",
             f"Start: {s['model']} after {s['sft_steps']} SFT steps (lr {s['sft_lr']:g}) on the train split minus the "
             f"{s['n_prompts']} preference prompts. Each method: {s['steps']} steps x {s['batch_size']} prompts from that "
             f"model, lr {s['lr']:g}, seeds {' '.join(map(str, s['seeds']))}; mean ± std over seeds. Held-out: the first "
             f"{st1['sft']['n']} prompts of data/ifeval_lite_heldout.jsonl, greedy, <= {s['eval_max_new_tokens']} new tokens. "
             f"Minutes: wall-clock of training (incl. generation) per run; machine: "
             f"{res['machine'].get('cpu', 'CPU')}, {res['machine']['cores']} cores, "
             f"load average {res['machine']['loadavg_start']:.1f} at the start of this invocation, which took "
             f"{res['total_min']:.0f} min" + (f" and reused {res['reused_runs']} of {len(res['runs'])} finished runs from "
                                             "earlier invocations (their minutes are from when they ran)"
                                             if res.get("reused_runs") else "") + ".", "",
             "| method | " + " | ".join(METRICS.values()) + " | train min | eval min |",
             "|---" * (len(METRICS) + 3) + "|"]
    for name, ev in (("base model (no training)", st1["base"]), ("SFT start (every method's step 0)", st1["sft"])):
        lines.append(f"| {name} | " + " | ".join(f"{ev[k]:.3f}" for k in METRICS) + " | | |")
    for m, d in res["summary"].items():
        lines.append(f"| {m} | " + " | ".join(pm(d[k]) for k in METRICS) + f" | {pm(d['train_min'], '.1f')} | "
                     f"{pm(d['eval_min'], '.1f')} |")
    lines += ["", f"SFT stage: {st1['train_min']:.1f} min training. Pair acc: held-out y+ vs the dataset's y- (one broken "
              "constraint) by per-token log-prob; offline dpo/orpo train on such pairs, SAPO and SPIN never see one. "
              f"Reward acc / margin: DPO's implicit reward r(y) = {BETA} * (log pi(y|x) - log pi_sft(y|x)) of the same y+ "
              "and y-, against the SFT start (0 there by definition): how far training moved y+ above y-.", ""]
    if res.get("paired"):
        first = next(iter(next(iter(res["paired"].values()))["vs_sft_start"].values()))
        lines += [f"Paired differences over the same {first['n_prompts']} held-out prompts (each method averaged over its "
                  f"seeds per prompt), with 95% percentile-bootstrap intervals ({first['n_boot']} resamples of the "
                  "prompts); * marks an interval that excludes 0.", "",
                  "| method | vs | " + " | ".join(METRICS[k] for k in PAIRED) + " |", "|---" * (len(PAIRED) + 2) + "|"]
        for m, d in res["paired"].items():
            for vs, label in (("vs_sft_start", "SFT start"), ("vs_dpo", "offline dpo")):
                if vs in d:
                    lines.append(f"| {m} | {label} | " + " | ".join(fmt_ci(d[vs][k]) for k in PAIRED) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summary, st1 = res["summary"], res["stage1"]
    methods = list(summary)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, key in zip(axes[0], ("prompt_strict_acc", "instruction_loose_acc")):
        means = [summary[m][key]["mean"] for m in methods]
        stds = [summary[m][key]["std"] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
        for i, m in enumerate(methods):
            vals = summary[m][key]["values"]
            ax.scatter([i] * len(vals), vals, color="black", s=12, zorder=3, label="one seed" if i == 0 else None)
        ax.axhline(st1["sft"][key], color="tab:green", ls="--", label="SFT start")
        ax.axhline(st1["base"][key], color="tab:gray", ls=":", label="base model")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_ylim(0, 1)
        ax.set_title(f"held-out {METRICS[key]}, after training (n={st1['sft']['n']})")
        ax.legend(loc="upper right", fontsize=8)
    n_curve = res["runs"][0]["curve"][0]["n"] if res["runs"] else 0
    for ax, key in zip(axes[1], ("prompt_strict_acc", "logps_chosen_per_token")):
        for m in methods:   # mean over seeds, shaded +- std
            rs = [r for r in res["runs"] if r["method"] == m]
            steps = sorted({p["step"] for r in rs for p in r["curve"]})
            ys = [[p[key] for r in rs for p in r["curve"] if p["step"] == s] for s in steps]
            mean = [statistics.fmean(y) for y in ys]
            std = [statistics.stdev(y) if len(y) > 1 else 0.0 for y in ys]
            line, = ax.plot(steps, mean, marker="o", ms=3, label=m)
            ax.fill_between(steps, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                            color=line.get_color(), alpha=0.12)
        ax.set_xlabel("optimizer step (0 = SFT start)")
        ax.set_title(f"held-out {METRICS[key]} over training (first {n_curve} prompts)")
        ax.legend(fontsize=8)
    axes[1][0].set_ylim(0, 1)
    fig.suptitle(res["command"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
