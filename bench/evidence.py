"""Does SAPO change what a model does? Every method from one SFT start on 3-digit addition, scored exactly.

    python bench/evidence.py            # the full protocol (docs/evidence_protocol.md): lr sweep on the held-out split,
                                        # then 8 methods x 5 seeds, 3000 test problems; ~45-60 min on 2 CPU cores
    python bench/evidence.py --quick    # the same pipeline, shrunk (1 seed, a few steps, no sweep): < 2 min, for CI
    python bench/evidence.py --seeds 7 8 9 --out /tmp/ev     # other seeds (the lr sweep keeps its own seed)

Writes <out>/evidence.json (every run: its held-out curve, its test scores per problem; the table with paired
bootstrap intervals), <out>/evidence.md (the table) and <out>/evidence.png (the figure); --out defaults to
bench/results (the figure is then also copied to docs/evidence.png). Runs live in --work-dir (runs/evidence):
a killed command restarts without redoing finished runs.

The pipeline, each stage through sapo.train (no trainer of its own):
  data    tasks/arithmetic.py, data seed 0: 20000 train problems (the first 16160 for the SFT start, the last 3840
          for the methods: prompts the start never saw), 500 held-out, 3000 test; disjoint.
  start   a random tiny Llama (tasks.arithmetic.make_model) -> sapo.train(method="sft"): the start for every run.
  sweep   each swept method at each lr of its grid, one sweep seed, scored on the held-out split only; the lr with
          the best final held-out exact match is kept. SAPO's ablations use SAPO-DPO's lr (one change at a time).
  runs    each method x seed from the start, the same steps and prompts (sapo's prompt order depends on the seed
          only); held-out exact match every --curve-every steps from sapo.train's on_step hook (greedy decoding
          draws no random numbers); at the end, greedy answers to every test problem.
  table   test exact match per method (mean over seeds), differences against continued SFT and SPIN with 95%
          intervals from a paired bootstrap over test problems (seed-averaged scores), and a second, wider one that
          also resamples seeds.
At most --jobs training processes at a time (default 2), each on one thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks import arithmetic as ar  # noqa: E402

# name -> the sapo.Config fields that make the method (table order, fixed)
METHODS = {
    "sft": {"method": "sft"},                                   # continued SFT: the control
    "sapo-dpo": {"method": "sapo-dpo"},
    "sapo-orpo": {"method": "sapo-orpo"},
    "spin": {"method": "spin"},
    "dpo": {"method": "dpo"},                                   # offline, the task's rule-made wrong answers
    "sapo-dpo no-ema": {"method": "sapo-dpo", "generator": "policy"},
    "sapo-dpo no-buffer": {"method": "sapo-dpo", "use_buffer": False},
    "sapo-dpo whole": {"method": "sapo-dpo", "whole_response": True},
}
ABLATIONS = {"sapo-dpo no-ema": "sapo-dpo", "sapo-dpo no-buffer": "sapo-dpo", "sapo-dpo whole": "sapo-dpo"}
BASELINES = ("sft", "spin")          # every method is compared with these, paired

# The protocol (docs/evidence_protocol.md says why each value). quick shrinks it to check the pipeline.
FULL = dict(
    data_seed=0, n_sft=16160, n_pref=3840, n_heldout=500, n_test=3000,
    start=dict(lr=1e-3, batch_size=64, steps=240, seed=0),
    steps=120, batch_size=32, curve_every=20, seeds=[0, 1, 2, 3, 4], sweep_seed=100,
    lr_grid={m: [3e-5, 1e-4, 3e-4, 1e-3] for m in ("sft", "sapo-dpo", "sapo-orpo", "spin", "dpo")},
    beta=0.1, orpo_lambda=0.05, segment_len=8, temperature=1.0, ref_update_steps=40, spin_iterations=2,
    skip_identical_negatives=False, max_new_tokens=40, n_bootstrap=10000, num_samples=64,
)
QUICK = dict(
    FULL, n_sft=1500, n_pref=80, n_heldout=48, n_test=120,
    start=dict(lr=2e-3, batch_size=32, steps=40, seed=0),
    steps=5, batch_size=16, curve_every=5, seeds=[0], sweep_seed=100,
    lr_grid={m: [3e-4] for m in FULL["lr_grid"]},   # one value each: the sweep runs nothing
    ref_update_steps=2, n_bootstrap=500, num_samples=16,
)
SAPO_FIXED = dict(max_length=64, max_prompt_length=16, eval_size=8, eval_steps=0, save_steps=-1, log_every=1000,
                  generator_dtype="fp32", warmup_ratio=0.1)


# ----------------------------------------------------------------------------- greedy answers and scores

def greedy_answers(model, tok, rows: list[dict], max_new_tokens: int, batch_size: int = 500) -> list[str]:
    """Greedy answers (transformers generate, do_sample=False) to rows' prompts in sapo's prompt format."""
    import sapo
    import torch
    was_training, answers = model.training, []
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        contexts = [sapo.encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in rows[i: i + batch_size]]
        L = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), L), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(contexts), L), dtype=torch.long)
        for j, c in enumerate(contexts):    # left padding: every row's answer starts at position L
            ids[j, L - len(c):], attn[j, L - len(c):] = torch.tensor(c), 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, use_cache=True, temperature=None, top_p=None,
                                 top_k=None)
        answers += [tok.decode(o[L:], skip_special_tokens=True) for o in out]
    model.train(was_training)
    return answers


def mean_regions(model, pairs: list[dict], segment_len: int, pad_id: int, batch_size: int = 100) -> dict:
    """sapo.region_logps on fixed held-out pairs, each region's sum averaged over the pairs: where the likelihood
    of y+ (prefix, span, suffix) and of y- (span, suffix) sits."""
    import sapo
    import torch
    from sapo_utils.models import eval_mode
    with eval_mode(model):
        parts = [sapo.region_logps(model, pairs[i: i + batch_size], segment_len, pad_id, "cpu")
                 for i in range(0, len(pairs), batch_size)]
    return {k: float(torch.cat([p[k] for p in parts]).mean()) for k in parts[0]}


def scored(model, tok, rows, max_new_tokens) -> dict:
    answers = greedy_answers(model, tok, rows, max_new_tokens)
    per = ar.per_problem(answers, rows)
    return {"scores": {k: sum(v) / len(v) for k, v in per.items()}, "exact": "".join(str(int(v)) for v in
                                                                                  per["exact_match"]),
            "answers": answers}


# ----------------------------------------------------------------------------- one training run (a worker process)

def sapo_config(**fields):
    """sapo.Config from the fields it has (a field the installed sapo lacks is dropped, and reported)."""
    import sapo
    known = {f.name for f in dataclasses.fields(sapo.Config)}
    return sapo.Config(**{k: v for k, v in fields.items() if k in known}), sorted(set(fields) - known)


def run_one(spec: dict) -> dict:
    """Train one method from the start model as spec says, in this process; return its curve and test scores."""
    import torch
    torch.set_num_threads(1)
    import sapo
    heldout, test = ar.read_rows(spec["heldout"]), ar.read_rows(spec["test"])
    tok = sapo.load_tokenizer(spec["model"])
    cfg, dropped = sapo_config(
        model=spec["model"], dataset=spec["dataset"], eval_dataset=spec["heldout"], output_dir=spec["sapo_dir"],
        overwrite=True, seed=spec["seed"], lr=spec["lr"], batch_size=spec["batch_size"], max_steps=spec["steps"],
        num_samples=spec["num_samples"], eval_logps=False, **spec["fields"], **SAPO_FIXED)
    curve, identical, t_train = [], [], time.perf_counter()
    counting = "skip_identical_negatives" not in {f.name for f in dataclasses.fields(sapo.Config)}
    if counting:   # this sapo has no negatives/identical metric: count them where they are made (measurement only)
        made = sapo.make_negatives

        calls = []

        def make_negatives(*args, **kwargs):
            tuples = made(*args, **kwargs)
            calls.append(len(tuples))
            if len(calls) > 1:      # the first call writes sapo's held-out negatives, before training
                identical.append(sum(t["rejected_ids"] == t["chosen_ids"] for t in tuples) / max(1, len(tuples)))
            return tuples
        sapo.make_negatives = make_negatives
    eval_s = 0.0
    pairs = json.loads(Path(spec["region_pairs"]).read_text()) if spec.get("region_pairs") else None

    def on_step(step, policy, metrics):
        nonlocal eval_s
        if not counting and "negatives/identical" in metrics:
            identical.append(metrics["negatives/identical"])
        if step % spec["curve_every"] == 0 or step == spec["steps"]:
            t0 = time.perf_counter()
            point = {"step": step, **scored(policy, tok, heldout, spec["max_new_tokens"])["scores"]}
            if pairs:
                point["regions"] = mean_regions(policy, pairs, spec["segment_len"], tok.pad_token_id)
            curve.append(point)
            eval_s += time.perf_counter() - t0

    summary = sapo.train(cfg, on_step=on_step)
    t_train = time.perf_counter() - t_train - eval_s
    if counting:
        sapo.make_negatives = made
    if spec["score_test"]:
        test_result = scored(sapo.load_model(str(Path(spec["sapo_dir"]) / "final")), tok, test, spec["max_new_tokens"])
    else:   # sweep runs: the held-out split only
        test_result = {"scores": None, "exact": None, "answers": []}
    samples = Path(spec["sapo_dir"]) / "samples.jsonl"
    negatives = [json.loads(line) for line in samples.read_text().splitlines()] if samples.exists() else []
    last = (summary or {}).get("last", {})
    return {"name": spec["name"], "method": spec["method"], "seed": spec["seed"], "lr": spec["lr"],
            "stage": spec["stage"], "curve": [{"step": 0, **spec["start_heldout"]}] + curve,
            "start": spec.get("start_name"),
            "test": test_result["scores"], "test_exact": test_result["exact"],
            "test_answers_head": test_result["answers"][:20],
            "identical_per_step": identical, "negatives": negatives, "train_s": round(t_train, 1),
            "budget": {"optimizer_steps": spec["steps"], "prompts": spec["steps"] * spec["batch_size"]},
            "last_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float))},
            "sapo_fields_missing": dropped}


def worker(spec_paths: list[str]) -> int:
    """Run each spec in this process, one after another; a result file appears when its run is done."""
    for spec_path in spec_paths:
        spec = json.loads(Path(spec_path).read_text())
        print(f"--- {spec['name']}", flush=True)
        result = run_one(spec)
        tmp = Path(spec["result"]).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(spec["result"])
    return 0


def run_all(specs: list[dict], jobs: int, log) -> list[dict]:
    """Run the specs not yet done, at most `jobs` worker processes at a time (each one thread)."""
    todo = [s for s in specs if not Path(s["result"]).exists()]
    if jobs == 0:   # in this process, one after another (no interpreter start-up per run: --quick)
        for spec in todo:
            t0 = time.perf_counter()
            Path(spec["out"]).mkdir(parents=True, exist_ok=True)
            Path(spec["result"]).write_text(json.dumps(run_one(spec)))
            log_result(spec, log, t0)
        return [json.loads(Path(s["result"]).read_text()) for s in specs]
    # `jobs` worker processes, each running its share of the runs one after another (one interpreter start-up each)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    shares, workers, logged = [todo[i::jobs] for i in range(jobs)], [], set()
    for i, share in enumerate(s for s in shares if s):
        paths = []
        for spec in share:
            Path(spec["out"]).mkdir(parents=True, exist_ok=True)
            paths.append(Path(spec["out"]) / "spec.json")
            paths[-1].write_text(json.dumps(spec, indent=1))
        logf = open(Path(share[0]["result"]).parents[3] / f"worker{i}.log", "a")
        proc = subprocess.Popen([sys.executable, __file__, "--worker", *map(str, paths)], stdout=logf,
                                stderr=subprocess.STDOUT, env=env)
        workers.append((proc, logf))
    t0 = time.perf_counter()
    while True:
        time.sleep(1.0)
        for spec in todo:
            if spec["name"] not in logged and Path(spec["result"]).exists():
                logged.add(spec["name"])
                log_result(spec, log, t0)
        if all(p.poll() is not None for p, _ in workers):
            break
        if any(p.poll() not in (None, 0) for p, _ in workers):
            break
    for p, logf in workers:
        if p.poll() is None:
            p.kill()
            p.wait()
        logf.close()
    failed = [p.returncode for p, _ in workers if p.returncode != 0]
    missing = [s["name"] for s in specs if not Path(s["result"]).exists()]
    if failed or missing:
        raise RuntimeError(f"worker exit codes {failed}, runs without a result: {missing[:5]}; see "
                           f"{Path(todo[0]['result']).parents[3]}/worker*.log")
    return [json.loads(Path(s["result"]).read_text()) for s in specs]


def log_result(spec, log, t0):
    r = json.loads(Path(spec["result"]).read_text())
    test = f"test EM {r['test']['exact_match']:.3f}" if r["test"] else ""
    log(f"  {spec['name']:<38} held-out EM {r['curve'][-1]['exact_match']:.3f}  {test}  "
        f"(trained in {r['train_s']:.0f} s; {(time.perf_counter() - t0) / 60:.1f} min into the stage)")


# ----------------------------------------------------------------------------- statistics

def paired_bootstrap(a: list[list[int]], b: list[list[int]], n_boot: int, rng: random.Random, seeds_too=False):
    """Mean test exact match of a minus b, with a 95% percentile interval. a, b: [seed][problem] 0/1, paired by
    seed (same prompt order) and problem. Problems are resampled (seed-averaged scores); with seeds_too, the seeds
    (pairs) are resampled as well."""
    import numpy as np
    A, B = np.array(a, dtype=float), np.array(b, dtype=float)           # (S, P)
    diff = A - B
    S, P = diff.shape
    gen = np.random.default_rng(rng.randrange(2 ** 32))
    stats = np.empty(n_boot)
    for i in range(n_boot):
        rows = gen.integers(0, S, S) if seeds_too else np.arange(S)
        cols = gen.integers(0, P, P)
        stats[i] = diff[rows][:, cols].mean()
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"diff": float(diff.mean()), "ci95": [float(lo), float(hi)]}


def table_rows(runs: list[dict], methods: list[str], n_boot: int) -> list[dict]:
    """One row per method over the seeds it has runs for; its differences against the baselines are paired over
    the seeds both have (all of them after a complete run; fewer after an interrupted one with --report-only)."""
    import numpy as np
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds_of = {m: sorted(s for (mm, s) in by if mm == m) for m in methods}
    rng, rows = random.Random(0), []
    for m in methods:
        rs = [by[(m, s)] for s in seeds_of[m]]
        if not rs:
            continue
        em = [r["test"]["exact_match"] for r in rs]
        row = {"method": m, "lr": rs[0]["lr"], "seeds": seeds_of[m],
               "test_exact_match": float(np.mean(em)), "test_exact_match_sd": float(np.std(em, ddof=1)) if len(em) > 1
               else 0.0, "test_digit_acc": float(np.mean([r["test"]["digit_acc"] for r in rs])),
               "heldout_exact_match": float(np.mean([r["curve"][-1]["exact_match"] for r in rs])),
               "identical_negatives": (float(np.mean([np.mean(r["identical_per_step"]) for r in rs]))
                                       if all(r["identical_per_step"] for r in rs) else None),
               "train_s": float(np.mean([r["train_s"] for r in rs]))}
        # of the sampled negatives (samples.jsonl: the first steps) that differ from y+, the share whose result line
        # is still the true sum: the kept suffix of y+ carries the answer after the rewritten segment
        differ = [n for r in rs for n in r.get("negatives", []) if n["rejected"] != n["chosen"]]
        row["negatives_right_result"] = (float(np.mean([ar.result_line(n["rejected"]) == ar.result_line(n["chosen"])
                                                        for n in differ])) if differ else None)
        for base in BASELINES:
            common = [s for s in seeds_of[m] if s in seeds_of.get(base, [])]
            if base != m and common:
                a = [[int(c) for c in by[(m, s)]["test_exact"]] for s in common]
                b = [[int(c) for c in by[(base, s)]["test_exact"]] for s in common]
                row[f"vs_{base}"] = {**paired_bootstrap(a, b, n_boot, rng), "seeds": common}
                row[f"vs_{base}_seeds"] = paired_bootstrap(a, b, n_boot, rng, seeds_too=True)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the report

def pct(x, signed=False):
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def markdown_table(rows: list[dict], start: dict) -> str:
    head = ("| method | lr | test exact match % (sd over seeds) | vs continued SFT, points [95% CI problems] "
            "[CI seeds+problems] | vs SPIN, points [95% CI problems] | test digit acc % | held-out EM % | "
            "identical negatives % | differing negatives with the right result line % | train s/run |")
    lines = [head, "|" + "---|" * 11]
    lines.append(f"| start (SFT checkpoint) | | {pct(start['exact_match'])} | | | {pct(start['digit_acc'])} | "
                 f"{pct(start['heldout']['exact_match'])} | | | |")
    for r in rows:
        def vs(key):
            if key not in r:
                return "—"
            d, (lo, hi) = r[key]["diff"], r[key]["ci95"]
            return f"{pct(d, True)} [{pct(lo, True)}, {pct(hi, True)}]"
        seeds_ci = (f" [{pct(r['vs_sft_seeds']['ci95'][0], True)}, {pct(r['vs_sft_seeds']['ci95'][1], True)}]"
                    if "vs_sft_seeds" in r else "")
        ident = "—" if r["identical_negatives"] is None else pct(r["identical_negatives"])
        kept = "—" if r.get("negatives_right_result") is None else pct(r["negatives_right_result"])
        lines.append(f"| {r['method']} ({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)}) | {r['lr']:.0e} | {pct(r['test_exact_match'])} ({pct(r['test_exact_match_sd'])})"
                     f" | {vs('vs_sft')}{seeds_ci} | {vs('vs_spin')} | {pct(r['test_digit_acc'])} | "
                     f"{pct(r['heldout_exact_match'])} | {ident} | {kept} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def sweep_table(sweep: dict, chosen: dict) -> str:
    """Held-out exact match after the last step, per method and lr (the sweep seed); the chosen lr in bold."""
    if not sweep:
        return "No lr sweep ran (one lr per method).\n"
    lrs = sorted({lr for grid in sweep.values() for lr in grid}, key=float)
    lines = ["| held-out exact match % (sweep seed) | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for m, grid in sweep.items():
        cells = [("**" if f"{chosen[m]:.0e}" == lr else "") + pct(grid[lr]) + ("**" if f"{chosen[m]:.0e}" == lr else "")
                 if lr in grid else "" for lr in lrs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def negatives_text(negatives: list[dict]) -> str:
    """Negatives SAPO-DPO's EMA model wrote (from sapo's samples.jsonl), the rewritten segment in [[ ]]."""
    lines = ["Negatives the EMA model wrote (SAPO-DPO, first seed, first steps; segment in [[ ]], lines joined by `|`):",
             "", "| prompt | y+ | y- (segment marked) | y-'s result line is the true sum? |", "|---|---|---|---|"]
    for n in negatives:
        flat = {k: n[k].strip().replace("\n", " \\| ") for k in ("prompt", "chosen", "rejected_marked")}
        right = "identical to y+" if n["rejected"] == n["chosen"] else (
            "yes" if ar.result_line(n["rejected"]) == ar.result_line(n["chosen"]) else "no")
        lines.append(f"| `{flat['prompt']}` | `{flat['chosen']}` | `{flat['rejected_marked']}` | {right} |")
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], rows: list[dict], methods: list[str], path: Path, title: str):
    """Left: held-out exact match per step (mean over seeds, band min..max). Right: test exact match difference vs
    continued SFT with its 95% interval (problems). matplotlib's Figure, no pyplot (no global state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 5.2))
    FigureCanvasAgg(fig)
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    colors = {m: c for m, c in zip(methods, ["black", "tab:red", "tab:orange", "tab:blue", "tab:green",
                                             "tab:pink", "tab:purple", "tab:brown"])}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        steps = [p["step"] for p in rs[0]["curve"]]
        ys = np.array([[p["exact_match"] for p in r["curve"]] for r in rs]) * 100
        style = "--" if m in ABLATIONS else "-"
        ax.plot(steps, ys.mean(0), style, color=colors[m], label=f"{m} ({len(rs)} seed{'s' * (len(rs) > 1)})",
                lw=2 if m in ("sft", "sapo-dpo") else 1.3)
        if len(rs) > 1:
            ax.fill_between(steps, ys.min(0), ys.max(0), color=colors[m], alpha=0.12)
    ax.axhline(runs[0]["curve"][0]["exact_match"] * 100, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("optimizer step (from the SFT start)")
    ax.set_ylabel("held-out exact match, %")
    ax.set_title("held-out exact match per step (mean over seeds, band: min..max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    others = [r for r in rows if "vs_sft" in r]
    y = np.arange(len(others))[::-1]
    for yi, r in zip(y, others):
        d, (lo, hi) = r["vs_sft"]["diff"] * 100, r["vs_sft"]["ci95"]
        bx.errorbar(d, yi, xerr=[[d - lo * 100], [hi * 100 - d]], fmt="o", color=colors[r["method"]], capsize=3)
        if "vs_sft_seeds" in r:
            slo, shi = r["vs_sft_seeds"]["ci95"]
            bx.plot([slo * 100, shi * 100], [yi - 0.18] * 2, color=colors[r["method"]], alpha=0.45, lw=3)
    bx.axvline(0, color="black", lw=1)
    bx.set_yticks(y, [r["method"] for r in others])
    bx.set_xlabel("test exact match minus continued SFT, points")
    bx.set_title("95% CI: bar = problems; faint = seeds+problems", fontsize=10)
    bx.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    import platform
    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split()) & {"amx_bf16", "avx512_bf16", "avx512f", "avx2"}
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores, flags {' '.join(sorted(flags)) or 'n/a'}"


# ----------------------------------------------------------------------------- the pipeline

def write_data(P: dict, data: Path) -> dict:
    """The protocol's splits (data seed, sizes) as JSONL files in `data`, rewritten only when they differ: the SFT
    problems, the preference prompts, the held-out and the test problems. Returns the rows by split."""
    splits = ar.make_splits(P["data_seed"], P["n_sft"] + P["n_pref"], P["n_heldout"], P["n_test"])
    data.mkdir(parents=True, exist_ok=True)
    files = {"sft": splits["train"][: P["n_sft"]], "pref": splits["train"][P["n_sft"]:],
             "heldout": splits["heldout"], "test": splits["test"]}
    for name, rows in files.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if not (data / f"{name}.jsonl").exists() or (data / f"{name}.jsonl").read_text() != text:
            (data / f"{name}.jsonl").write_text(text)
    return files


def pipeline_parser(doc: str, name: str) -> argparse.ArgumentParser:
    """The options every protocol's command has (this one's and bench/repairs.py's)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    parser.add_argument("--quick", action="store_true", help="shrunk pipeline for CI (< 2 min)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: the protocol's 0..4)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help=f"where {name}.json/.md/.png go")
    parser.add_argument("--work-dir", default=None, help=f"runs and data (default: runs/{name}[-quick])")
    parser.add_argument("--jobs", type=int, default=None, help="training processes at a time, one thread each "
                        "(default 2; --quick: 0, every run in this process)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the runs in --work-dir that finished")
    return parser


def main(argv=None) -> int:
    parser = pipeline_parser(__doc__, "evidence")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset of the methods (default: all)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    P = dict(QUICK if args.quick else FULL)
    jobs = args.jobs if args.jobs is not None else (0 if args.quick else 2)
    if args.seeds:
        P["seeds"] = args.seeds
    methods = args.methods or list(METHODS)
    work = Path(args.work_dir or ROOT / "runs" / ("evidence-quick" if args.quick else "evidence"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {msg}", flush=True)

    import torch
    torch.set_num_threads(1)
    import sapo
    data = work / "data"
    files = write_data(P, data)
    # start: a random tiny Llama, then SFT through sapo.train
    start_dir = work / "start"
    if not (start_dir / "final" / "config.json").exists():
        log(f"start: SFT of a random {ar.MODEL_SIZE['num_hidden_layers']}-layer Llama, {P['start']['steps']} steps")
        ar.make_model(work / "init", seed=P["start"]["seed"])
        cfg, _ = sapo_config(model=str(work / "init"), method="sft", dataset=str(data / "sft.jsonl"),
                             eval_dataset=str(data / "heldout.jsonl"), output_dir=str(start_dir), overwrite=True,
                             seed=P["start"]["seed"], lr=P["start"]["lr"], batch_size=P["start"]["batch_size"],
                             max_steps=P["start"]["steps"], num_samples=0, eval_logps=False, **SAPO_FIXED)
        sapo.train(cfg)
    model_dir = str(start_dir / "final")
    start_file = work / "start_scores.json"
    if not start_file.exists():
        tok, model = sapo.load_tokenizer(model_dir), sapo.load_model(model_dir)
        h = scored(model, tok, files["heldout"], P["max_new_tokens"])
        t = scored(model, tok, files["test"], P["max_new_tokens"])
        start_file.write_text(json.dumps({**t["scores"], "exact": t["exact"], "heldout": h["scores"],
                                          "n_params": ar.n_params(model)}))
    start = json.loads(start_file.read_text())
    log(f"start: held-out exact match {start['heldout']['exact_match']:.3f}, test {start['exact_match']:.3f} "
        f"({start['n_params'] / 1e6:.2f}M parameters)")

    def spec(method, seed, lr, stage):
        name = f"{stage}/{method.replace(' ', '_')}/lr{lr:.0e}/seed{seed}"
        fields = dict(METHODS[method], beta=P["beta"], orpo_lambda=P["orpo_lambda"], segment_len=P["segment_len"],
                      temperature=P["temperature"], ref_update_steps=P["ref_update_steps"],
                      spin_iterations=P["spin_iterations"], skip_identical_negatives=P["skip_identical_negatives"])
        s = {"name": name, "method": method, "seed": seed, "lr": lr, "stage": stage, "model": model_dir,
             "dataset": str(data / "pref.jsonl"), "heldout": str(data / "heldout.jsonl"),
             "test": str(data / "test.jsonl"), "steps": P["steps"], "batch_size": P["batch_size"],
             "curve_every": P["curve_every"], "max_new_tokens": P["max_new_tokens"], "num_samples": P["num_samples"],
             "fields": fields, "start_heldout": start["heldout"]}
        key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
        s["out"] = str(work / name)
        s["sapo_dir"] = str(work / name / "sapo")
        s["score_test"] = stage == "runs"
        s["result"] = str(work / name / f"result-{key}.json")
        return s

    # sweep: held-out split only, one seed
    chosen, sweep = {}, {}
    swept = [m for m in methods if m in P["lr_grid"]]
    sweep_specs = [spec(m, P["sweep_seed"], lr, "sweep") for m in swept for lr in P["lr_grid"][m]
                   if len(P["lr_grid"][m]) > 1]
    if sweep_specs:
        log(f"sweep: {len(sweep_specs)} runs (seed {P['sweep_seed']}, held-out split)")
    for r in (run_all(sweep_specs, jobs, log) if not args.report_only else
              [json.loads(Path(s["result"]).read_text()) for s in sweep_specs if Path(s["result"]).exists()]):
        sweep.setdefault(r["method"], {})[f"{r['lr']:.0e}"] = r["curve"][-1]["exact_match"]
    for m in swept:
        grid = P["lr_grid"][m]
        chosen[m] = grid[0] if len(grid) == 1 else max(grid, key=lambda lr: sweep[m][f"{lr:.0e}"])
    for m in methods:
        if m not in chosen:
            chosen[m] = chosen.get(ABLATIONS.get(m, "sapo-dpo"), P["lr_grid"]["sapo-dpo"][0])
    log("chosen lr: " + ", ".join(f"{m} {lr:.0e}" for m, lr in chosen.items()))
    # the runs
    main_specs = [spec(m, s, chosen[m], "runs") for s in P["seeds"] for m in methods]
    log(f"runs: {len(main_specs)} ({len(methods)} methods x {len(P['seeds'])} seeds, {P['steps']} steps each)")
    if args.report_only:   # the runs that finished, e.g. after an interrupted command; nothing is trained
        runs = [json.loads(Path(s["result"]).read_text()) for s in main_specs if Path(s["result"]).exists()]
        log(f"report only: {len(runs)} of {len(main_specs)} runs finished")
    else:
        runs = run_all(main_specs, jobs, log)
    rows = table_rows(runs, methods, P["n_bootstrap"])
    negatives = []
    for r in runs:
        if r["method"] == "sapo-dpo" and r["seed"] == P["seeds"][0]:
            negatives = [n for n in r["negatives"] if n["rejected"] != n["chosen"]][:12]
            negatives += [n for n in r["negatives"] if n["rejected"] == n["chosen"]][:2]
    minutes = (time.perf_counter() - t_start) / 60
    command = "python bench/evidence.py" + (" --quick" if args.quick else "") + (
        f" --seeds {' '.join(map(str, P['seeds']))}" if args.seeds else "")
    result = {"command": command, "machine": machine(), "minutes": round(minutes, 1),
              "protocol": {**P, "methods": methods, "chosen_lr": chosen, "sapo_fixed": SAPO_FIXED},
              "start": {"test": {k: start[k] for k in ("exact_match", "digit_acc", "working_exact")},
                        "heldout": start["heldout"], "n_params": start["n_params"], "test_exact": start["exact"]},
              "sweep": sweep, "table": rows, "negatives": negatives,
              "runs": [{k: v for k, v in r.items() if k != "negatives"} for r in runs]}
    (out / "evidence.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(rows, {**start, "heldout": start["heldout"]})
    made = (f"Runs of `{command}`; this report rebuilt from them by `--report-only` ({machine()})" if args.report_only
            else f"Command: `{command}` ({minutes:.0f} min; {machine()})")
    if args.report_only:
        result["minutes"] = None
        result["report_only"] = True
    (out / "evidence.json").write_text(json.dumps(result, indent=1))
    (out / "evidence.md").write_text(f"{made}\n\n{table}\n"
                                     + sweep_table(sweep, chosen) + "\n" + negatives_text(negatives))
    figure(runs, rows, methods, out / "evidence.png",
           f"3-digit addition, {start['n_params'] / 1e6:.1f}M-parameter Llama from one SFT start "
           f"({pct(start['exact_match'])}% test exact match), {P['steps']} steps x {P['batch_size']} prompts")
    if not args.quick and out.resolve() == (ROOT / "bench" / "results").resolve():
        shutil.copy(out / "evidence.png", ROOT / "docs" / "evidence.png")
    print(table)
    log(f"wrote {out / 'evidence.json'}, {out / 'evidence.md'}, {out / 'evidence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
