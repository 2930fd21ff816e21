"""SIGTERM / SIGINT at random moments of a tiny real run, each resumed and compared bit for bit with an
uninterrupted run (issue 15; tests/test_preemption.py checks a few such points in CI, this sweeps 20).

    python bench/preempt_sweep.py [--points 20] [--seed N] [--jobs 2] [--max-steps 8]

Each point: a signal (SIGTERM and SIGINT alternate) at a random moment: once metrics.jsonl has k lines
(k = 0..max-steps, 0 = during setup, once the lock file is there), plus a random delay of up to about a step, so it
lands anywhere in a step (generation, loss, optimizer step, logging, checkpoint). The run must exit 143 / 130 with
one line naming the checkpoint and `--resume` (or 0 if the signal came after the last step), with no traceback and
no lock left; `--resume` must then end with final weights (safetensors, bit for bit), metrics.jsonl (less the
timing keys) and samples.jsonl equal to the uninterrupted run's. Prints a table and one result line.
Runs are tiny Llamas (tests/conftest.py) on one CPU thread each.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time/step_s", "gen/tokens_per_s")          # wall-clock measures: the only keys allowed to differ
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ROWS = [{"prompt": f"How do I brew tea number {i}?", "chosen": "Pour hot water over the leaves, wait three minutes, "
         "then remove them."} for i in range(16)]
STOPPED = re.compile(r"stopped at step (\d+); checkpoint (\S+); resume with the same command plus --resume")


def tiny_inputs(work: Path) -> tuple[Path, Path]:
    """A tiny Llama (the tests' fixture) and a 16-row dataset."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_llama, write_jsonl
    model = work / "tiny_llama"
    if not (model / "config.json").exists():
        make_tiny_llama(model)
    return model, write_jsonl(work / "d.jsonl", ROWS)


def common_args(model: Path, data: Path, max_steps: int, save_steps: int = -1) -> list:
    """--save-steps -1 by default: the only checkpoint a resume can use is the one the signal wrote."""
    return ["--model", model, "--dataset", data, "--max-steps", max_steps, "--batch-size", 2, "--lr", 1e-3,
            "--segment-len", 6, "--eval-size", 2, "--ref-update-steps", 3, "--save-steps", save_steps,
            "--keep-checkpoints", 2]


def start(args: list, log: Path, script: Path = ROOT / "sapo.py", env: dict | None = None) -> subprocess.Popen:
    """sapo.py (or a driver script) in a subprocess; stdout to <log>.out, stderr to <log>.err."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, str(script), *map(str, args)], env={**ENV, **(env or {})},
                                cwd=str(ROOT), stdout=out, stderr=err)


def run(args: list, log: Path, timeout: float = 900) -> int:
    return start(args, log).wait(timeout=timeout)


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_until(proc: subprocess.Popen, ready, timeout: float = 900) -> bool:
    """Poll until ready() (True) or the process has exited (False)."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def metrics_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def differences(ref: Path, out: Path) -> list[str]:
    """What differs between two finished runs: final weights (bit for bit), metrics (less timing), samples, the
    before/after held-out measures. [] when the runs are the same."""
    import torch
    from safetensors.torch import load_file
    found = []
    if not (out / "final" / "model.safetensors").exists():
        return ["no final/model.safetensors"]
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (ref, out))
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        found.append("final weights")
    if metrics_rows(ref) != metrics_rows(out):
        found.append("metrics.jsonl")
    if (ref / "samples.jsonl").read_text() != (out / "samples.jsonl").read_text():
        found.append("samples.jsonl")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (ref, out))
    if (sa["before"], sa["after"]) != (sb["before"], sb["after"]):
        found.append("summary before/after")
    return found


