"""Why SAPO-DPO lowered exact match, and what repairs it: the second arithmetic protocol
(docs/evidence_protocol_repairs.md), on the task, model and statistics of bench/evidence.py.

    python bench/repairs.py                    # the protocol: two starts, held-out lr sweeps, 7 arms x 5 seeds
    python bench/repairs.py --quick            # the same pipeline, shrunk: < 2 min (CI)
    python bench/repairs.py --seeds 7 8 9 10 11 --out /tmp/r    # other training seeds (starts and sweeps reused)
    python bench/repairs.py --report-only      # rebuild the report from the runs that finished

Writes <out>/repairs.json (every run: its held-out curve with the region log-probs, its test scores per problem;
the sweeps; the tables), <out>/repairs.md and <out>/repairs.png (copied to docs/ when --out is bench/results).
Runs live in --work-dir (runs/repairs): a killed command restarts without redoing finished runs.

The pipeline, every stage through sapo.train:
  starts   start51: bench/evidence.py's start (240 SFT steps, about 51% exact match); finished: SFT from the same
           random model until held-out exact match stops rising (the schedule doubles until it has).
  pairs    per start, fixed held-out (x, y+, y-) pairs written once by the start model (SAPO's segment negatives,
           with y+'s suffix): every run measures log pi on y+'s prefix / span / suffix and y-'s span / suffix there.
  sweeps   per start and arm, held-out exact match after the last step at each lr of a half-decade ladder, extended
           past an edge until the best is interior (or the ladder ends); where the best two
           are closer than the sweep's noise, both rerun with two more sweep seeds and the mean decides.
  runs     every arm x seed at its chosen lr; held-out curve and regions every --curve-every steps; greedy answers
           to every test problem at the end.
  tables   per start: test exact match, paired bootstrap intervals against continued SFT and against SAPO-DPO,
           and how far each region's log-prob moved from the start.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import evidence as ev  # noqa: E402
from tasks import arithmetic as ar  # noqa: E402

# arm -> the sapo.Config fields that make it (table order, fixed)
ARMS = {
    "sft": {"method": "sft"},                                          # continued SFT: the control
    "sapo-dpo": {"method": "sapo-dpo"},
    "sapo-dpo+nll": {"method": "sapo-dpo", "rpo_alpha": "ALPHA"},     # RPO (Pang et al. 2024)
    "sapo-dpop": {"method": "sapo-dpo", "dpop_lambda": "LAMBDA"},     # DPOP (Pal et al. 2024)
    "sapo-dpo suffix-free": {"method": "sapo-dpo", "suffix_free": True},          # Step-DPO's pair
    "sapo-dpo suffix-free+nll": {"method": "sapo-dpo", "suffix_free": True, "rpo_alpha": "ALPHA"},
    "sapo-orpo": {"method": "sapo-orpo"},
}
# the arms whose loss holds an NLL term on y+ start their sweep higher (the first protocol's optima: 3e-4 with an
# NLL term, 3e-5 without)
WITH_NLL = ("sft", "sapo-dpo+nll", "sapo-dpo suffix-free+nll", "sapo-orpo")
COMPARED_WITH = ("sft", "sapo-dpo")
REGIONS = ("chosen_prefix", "chosen_span", "chosen_suffix", "rejected_span", "rejected_suffix")

FULL = dict(
    data_seed=0, n_sft=16160, n_pref=3840, n_heldout=500, n_test=3000,
    starts={"start51": dict(lr=1e-3, batch_size=64, steps=240, seed=0, eval_every=0),
            "finished": dict(lr=1e-3, batch_size=64, steps=1200, seed=0, eval_every=100, max_doublings=2)},
    plateau=0.01, plateau_evals=3,
    steps=40, batch_size=32, curve_every=10, seeds=[0, 1, 2, 3, 4], sweep_seeds=[100, 101, 102],
    ladder=[1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3],
    first_grid={"nll": [1e-4, 3e-4, 1e-3], "no_nll": [1e-5, 3e-5, 1e-4]},
    noise=0.03, beta=0.1, orpo_lambda=0.05, rpo_alpha=1.0, dpop_lambda=50.0, segment_len=8, temperature=1.0,
    mechanism_lr=3e-5,
    ref_update_steps=15, max_new_tokens=40, n_bootstrap=10000, num_samples=64, region_pairs=200,
    region_seed=12345,
)
QUICK = dict(
    FULL, n_sft=1500, n_pref=80, n_heldout=48, n_test=120,
    starts={"start51": dict(lr=2e-3, batch_size=32, steps=30, seed=0, eval_every=0),
            "finished": dict(lr=2e-3, batch_size=32, steps=30, seed=0, eval_every=10, max_doublings=1)},
    steps=4, batch_size=16, curve_every=2, seeds=[0], sweep_seeds=[100], ladder=[3e-4],
    first_grid={"nll": [3e-4], "no_nll": [3e-4]}, ref_update_steps=2, n_bootstrap=200, mechanism_lr=3e-4,
    num_samples=8, region_pairs=24,
)


# ----------------------------------------------------------------------------- starts and the fixed pairs

def train_start(P: dict, name: str, work: Path, data: Path, log) -> dict:
    """SFT from the random model (tasks.arithmetic.make_model, seed 0) through sapo.train. With eval_every, the
    held-out curve decides whether training has finished: the best of the last plateau_evals evaluations must be
    within `plateau` of the best before them, else the schedule doubles (at most max_doublings times)."""
    import sapo
    S, start_dir = P["starts"][name], work / name
    done = start_dir / "start.json"
    if done.exists():
        return json.loads(done.read_text())
    init = work / "init"
    if not (init / "config.json").exists():
        ar.make_model(init, seed=S["seed"])
    heldout = ar.read_rows(data / "heldout.jsonl")
    tok = sapo.load_tokenizer(str(init))
    steps = S["steps"]
    for doubling in range(S.get("max_doublings", 0) + 1):
        curve = []

        def on_step(step, policy, metrics):
            if S["eval_every"] and step % S["eval_every"] == 0:
                curve.append({"step": step, **ev.scored(policy, tok, heldout, P["max_new_tokens"])["scores"]})

        log(f"start {name}: SFT of the random model, {steps} steps")
        cfg, _ = ev.sapo_config(model=str(init), method="sft", dataset=str(data / "sft.jsonl"),
                                eval_dataset=str(data / "heldout.jsonl"), output_dir=str(start_dir / "sft"),
                                overwrite=True, seed=S["seed"], lr=S["lr"], batch_size=S["batch_size"],
                                max_steps=steps, num_samples=0, eval_logps=False, **ev.SAPO_FIXED)
        sapo.train(cfg, on_step=on_step)
        if not S["eval_every"] or finished(curve, P["plateau"], P["plateau_evals"]):
            break
        if doubling < S.get("max_doublings", 0):
            log(f"start {name}: held-out exact match still rising after {steps} steps; doubling the schedule")
            steps *= 2
    info = {"name": name, "steps": steps, "curve": curve,
            "finished": (not S["eval_every"]) or finished(curve, P["plateau"], P["plateau_evals"]),
            "model": str(start_dir / "sft" / "final")}
    done.write_text(json.dumps(info, indent=1))
    return info


def finished(curve: list[dict], plateau: float, n: int) -> bool:
    """Has held-out exact match stopped rising? The best of the last n points is within `plateau` of the best of
    the points before them."""
    em = [p["exact_match"] for p in curve]
    return len(em) > n and max(em[-n:]) <= max(em[:-n]) + plateau


def region_pairs(P: dict, model_dir: str, data: Path, path: Path) -> list[dict]:
    """Fixed held-out pairs written once by the start model: SAPO's segment negatives (G, temperature and the
    authors' top-k / top-p), with y+'s suffix kept, on the first region_pairs held-out problems. Pairs whose y-
    equals y+ are dropped (they have no span of their own to measure)."""
    import sapo
    import torch
    from sapo_utils.models import stop_token_ids
    if path.exists():
        return json.loads(path.read_text())
    tok, model = sapo.load_tokenizer(model_dir), sapo.load_model(model_dir)
    examples = sapo.load_examples(str(data / "heldout.jsonl"), tok, ev.SAPO_FIXED["max_length"],
                                  ev.SAPO_FIXED["max_prompt_length"], verbose=False)[: P["region_pairs"]]
    torch.manual_seed(P["region_seed"])
    tuples = sapo.make_negatives(model, examples, P["segment_len"], ev.SAPO_FIXED["max_length"],
                                 random.Random(P["region_seed"]), tok.pad_token_id, stop_token_ids(model, tok),
                                 sapo.segment_sampling(P["temperature"], 50, 0.95))
    pairs = [t for t in tuples if t["rejected_ids"] != t["chosen_ids"]]
    path.write_text(json.dumps(pairs))
    return pairs


def start_scores(P: dict, info: dict, files: dict, pairs: list[dict], path: Path) -> dict:
    """The start's held-out and test scores, and its region log-probs (every run's step 0)."""
    import sapo
    if path.exists():
        return json.loads(path.read_text())
    tok, model = sapo.load_tokenizer(info["model"]), sapo.load_model(info["model"])
    h = ev.scored(model, tok, files["heldout"], P["max_new_tokens"])
    t = ev.scored(model, tok, files["test"], P["max_new_tokens"])
    heldout = dict(h["scores"])
    if pairs:       # a start whose own negatives all equal y+ leaves nothing to measure
        heldout["regions"] = ev.mean_regions(model, pairs, P["segment_len"], tok.pad_token_id)
    out = {**t["scores"], "exact": t["exact"], "heldout": heldout, "n_params": ar.n_params(model)}
    path.write_text(json.dumps(out))
    return out


# ----------------------------------------------------------------------------- specs, sweeps

def make_spec(P, work, data, start, scores, arm, seed, lr, stage):
    name = f"{start}/{stage}/{arm.replace(' ', '_')}/lr{lr:.0e}/seed{seed}"
    values = {"ALPHA": P["rpo_alpha"], "LAMBDA": P["dpop_lambda"]}
    fields = {k: values.get(v, v) if isinstance(v, str) else v for k, v in ARMS[arm].items()}
    fields.update(beta=P["beta"], orpo_lambda=P["orpo_lambda"], segment_len=P["segment_len"],
                  temperature=P["temperature"], ref_update_steps=P["ref_update_steps"])
    main = stage == "runs"
    s = {"name": name, "method": arm, "seed": seed, "lr": lr, "stage": stage, "start_name": start,
         "model": scores["model_dir"], "dataset": str(data / "pref.jsonl"), "heldout": str(data / "heldout.jsonl"),
         "test": str(data / "test.jsonl"), "steps": P["steps"], "batch_size": P["batch_size"],
         "curve_every": P["curve_every"] if main else P["steps"], "max_new_tokens": P["max_new_tokens"],
         "num_samples": P["num_samples"], "fields": fields, "segment_len": P["segment_len"],
         "start_heldout": scores["heldout"], "region_pairs": str(work / start / "pairs.json") if main else None}
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:10]
    s.update(out=str(work / name), sapo_dir=str(work / name / "sapo"), score_test=main,
             result=str(work / name / f"result-{key}.json"))
    return s


def next_sweep_runs(P: dict, grid_scores: dict, arm: str) -> list[tuple[float, int]]:
    """(lr, sweep seed) runs the sweep of one arm still needs, given its held-out exact match so far
    ({lr: {seed: em}}): the first grid; then one ladder step past an edge the best sits on, unless the ladder
    ends there; then, if the best two lrs are closer than `noise`, both at the other sweep seeds."""
    first = P["sweep_seeds"][0]
    grid = P["first_grid"]["nll" if arm in WITH_NLL else "no_nll"]
    if len(P["ladder"]) == 1:           # nothing to choose between (--quick): no sweep runs
        return []
    todo = [(lr, first) for lr in grid if first not in grid_scores.get(lr, {})]
    if todo:
        return todo
    tried = sorted(lr for lr in grid_scores if lr != "start")
    best = max(tried, key=lambda lr: (grid_scores[lr][first], -lr))
    ladder = P["ladder"]
    i = ladder.index(best)
    if best == tried[0] and i > 0:
        return [(ladder[i - 1], first)]
    if best == tried[-1] and i < len(ladder) - 1:
        return [(ladder[i + 1], first)]
    ranked = sorted(tried, key=lambda lr: (grid_scores[lr][first], -lr), reverse=True)
    if len(ranked) > 1 and grid_scores[ranked[0]][first] - grid_scores[ranked[1]][first] < P["noise"]:
        return [(lr, s) for lr in ranked[:2] for s in P["sweep_seeds"][1:] if s not in grid_scores[lr]]
    return []


def chosen_lr(P: dict, grid_scores: dict) -> float:
    """The lr with the best mean held-out exact match over the sweep seeds it ran with (the best two have all of
    them where they were close); ties go to the smaller lr."""
    tried = [lr for lr in grid_scores if lr != "start"]
    if not tried:                       # a one-value ladder: that value
        return P["ladder"][0]
    most = max(len(grid_scores[lr]) for lr in tried)
    pool = [lr for lr in tried if len(grid_scores[lr]) == most]
    return max(pool, key=lambda lr: (sum(grid_scores[lr].values()) / most, -lr))


def mechanism_at(P: dict, work: Path, start: str, scores: dict, arms: list[str], path: Path) -> dict:
    """Not a protocol measure, an added look: the regions' moves at one lr for every arm (mechanism_lr, where the
    sweep shows SAPO-DPO falling), from the seed-100 sweep runs' final models on the same held-out pairs. The final
    runs use each arm's chosen lr, at which some arms hardly move. {arm: {region: move}}; cached in `path`."""
    import sapo
    if path.exists():
        return json.loads(path.read_text())
    pairs = json.loads((work / start / "pairs.json").read_text())
    if not pairs or not scores["heldout"].get("regions"):
        return {}
    lr, out = P["mechanism_lr"], {}
    for arm in arms:
        final = work / start / "sweep" / arm.replace(" ", "_") / f"lr{lr:.0e}" / f"seed{P['sweep_seeds'][0]}" / "sapo" / "final"
        if not (final / "config.json").exists():
            continue
        model, tok = sapo.load_model(str(final)), sapo.load_tokenizer(str(final))
        regions = ev.mean_regions(model, pairs, P["segment_len"], tok.pad_token_id)
        out[arm] = {k: regions[k] - scores["heldout"]["regions"][k] for k in REGIONS}
    path.write_text(json.dumps(out, indent=1))
    return out


