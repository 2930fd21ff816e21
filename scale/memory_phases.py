"""Peak host memory (RSS) of the recipe phase by phase, on each process: what scale/memory.py's components are
checked against, and where a CPU run's RSS goes beyond them.

    python -m scale.measure_memory /tmp/mm_small --shape small --steps 2 --max-length 192   # writes the model, config
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 scale/memory_phases.py \\
        --config /tmp/mm_small/config.yaml output_dir=/tmp/mm_phases [--trim]

runs the config's training (as `tune run`) with marks around each piece of a step (EMA update, generation,
reference forward, policy forward, backward + clip, optimizer step, checkpoint save) and at setup's stages (imports,
gloo, tokenizer + data, models, optimizer + shared-prefix check). At each mark it records the peak RSS since the
previous mark (VmHWM, then reset) and the RSS now, and prints one JSON line per process: [[mark, peak GB, RSS GB,
RSS after trim GB], ...], and each mark as it happens once the process group is up. GB = 10^9 bytes. With --trim, glibc's malloc_trim(0) runs at every mark: RSS after
it is what live tensors (and the process baseline) hold; the difference is memory the allocator keeps for reuse.
"""
from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TRIM = "--trim" in sys.argv
if TRIM:
    sys.argv.remove("--trim")


def _rss(field: str = "VmRSS") -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


ROWS: list = []
_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def mark(name: str) -> None:
    now = _rss()
    if TRIM and _libc is not None:
        _libc.malloc_trim(0)
    ROWS.append([name, round(_rss("VmHWM"), 3), round(now, 3), round(_rss(), 3)])
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
    R.init_distributed(cfg)
    mark("gloo process group")
    recipe = R.SAPORecipe(cfg)
    setup_models = recipe._setup_models

    def models(*a, **k):
        mark("setup: tokenizer, data")
        out = setup_models(*a, **k)
        mark("setup: models built (full state dicts read one at a time)")
        return out
    recipe._setup_models = models
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