def interrupt(args: list, out: Path, signum: int, at_lines: int, delay: float) -> dict:
    """Start a run into `out`, signal it once metrics.jsonl has `at_lines` lines (0: once the lock is taken, in
    setup) plus `delay` seconds; report what it did."""
    proc = start(args + ["--output-dir", out], out.with_suffix(""))
    reached = wait_until(proc, (lambda: lines(out / "metrics.jsonl") >= at_lines) if at_lines
                         else (lambda: (out / ".lock").exists()))
    time.sleep(delay)
    sent = reached and proc.poll() is None
    if sent:
        proc.send_signal(signum)
    rc = proc.wait(timeout=900)
    err = Path(f"{out.with_suffix('')}.err").read_text()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    m = STOPPED.search(last)
    stopped = ("setup" if "stopped during setup" in last else int(m.group(1)) if m else
               "finished" if rc == 0 else "?")
    problems = []
    if not sent:                              # the run was over before the moment came: nothing was tested
        stopped = "not sent"
    if rc != (0 if stopped in ("finished", "not sent") else 128 + signum):
        problems.append(f"exit status {rc}")
    if "Traceback" in err or "KeyboardInterrupt" in err:
        problems.append("a traceback")
    if (out / ".lock").exists():
        problems.append("lock left")
    if m and Path(m.group(2)).name != f"step-{int(m.group(1)):08d}":
        problems.append("the checkpoint named is not this step's")
    return {"signal": signal.Signals(signum).name, "at": at_lines, "delay": delay, "rc": rc, "stopped": stopped,
            "last_line": last, "problems": problems, "lines_before_resume": lines(out / "metrics.jsonl")}


def point(i: int, rnd: random.Random, args: list, work: Path, ref: Path, max_steps: int, step_s: float) -> dict:
    signum = (signal.SIGTERM, signal.SIGINT)[i % 2]
    at = rnd.randint(0, max_steps)
    delay = rnd.uniform(0, 1.0 if at == 0 else 1.5 * step_s)
    out = work / f"p{i:02d}"
    r = interrupt(args, out, signum, at, delay)
    r["point"] = i
    kept = metrics_rows(out) if (out / "metrics.jsonl").exists() else []
    if kept != metrics_rows(ref)[: len(kept)]:
        r["problems"].append("metrics written before the signal differ")
    if r["stopped"] not in ("finished", "not sent"):
        r["resume_rc"] = run(args + ["--output-dir", out, "--resume"], out.with_name(out.name + "-resume"))
        if r["resume_rc"] != 0:
            r["problems"].append(f"resume exit status {r['resume_rc']}")
    r["problems"] += differences(ref, out)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    ap.add_argument("--jobs", type=int, default=2, help="points run at a time (each run uses one CPU thread)")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else time.time_ns() % 1_000_000
    work = Path(a.workdir or tempfile.mkdtemp(prefix="preempt_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = tiny_inputs(work)
    args = common_args(model, data, a.max_steps)
    ref = work / "reference"
    t0 = time.time()
    if run(args + ["--output-dir", ref, "--overwrite"], work / "reference") != 0:
        print((work / "reference.err").read_text(), file=sys.stderr)
        return 1
    step_s = sum(json.loads(x)["time/step_s"] for x in (ref / "metrics.jsonl").read_text().splitlines()) / a.max_steps
    print(f"seed {seed}; {a.points} points; runs in {work}; uninterrupted run {time.time() - t0:.0f} s "
          f"({step_s:.3f} s per step)", flush=True)
    rnd = random.Random(seed)
    plan = [random.Random(rnd.random()) for _ in range(a.points)]
    print(f"{'#':>3} {'signal':7} {'after line':>10} {'delay s':>8} {'exit':>5} {'stopped at':>10} {'resume':>6}  "
          "result")
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(pool.map(lambda i: point(i, plan[i], args, work, ref, a.max_steps, step_s), range(a.points)))
    for r in results:
        print(f"{r['point']:>3} {r['signal']:7} {r['at']:>10} {r['delay']:>8.3f} {r['rc']:>5} {r['stopped']!s:>10} "
              f"{r.get('resume_rc', '-')!s:>6}  {'bit-identical' if not r['problems'] else '; '.join(r['problems'])}")
    ok = sum(not r["problems"] for r in results)
    kinds = {k: sum(r["signal"] == k for r in results) for k in ("SIGTERM", "SIGINT")}
    where = {"setup": sum(r["stopped"] == "setup" for r in results),
             "a step": sum(isinstance(r["stopped"], int) for r in results),
             "after the last step": sum(r["stopped"] == "finished" for r in results),
             "never (the run was over first)": sum(r["stopped"] == "not sent" for r in results)}
    print(f"result: {ok}/{len(results)} points bit-identical to the uninterrupted run after --resume "
          f"({kinds['SIGTERM']} SIGTERM, {kinds['SIGINT']} SIGINT; stopped in setup {where['setup']}, after "
          f"a step {where['a step']}, after the last step {where['after the last step']}, not signalled "
          f"{where['never (the run was over first)']}; seed {seed}; "
          f"{time.time() - t0:.0f} s)")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