def mechanism_table(moves: dict, sweeps: dict, lr: float, first_seed: int) -> str:
    lines = [f"Regions moved at one lr for every arm, lr {lr:.0e} (sweep seed {first_seed}; an added look, not a "
             "protocol measure)", "", "| arm | held-out EM % | Δ log π(y+) prefix / span / suffix | "
             "Δ log π(y−) span / suffix |", "|---|---|---|---|"]
    for arm, m in moves.items():
        em = sweeps[arm].get(lr, {}).get(first_seed)
        lines.append(f"| {arm} | {'' if em is None else ev.pct(em)} | {m['chosen_prefix']:+.2f} / "
                     f"{m['chosen_span']:+.2f} / {m['chosen_suffix']:+.2f} | {m['rejected_span']:+.2f} / "
                     f"{m['rejected_suffix']:+.2f} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- tables, figure

def region_moves(runs: list[dict]) -> dict:
    """Per region: the mean over runs of (log-prob at the last curve point - at step 0)."""
    import numpy as np
    out = {}
    for k in REGIONS:
        moves = [r["curve"][-1]["regions"][k] - r["curve"][0]["regions"][k] for r in runs
                 if r["curve"][-1].get("regions") and r["curve"][0].get("regions")]
        out[k] = float(np.mean(moves)) if moves else None
    return out


def table_rows(runs: list[dict], arms: list[str], n_boot: int, start_exact: str) -> list[dict]:
    """One row per arm over its seeds: test exact match, paired intervals against continued SFT and SAPO-DPO
    (over the seeds both have), and against the start itself (every seed against the one start model)."""
    import numpy as np
    by = {(r["method"], r["seed"]): r for r in runs}
    seeds_of = {m: sorted(s for (mm, s) in by if mm == m) for m in arms}
    rng, rows = random.Random(0), []
    for m in arms:
        rs = [by[(m, s)] for s in seeds_of[m]]
        if not rs:
            continue
        em = [r["test"]["exact_match"] for r in rs]
        row = {"method": m, "lr": rs[0]["lr"], "seeds": seeds_of[m], "test_exact_match": float(np.mean(em)),
               "test_exact_match_sd": float(np.std(em, ddof=1)) if len(em) > 1 else 0.0,
               "heldout_exact_match": float(np.mean([r["curve"][-1]["exact_match"] for r in rs])),
               "identical_negatives": (float(np.mean([np.mean(r["identical_per_step"]) for r in rs]))
                                       if all(r["identical_per_step"] for r in rs) else None),
               "regions_moved": region_moves(rs), "train_s": float(np.mean([r["train_s"] for r in rs]))}
        start_bits = [int(c) for c in start_exact]
        a = [[int(c) for c in r["test_exact"]] for r in rs]
        row["vs_start"] = ev.paired_bootstrap(a, [start_bits] * len(rs), n_boot, rng)
        for base in COMPARED_WITH:
            common = [s for s in seeds_of[m] if s in seeds_of.get(base, [])]
            if base != m and common:
                a = [[int(c) for c in by[(m, s)]["test_exact"]] for s in common]
                b = [[int(c) for c in by[(base, s)]["test_exact"]] for s in common]
                row[f"vs_{base}"] = {**ev.paired_bootstrap(a, b, n_boot, rng), "seeds": common}
                row[f"vs_{base}_seeds"] = ev.paired_bootstrap(a, b, n_boot, rng, seeds_too=True)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], start: dict, title: str) -> str:
    pct = ev.pct

    def vs(r, key):
        if key not in r:
            return "—"
        d, (lo, hi) = r[key]["diff"], r[key]["ci95"]
        return f"{pct(d, True)} [{pct(lo, True)}, {pct(hi, True)}]"

    def moved(r, k):
        v = r["regions_moved"][k]
        return "—" if v is None else f"{v:+.2f}"
    lines = [f"**{title}**", "",
             "| arm | lr | test exact match % (sd) | vs the start, points [CI problems] | vs continued SFT, points "
             "[CI problems] [CI seeds+problems] | vs SAPO-DPO, points [CI problems] | held-out EM % | "
             "identical negatives % | Δ log π(y+) prefix / span / suffix | Δ log π(y−) span / suffix | train s/run |",
             "|" + "---|" * 11,
             f"| start | | {pct(start['exact_match'])} | | | | {pct(start['heldout']['exact_match'])} | | | | |"]
    for r in rows:
        seeds_ci = (f" [{pct(r['vs_sft_seeds']['ci95'][0], True)}, {pct(r['vs_sft_seeds']['ci95'][1], True)}]"
                    if "vs_sft_seeds" in r else "")
        ident = "—" if r["identical_negatives"] is None else pct(r["identical_negatives"])
        n = len(r["seeds"])
        lines.append(f"| {r['method']} ({n} seed{'s' * (n > 1)}) | {r['lr']:.0e} | {pct(r['test_exact_match'])} "
                     f"({pct(r['test_exact_match_sd'])}) | {vs(r, 'vs_start')} | {vs(r, 'vs_sft')}{seeds_ci} | "
                     f"{vs(r, 'vs_sapo-dpo')} | "
                     f"{pct(r['heldout_exact_match'])} | {ident} | {moved(r, 'chosen_prefix')} / "
                     f"{moved(r, 'chosen_span')} / {moved(r, 'chosen_suffix')} | {moved(r, 'rejected_span')} / "
                     f"{moved(r, 'rejected_suffix')} | {r['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def sweep_table(sweeps: dict, chosen: dict, start: str, unfinished=()) -> str:
    """unfinished: arms whose sweep still needed runs (an interrupted command): no lr is chosen for them."""
    lrs = sorted({lr for grid in sweeps.values() for lr in grid if lr != "start"})
    note = f"; unfinished, no lr chosen: {', '.join(unfinished)}" if unfinished else ""
    lines = [f"Held-out exact match % after the last step, {start} (sweep seeds: mean over those run; chosen in "
             f"bold{note})", "", "| arm | " + " | ".join(f"lr {lr:.0e}" for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for arm, grid in sweeps.items():
        cells = []
        for lr in lrs:
            if lr not in grid:
                cells.append("")
                continue
            vals = list(grid[lr].values())
            text = ev.pct(sum(vals) / len(vals)) + (f" (n={len(vals)})" if len(vals) > 1 else "")
            cells.append(f"**{text}**" if arm not in unfinished and lr == chosen.get(arm) else text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(by_start: dict, mechanism: dict, arms: list[str], path: Path, title: str, mechanism_lr: float):
    """Per start with final runs: held-out exact match per step (mean over seeds); how far each region of y+ and
    y- moved in the final runs (each arm at its chosen lr); and the same at one lr for every arm (the sweep)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    shown = {s: v for s, v in by_start.items() if v[0]}
    fig = Figure(figsize=(19, 5.2 * len(shown)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shown), 3, squeeze=False)
    colors = dict(zip(arms, ["black", "tab:red", "tab:orange", "tab:purple", "tab:blue", "tab:cyan", "tab:green"]))

    def bars(ax, names, moves, what):
        width, x = 0.8 / len(REGIONS), np.arange(len(names))
        for j, k in enumerate(REGIONS):
            ax.bar(x + j * width, [moves[n][k] or 0.0 for n in names], width, label=k.replace("_", " "))
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(x + 0.4 - width / 2, names, rotation=20, fontsize=8)
        ax.set_ylabel("Δ log-prob from the start, nats (mean over pairs)")
        ax.set_title(what, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    for (start, (runs, rows, scores)), (ax, bx, cx) in zip(shown.items(), axes):
        for m in arms:
            rs = [r for r in runs if r["method"] == m]
            if not rs:
                continue
            steps = [p["step"] for p in rs[0]["curve"]]
            ys = np.array([[p["exact_match"] for p in r["curve"]] for r in rs]) * 100
            ax.plot(steps, ys.mean(0), color=colors[m], label=m, lw=2 if m in COMPARED_WITH else 1.3)
        ax.axhline(scores["heldout"]["exact_match"] * 100, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{start}: held-out exact match (mean over seeds), each arm at its chosen lr", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        bars(bx, [r["method"] for r in rows], {r["method"]: r["regions_moved"] for r in rows},
             f"{start}: regions moved, last step minus start (final runs, chosen lrs)")
        if mechanism.get(start):
            bars(cx, list(mechanism[start]), mechanism[start],
                 f"{start}: regions moved at lr {mechanism_lr:.0e} for every arm (sweep seed)")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ----------------------------------------------------------------------------- the pipeline

def main(argv=None) -> int:
    parser = ev.pipeline_parser(__doc__, "repairs")
    parser.add_argument("--starts", nargs="+", choices=list(FULL["starts"]), help="a subset of the starts")
    args = parser.parse_args(argv)
    P = dict(QUICK if args.quick else FULL)
    if args.seeds:
        P["seeds"] = args.seeds
    jobs = args.jobs if args.jobs is not None else (0 if args.quick else 2)
    starts = args.starts or list(P["starts"])
    arms = list(ARMS)
    work = Path(args.work_dir or ROOT / "runs" / ("repairs-quick" if args.quick else "repairs"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{(time.perf_counter() - t_start) / 60:5.1f} min] {msg}", flush=True)

    import torch
    torch.set_num_threads(1 if jobs else 2)
    data = work / "data"
    files = ev.write_data(P, data)
    scores = {}
    for start in starts:
        if args.report_only and not (work / start / "scores.json").exists():
            continue
        info = train_start(P, start, work, data, log)
        pairs = region_pairs(P, info["model"], data, work / start / "pairs.json")
        scores[start] = {**start_scores(P, info, files, pairs, work / start / "scores.json"),
                         "model_dir": info["model"], "info": info, "n_pairs": len(pairs)}
        log(f"start {start}: {info['steps']} SFT steps, held-out exact match "
            f"{scores[start]['heldout']['exact_match']:.3f}, test {scores[start]['exact_match']:.3f}; "
            f"{len(pairs)} region pairs")
    # sweeps: rounds over every (start, arm) until none needs a run
    sweeps = {s: {a: {"start": scores[s]["heldout"]["exact_match"]} for a in arms} for s in scores}
    while True:
        specs = []
        for s in scores:
            for a in arms:
                for lr, seed in next_sweep_runs(P, sweeps[s][a], a):
                    spec = make_spec(P, work, data, s, scores[s], a, seed, lr, "sweep")
                    if args.report_only and not Path(spec["result"]).exists():
                        continue
                    specs.append(spec)
        if not specs:
            break
        log(f"sweep round: {len(specs)} runs")
        results = ([json.loads(Path(sp["result"]).read_text()) for sp in specs] if args.report_only
                   else ev.run_all(specs, jobs, log))
        for sp, r in zip(specs, results):
            sweeps[sp["start_name"]][sp["method"]].setdefault(sp["lr"], {})[sp["seed"]] = r["curve"][-1]["exact_match"]
        if args.report_only and all(not next_sweep_runs(P, sweeps[s][a], a) for s in scores for a in arms):
            break
    unfinished = {s: [a for a in arms if next_sweep_runs(P, sweeps[s][a], a)] for s in scores}
    chosen = {s: {a: chosen_lr(P, sweeps[s][a]) for a in arms if a not in unfinished[s]
                  and (len(sweeps[s][a]) > 1 or len(P["ladder"]) == 1)} for s in scores}
    for s in chosen:
        log(f"chosen lr, {s}: " + ", ".join(f"{a} {lr:.0e}" for a, lr in chosen[s].items()))
    # the runs
    main_specs = [make_spec(P, work, data, s, scores[s], a, seed, chosen[s][a], "runs")
                  for seed in P["seeds"] for s in scores for a in arms if a in chosen[s]]
    log(f"runs: {len(main_specs)}")
    if args.report_only:
        runs = [json.loads(Path(sp["result"]).read_text()) for sp in main_specs if Path(sp["result"]).exists()]
        log(f"report only: {len(runs)} of {len(main_specs)} runs finished")
    else:
        runs = ev.run_all(main_specs, jobs, log)
    mechanism = {s: mechanism_at(P, work, s, scores[s], arms, work / s / "mechanism.json") for s in scores}
    by_start, tables = {}, {}
    for s in scores:
        rs = [r for r in runs if r.get("start") == s]
        rows = table_rows(rs, arms, P["n_bootstrap"], scores[s]["exact"])
        by_start[s] = (rs, rows, scores[s])
        tables[s] = rows
    minutes = (time.perf_counter() - t_start) / 60
    command = "python bench/repairs.py" + (" --quick" if args.quick else "") + (
        f" --seeds {' '.join(map(str, P['seeds']))}" if args.seeds else "")
    strip = ("exact", "model_dir", "info")
    result = {"command": command, "machine": ev.machine(), "report_only": args.report_only,
              "minutes": None if args.report_only else round(minutes, 1),
              "protocol": {**P, "arms": ARMS, "chosen_lr": {s: {a: lr for a, lr in c.items()} for s, c in
                                                             chosen.items()}, "sapo_fixed": ev.SAPO_FIXED},
              "starts": {s: {**{k: v for k, v in sc.items() if k not in strip}, "info": sc["info"],
                             "test_exact": sc["exact"]} for s, sc in scores.items()},
              "sweeps": {s: {a: {str(lr): v for lr, v in g.items()} for a, g in sw.items()}
                         for s, sw in sweeps.items()}, "sweeps_unfinished": unfinished,
              "tables": tables, "mechanism": mechanism, "runs": [{k: v for k, v in r.items() if k != "negatives"} for r in runs]}
    (out / "repairs.json").write_text(json.dumps(result, indent=1))
    made = (f"Runs of `{command}`; this report rebuilt from them by `--report-only` ({ev.machine()})"
            if args.report_only else f"Command: `{command}` ({minutes:.0f} min; {ev.machine()})")
    text = [made, ""]
    for s in scores:
        info = scores[s]["info"]
        text += [markdown_table(tables[s], scores[s], f"{s}: {info['steps']} SFT steps from the random model"), "",
                 sweep_table({a: g for a, g in sweeps[s].items()}, chosen[s], s, unfinished[s]), ""]
        if mechanism[s]:
            text += [mechanism_table(mechanism[s], sweeps[s], P["mechanism_lr"], P["sweep_seeds"][0]), ""]
    (out / "repairs.md").write_text("\n".join(text))
    if runs:
        figure(by_start, mechanism, arms, out / "repairs.png",
               f"3-digit addition: SAPO-DPO and its repairs, {P['steps']} steps x {P['batch_size']} prompts",
               P["mechanism_lr"])
        if not args.quick and out.resolve() == (ROOT / "bench" / "results").resolve():
            shutil.copy(out / "repairs.png", ROOT / "docs" / "repairs.png")
    print("\n".join(text))
    log(f"wrote {out / 'repairs.json'}, {out / 'repairs.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
