"""Checkpoints: written atomically (a temp folder, fsync, rename), verified by a manifest of hashes, resumed
exactly (weights, optimizer, scheduler, every random stream, and the state the caller declares)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch

from sapo_utils.errors import UserError


def sha256_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (a manifest entry; scale/'s sharded checkpoints use it too)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk, so that a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def assert_finite(models: dict) -> None:
    """NaN or inf weights are never written."""
    for name, model in models.items():
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise UserError(f"{name} weights hold NaN/inf values; not saving them (the last checkpoint is intact)")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def why(e: BaseException) -> str:
    """What went wrong in a write, in a few words. safetensors and torch.save raise their own types with the OS
    error inside the text ("... (os error 28)") or none at all."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"os error (\d+)", str(e))):
        code = int(m.group(1))
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if code:
        return os.strerror(code)
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def replace_text(path: Path, text: str) -> None:
    """Write a small file whole or not at all (a killed run leaves the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_atomically(final: Path, write, needed: int) -> None:
    """write(tmp) fills a temp folder next to `final`, which then replaces `final` by renames (the previous one
    is set aside until the new one is in place). Not enough space, an unwritable folder, or any error a writer
    raises (OSError; torch.save's RuntimeError and safetensors' SafetensorError, which is how a full disk shows
    there): the temp folder is removed, `final` (if any) is untouched, and a one-line UserError names the folder
    and the bytes needed."""
    from safetensors import SafetensorError
    tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")

    def error(why: str) -> UserError:
        free = _free_bytes(final.parent)
        return UserError(f"{final.parent}: cannot write {final.name}: {why}; it needs about {needed:,} bytes "
                         f"({needed / 1e6:,.1f} MB), {'?' if free is None else f'{free:,}'} bytes free; nothing "
                         "half-written is left and the last checkpoint is intact (free space, then run the same "
                         "command plus --resume)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        free = _free_bytes(final.parent)
        if free is not None and needed > free:
            raise error("not enough free space")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        free = _free_bytes(final.parent)      # measured before the temp folder goes: a full disk shows here
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        reason = why(e)
        raise error("disk full" if reason != "disk full" and free is not None and free < needed // 2 and
                    not isinstance(e, OSError) else reason) from None
    except BaseException:                     # Stopped, KeyboardInterrupt, a bug: no temp folder left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rng_state(rng, device) -> tuple[dict, list]:
    """Every random stream the loop draws from: torch (CPU and CUDA) as tensors, Python's as JSON."""
    version, internal, gauss = rng.getstate()
    tensors = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda_rng"] = torch.cuda.get_rng_state(device)
    return tensors, [version, list(internal), gauss]


def save_checkpoint(ckpt_root: Path, step: int, models: dict, trainer_state: dict, json_state: dict,
                    keep: int) -> Path:
    """checkpoints/step-N/: <name>.safetensors per model, trainer.pt (tensors only: optimizer, scheduler, RNG),
    state.json (everything else the caller declares), manifest.json (sha256 of each file, last)."""
    from safetensors.torch import save_model
    assert_finite(models)
    final = ckpt_root / f"step-{step:08d}"
    tensors = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in trainer_state.items()}

    def write(tmp: Path):
        for name, model in models.items():
            save_model(model, str(tmp / f"{name}.safetensors"))
        torch.save(tensors, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(json_state))
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))

    needed = sum(_tensor_bytes(m.state_dict()) for m in models.values()) + _tensor_bytes(tensors) + (1 << 20)
    for stale in ckpt_root.glob(".tmp-step-*"):   # left by a run killed mid-write (we hold the folder's lock)
        shutil.rmtree(stale, ignore_errors=True)
    _write_atomically(final, write, needed)
    for old in sorted(ckpt_root.glob("step-*"))[:-keep or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None if every file in the manifest is present with its size and hash, else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest.json"
    for name, meta in manifest.items():
        p = path / name
        if not p.is_file() or p.stat().st_size != meta["bytes"] or sha256_file(p) != meta["sha256"]:
            return f"{name} is missing or does not match its manifest"
    return None


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """Newest checkpoint that verifies; broken ones are reported and skipped."""
    for path in sorted(ckpt_root.glob("step-*"), reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        print(f"skipping checkpoint {path}: {problem}", flush=True)
    return None


def load_checkpoint(path: Path, models: dict, trainer_state: dict, rng, device) -> dict:
    """Restore what save_checkpoint wrote: weights into `models`, state dicts into `trainer_state`'s objects, the
    RNG streams; returns state.json for the caller to unpack."""
    from safetensors.torch import load_model as load_weights
    for name, model in models.items():
        load_weights(model, str(path / f"{name}.safetensors"))
    tensors = torch.load(path / "trainer.pt", weights_only=True)  # never unpickles arbitrary objects
    for key, obj in trainer_state.items():
        obj.load_state_dict(tensors[key])
    torch.set_rng_state(tensors["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in tensors:
        torch.cuda.set_rng_state(tensors["cuda_rng"], device)
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state["python_rng"]
    rng.setstate((version, tuple(internal), gauss))
    print(f"resumed from {path} at step {state['step']}", flush=True)
    return state


def save_final(model, tok, out: Path, config_values: list | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer into out/, atomically. config_values [(config, attr, value)] are
    written instead of the live ones (the dropout rates the loop set to 0), so out/ is the user's model as it was."""
    assert_finite({"policy": model})
    config_values = config_values or []
    live = [(c, k, getattr(c, k)) for c, k, _ in config_values]

    def write(tmp: Path):
        try:
            for c, k, v in config_values:
                setattr(c, k, v)
            model.save_pretrained(tmp)
        finally:
            for c, k, v in live:
                setattr(c, k, v)
        tok.save_pretrained(tmp)
    _write_atomically(out, write, _tensor_bytes(model.state_dict()) + (50 << 20))
