"""Peak host memory (RSS) of the recipe on 2 gloo processes, against scale/memory.py's estimate.

    python -m scale.measure_memory /tmp/sapo_mem                          # mid: 231 M parameters, ~15 min on 2 cores
    python -m scale.measure_memory /tmp/sapo_mem --shape small --steps 2  # 55 M, a few minutes (what the tests run)
    python -m scale.measure_memory /tmp/sapo_mem --shape tiny             # the tiny model, ~1 min

Writes the model (scale/tiny.py's SHAPES) unless OUTPUT_FOLDER/model exists, and runs, on 2 processes, bf16-mixed
SAPO-DPO, 2 prompts per process, steps optimizer steps (default 3):
  1. with FSDP mixed precision (the default),        save at the last step
  2. without it (fsdp_mixed_precision=False: fp32 all-gathers under autocast, as torchtune's shard_model)
  3. a resume of run 1 from its step max_steps - 1, to the same last step
and prints one JSON line per run: the recipe's own measurements (memory/runtime_rss_gib before any model,
memory/setup_peak_rss_gib while loading, memory/peak_rss_gib while training; each the largest over the processes;
the training peak excludes setup: VmHWM is reset when training starts) and scale/memory.py's estimate for the
longest batch the run saw (shape/max_tokens, shape/max_response) with the run's own runtime RSS.
Measured figures depend on the machine; scale/README.md records the output with the machine it ran on.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_config(out: Path, model_dir: Path, shape: str, **overrides) -> Path:
    from omegaconf import OmegaConf
    from scale import tiny
    cfg = OmegaConf.load(ROOT / "scale" / "configs" / "tiny_cpu.yaml")
    model, vocab = tiny.SHAPES[shape]
    cfg.model = {"_component_": "torchtune.models.llama3.llama3", "vocab_size": vocab, **model}
    cfg.update({"model_dir": str(model_dir), "dtype": "bf16-mixed", "num_samples": 0, **overrides})
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    return out / "config.yaml"


def tune_run(config: Path, nproc: int, **overrides) -> None:
    tune = Path(sys.executable).with_name("tune")
    cmd = [str(tune) if tune.exists() else "tune", "run", "--nproc_per_node", str(nproc), "scale/sapo_recipe.py",
           "--config", str(config)] + [f"{k}={v}" for k, v in overrides.items()]
    p = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(p.stdout + p.stderr)[-4000:]}")


def summarize(name: str, run: Path, config: Path, nproc: int, first_step: int = 1, **overrides) -> dict:
    from omegaconf import OmegaConf
    from scale import memory
    lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
    mine = [m for m in lines if m["step"] >= first_step]
    first = mine[0]
    T, R = max(m["shape/max_tokens"] for m in mine), max(m["shape/max_response"] for m in mine)
    runtime = first["memory/runtime_rss_gib"]
    cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.create(overrides))   # the run's own overrides
    est = memory.estimate(cfg, nproc, seq_len=T, response_len=R, runtime_gib=runtime)
    train_peak = max(m["memory/peak_rss_gib"] for m in mine) * 2**30
    return {"run": name, "nproc": nproc, "T": T, "R": R, "runtime_gib": round(runtime, 3),
            "setup_peak_gib": round(first["memory/setup_peak_rss_gib"], 3),
            "train_peak_gib": round(train_peak / 2**30, 3), "estimate_gib": round(est["peak"] / 2**30, 3),
            "estimate_phase": est["peak_phase"], "estimate_error": round(est["peak"] / train_peak - 1, 3),
            "state_gib": round(est["state_on_device"] / 2**30, 3)}


def main(argv=None) -> int:
    import argparse
    from scale import tiny
    ap = argparse.ArgumentParser(prog="python -m scale.measure_memory")
    ap.add_argument("output_folder")
    ap.add_argument("--shape", choices=sorted(tiny.SHAPES), default="mid")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=384, help="prompt + y+ tokens (shorter: faster; examples that "
                    "do not fit are skipped)")
    a = ap.parse_args(argv)
    out, steps = Path(a.output_folder), a.steps
    if steps < 2:
        print("error: --steps must be >= 2 (the resume starts from step steps - 1)", file=sys.stderr)
        return 2
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").exists():
        model, vocab = tiny.SHAPES[a.shape]
        tiny.make_tiny_llama3(model_dir, model=model, vocab_size=vocab, initializer_range=0.1 if a.shape == "tiny" else 0.02)
    common = dict(max_steps=steps, batch_size=2, gradient_accumulation_steps=1, save_every_n_steps=1,
                  keep_last_n_checkpoints=2, top_k=50, max_length=a.max_length,
                  max_prompt_length=min(256, a.max_length - 56))
    config = write_config(out, model_dir, a.shape, **common)
    results = []
    for name, extra in (("fsdp_mixed_precision", {}), ("no_fsdp_mixed_precision", {"fsdp_mixed_precision": False})):
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        tune_run(config, 2, output_dir=run, **extra)
        results.append(summarize(name, run, config, 2, **extra))
        print(json.dumps(results[-1]), flush=True)
    # resume run 1 from its step (steps - 1): a copy without the last checkpoint
    src, run = out / "fsdp_mixed_precision", out / "resume"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(src, run)
    for name in ("policy", "ema", "ref"):
        shutil.rmtree(run / name / f"epoch_{steps}", ignore_errors=True)
    (run / "recipe_state" / f"step_{steps}.pt").unlink()
    tune_run(config, 2, output_dir=run, resume_from_checkpoint=True)
    results.append(summarize("resume", run, config, 2, first_step=steps))
    print(json.dumps(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
