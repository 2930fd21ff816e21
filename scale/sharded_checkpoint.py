"""Resume checkpoints written sharded: each process writes its own part of every model and of the optimizer state
with torch.distributed.checkpoint (DCP, as torchtitan does), so no process gathers a full state dict (at 70B,
process 0 would hold 263 GiB of host RAM to write one). scale/sapo_recipe.py uses it with
`checkpoint_format: sharded`.

    output_dir/checkpoints/step_<N>/
      __<rank>_<i>.distcp   each process's shards (policy, EMA, reference, optimizer state), written by that process
      .metadata             DCP's index of every tensor's pieces, written by process 0
      trainer.pt            what every process holds alike (step, LR schedule, replay buffer, data position, RNG)
      manifest.json         bytes and sha256 of every file above, and the world size that wrote them; written last

Atomic: every process writes into .tmp-step_<N>/, each hashes its own files, process 0 writes the manifest and
renames the folder to step_<N> once every process has finished (a crash leaves a .tmp- folder, never a partial
step_<N>). Verified on load as sapo.py's checkpoints are (sapo_utils.checkpoints.verify_checkpoint: every file of the
manifest present with its size and hash; the processes split the files between them), and the loaded weights are
checked finite on every process. A checkpoint that fails is skipped with one line, and the newest one that passes
is used. DCP stores each tensor with its global shape and the pieces each process wrote, so a resume on another
number of processes reads the pieces its own shards need: any process count works.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sapo_utils.checkpoints import fsync_dir, sha256_file
from sapo_utils.errors import UserError

from scale.fsdp import all_processes


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_finite(state: dict, device) -> bool:
    """Every floating tensor of a (nested) state dict finite, on every process (each checks its own shards)."""
    ok = True
    stack = [state]
    while stack and ok:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, torch.Tensor) and x.is_floating_point():
            local = x.to_local() if isinstance(x, DTensor) else x
            ok = bool(torch.isfinite(local).all())
    return all_processes(ok, device)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (renamed from their temp folder), oldest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def save(root: Path, step: int, state: dict, trainer: dict, device, keep: int) -> Path:
    """Write `state` (model and optimizer state dicts of DTensors / tensors: each process its own shards) and
    `trainer` (replicated; process 0 writes it) as root/step_<step>/, atomically; keep the newest `keep`.
    Raises UserError (one line) where a weight is NaN / inf: nothing is written, the last checkpoint stays."""
    import torch.distributed.checkpoint as dcp
    rank, world = _world()
    if not all_finite(state, device):
        raise UserError(f"step {step}: weights or optimizer state hold NaN/inf values; not saving them (the last "
                        f"checkpoint in {root} is intact)")
    final, tmp = root / f"step_{step}", root / f".tmp-step_{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0:
        torch.save(trainer, tmp / "trainer.pt")
    if world > 1:
        dist.barrier()
    # each process hashes (and fsyncs) the files it wrote; process 0 also the ones it wrote alone
    mine = sorted(p for p in tmp.glob(f"__{rank}_*.distcp"))
    if rank == 0:
        mine += [tmp / ".metadata", tmp / "trainer.pt"]
    entries = {}
    for p in mine:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
        entries[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    gathered = [None] * world
    if world > 1:
        dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    if rank == 0:
        files = {k: v for part in gathered for k, v in part.items()}
        on_disk = {p.name for p in tmp.iterdir()}
        assert set(files) == on_disk, (sorted(on_disk - set(files)), sorted(set(files) - on_disk))
        (tmp / "manifest.json").write_text(json.dumps({"world_size": world, "step": step, "files": files}, indent=1))
        with open(tmp / "manifest.json", "rb") as fh:
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep or None]:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def verify(path: Path, device) -> str | None:
    """None where every file of path's manifest is present with its size and sha256 (the processes split the files
    between them, then agree), else what is wrong, in a few words (the same on every process)."""
    rank, world = _world()
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = sorted(manifest["files"].items())
    except (OSError, ValueError, KeyError):
        return "no readable manifest.json"
    bad = None
    for name, meta in files[rank::world]:
        p = path / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            bad = name
            break
    if all_processes(bad is None, device):
        return None
    # which file: process 0 names its own, or says another process found one
    return f"{bad} is missing or does not match its manifest" if bad else "a file does not match its manifest"


def latest(root: Path, device, say=print) -> Path | None:
    """The newest checkpoint under root that verifies; broken ones are reported (one line each) and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        problem = verify(path, device)
        if problem is None:
            return path
        say(f"skipping checkpoint {path}: {problem}")
    return None


def load(path: Path, state: dict, device) -> dict:
    """Fill `state` (the live models' and optimizer's state dicts, sharded as this run shards them: DCP reads the
    pieces each process's shards need, whatever the process count that wrote them) in place from path; check every
    loaded tensor finite; return the trainer state."""
    import torch.distributed.checkpoint as dcp
    dcp.load(state, checkpoint_id=str(path))
    if not all_finite(state, device):
        raise UserError(f"{path}: the checkpoint's weights or optimizer state hold NaN/inf values (its files match "
                        "their manifest: it was written so); resume from an earlier one")
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
