"""Peak host memory (RSS) of the recipe phase by phase, on each process: what scale/memory.py's components are
checked against, and where a CPU run's RSS goes beyond them.

    python -m scale.measure_memory /tmp/mm_small --shape small --steps 2 --max-length 192   # writes the model, config
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scale/memory_phases.py \\
        --config /tmp/mm_small/config.yaml output_dir=/tmp/mm_phases [--trim] \\
        [--resume-of /tmp/mm_small/fsdp_mixed_precision]

runs the config's training (as `tune run`) with marks around each piece of a step (EMA update, generation,
reference forward, policy forward, backward + clip, optimizer step, checkpoint save) and at setup's stages (imports,
gloo, tokenizer + data, models, optimizer + shared-prefix check). At each mark it records the peak RSS since the
previous mark (VmHWM, then reset) and the RSS now, and prints one JSON line per process: [[mark, peak GiB, RSS GiB,
RSS after trim GiB, RssAnon GiB, RssFile GiB], ...] (the last two after the trim: anonymous memory, i.e. the heap and
tensors, and file-backed pages, i.e. shared libraries and mmapped checkpoint files, which the kernel can drop), and
each mark as it happens once the process group is up. With resume_from_checkpoint=True (output_dir holding a
checkpoint) setup has marks around each step of the resume: reading the recipe state (mmapped), reading each
model's checkpoint, filling each (sharded) model, the optimizer state. --resume-of RUN: output_dir becomes a copy of
the finished run RUN without its newest checkpoint, resumed from the one before (as scale.measure_memory's third
run: RUN = OUTPUT_FOLDER/fsdp_mixed_precision). GiB = 2^30 bytes. With --trim, glibc's malloc_trim(0) runs at every
mark: RSS after it is what live tensors (and the process baseline) hold; the difference is memory the allocator keeps
for reuse.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TRIM = "--trim" in sys.argv
if TRIM:
    sys.argv.remove("--trim")
RESUME_OF = None
if "--resume-of" in sys.argv:
    i = sys.argv.index("--resume-of")
    RESUME_OF = Path(sys.argv[i + 1])
    del sys.argv[i: i + 2]
    sys.argv.append("resume_from_checkpoint=True")


def copy_for_resume(run: Path, out: Path) -> None:
    """out <- run without its newest checkpoint (weights and recipe state), so that a resume starts at the one before."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run, out)
    newest = max(int(p.stem.split("_")[1]) for p in (out / "recipe_state").glob("step_*.pt"))
    for name in ("policy", "ema", "ref"):
        shutil.rmtree(out / name / f"epoch_{newest}", ignore_errors=True)
    (out / "recipe_state" / f"step_{newest}.pt").unlink()


def _rss(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 2**30
    return float("nan")


ROWS: list = []
_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def mark(name: str) -> None:
    now = _rss()
    if TRIM and _libc is not None:
        _libc.malloc_trim(0)
    ROWS.append([name, round(_rss("VmHWM"), 3), round(now, 3), round(_rss(), 3), round(_rss("RssAnon"), 3),
                 round(_rss("RssFile"), 3)])
    d = sys.modules.get("torch.distributed")
    if d is not None and d.is_initialized():   # as it happens, so that a cut-short run still reports its marks
        print(json.dumps({"rank": d.get_rank(), "mark": ROWS[-1]}), flush=True)
    with open("/proc/self/clear_refs", "w") as fh:   # VmHWM <- VmRSS (Linux >= 4.0)
        fh.write("5")


mark("start (python)")
import torch  # noqa: E402,F401
import torch.distributed as dist  # noqa: E402
from torchtune import config  # noqa: E402

from scale import sapo_recipe as R  # noqa: E402
from scale.fsdp import init_distributed  # noqa: E402

mark("imports (torch, torchtune, the recipe, sapo)")


def _wrap(obj, name: str, label: str) -> None:
    f = getattr(obj, name)

    def g(*a, **k):
        mark(f"(until {label})")
        out = f(*a, **k)
        mark(label)
        return out
    setattr(obj, name, g)


@config.parse
def main(cfg) -> None:
    init_distributed(cfg)
    mark("gloo process group")
    if RESUME_OF is not None:
        if dist.get_rank() == 0:
            copy_for_resume(RESUME_OF, Path(cfg.output_dir))
        dist.barrier()
    recipe = R.SAPORecipe(cfg)
    setup_models = recipe._setup_models

    def models(*a, **k):
        mark("setup: tokenizer, data")
        out = setup_models(*a, **k)
        mark("setup: models built (full state dicts read one at a time)")
        return out
    recipe._setup_models = models
    # inside setup: what a resume reads and fills, one piece at a time
    _wrap(recipe, "_find_checkpoint", "setup: recipe state opened (mmap)")
    build = recipe._build

    def build_one(cfg_model, dtype, trainable, full_sd, *a, **k):
        mark(f"setup: {len(full_sd)}-tensor state dict read ({'policy' if trainable else 'frozen'}, {dtype})")
        out = build(cfg_model, dtype, trainable, full_sd, *a, **k)
        mark(f"setup: model filled ({'policy' if trainable else 'frozen'})")
        return out
    recipe._build = build_one
    _wrap(recipe, "_load_recipe_state", "setup: optimizer state loaded")
    recipe.setup(cfg)
    mark("setup: optimizer, shared-prefix check")
    _wrap(recipe, "_ema_update", "EMA update")
    _wrap(recipe, "_make_negatives", "generation")
    _wrap(recipe, "_reference_logps", "reference forward")
    loss = recipe._loss

    def policy_loss(batch):
        out = loss(batch)
        mark("policy forward")
        return out
    recipe._loss = policy_loss
    _wrap(recipe.optimizer, "step", "optimizer step")      # its "(until ...)" mark: backward, clip, metrics
    _wrap(recipe, "save_checkpoint", "checkpoint save")
    recipe.train()
    mark("end")
    print(json.dumps({"rank": dist.get_rank(), "trim": TRIM, "marks": ROWS}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
