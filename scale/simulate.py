"""Trace one optimizer step of scale/sapo_recipe.py at full size without a GPU, and compare each phase's peak
memory per process with scale/memory.py's estimate.

    python -m scale.simulate --config scale/configs/llama3_8b_sapo_dpo.yaml --nproc 8         # ~5 min
    python -m scale.simulate --config scale/configs/mistral_7b_sapo_orpo.yaml --nproc 8       # ~5 min
    python -m scale.simulate --config scale/configs/llama3_8b_sapo_dpo_lora.yaml --nproc 1    # ~8 min
    python -m scale.simulate --config scale/configs/tiny_cpu.yaml --nproc 2 --json            # seconds (the tests)
    ... [--prompt-len 32] [key=value overrides, as on `tune run`]
    python -m scale.simulate --report-from trace.json    # a trace saved with --json, against the estimator as it is now

prints, for process 0 of --nproc processes, one row per phase (EMA update, generation, reference forward, policy
forward + backward, optimizer step, checkpoint save):

    phase | traced peak GiB | scale/memory.py GiB | difference % | trace s

Units are GiB (2^30 bytes) on both sides; --json prints the same in
bytes, with each phase's peak broken down by MemTracker category. Exit status: 0; 1 if anything raises during the
trace (a shape, dtype or DTensor/Tensor mix-up in the recipe's code shows up here, traceback on stderr); 2 for a
bad config (the recipe's own check_recipe_config message). Times: 2 CPU cores; decoding G = 256 tokens one fake
forward at a time is most of it.

How
  - Fake tensors: FakeTensorMode gives every tensor a shape, dtype and device but no storage, so an 8B model and
    its activations cost nothing. Memory is what torch.distributed._tools.mem_tracker.MemTracker counts, the bytes
    of every live tensor storage, updated at each allocation and free; a phase's peak is the largest total between
    its start and its end, and includes everything alive (sharded state, gradients, optimizer state).
  - A fake process group of --nproc processes (FakeStore, backend "fake"): this process is rank 0; collectives
    return at once, but every shard, all-gather output and reduce-scatter input has its per-rank shape.
  - The recipe's own code: SAPORecipe.setup (models built on the meta device, sharded by scale/fsdp.py, filled from
    fake state dicts), then SAPORecipe.train for one optimizer step: _ema_update and _refresh_reference,
    _make_negatives (sapo.make_negatives -> torchtune_generate under scale.fsdp.gathered, with the KV cache), per
    micro-batch _loss (_reference_logps; the policy's packed forward and sapo_fast.chunked_token_logps; the
    DPO / ORPO loss) and the backward, guarded_step (clip, optimizer step), save_checkpoint (process 0 gathers full
    state dicts, then the full optimizer state). Phases are cut by wrapping those methods on the recipe object.
  - Steady state: the optimizer state exists before the traced step (a warm-up optimizer step on zero gradients,
    untracked, as step 1 leaves it); the step is SAPO-DPO's reference refresh step (step = ref_update_steps) and the
    run's last, so it refreshes the reference and saves a checkpoint.
  - Data-dependent values (RealIndexMode): token ids, masks, positions and other integer / bool tensors (and what is
    computed from them alone) are real CPU tensors, so a boolean mask selects the positions it really holds; model-sized tensors
    are fake. A scalar read from a fake tensor (loss, gradient norm) is 0: finite, so the optimizer steps; sampled
    tokens are never a stop token, so every segment is G tokens long and decoding runs all G steps (the worst case).
  - Worst-case shapes: synthetic examples of --prompt-len prompt tokens and max_length - prompt-len response tokens.
    Generation: truncation points at their upper bound (randint(a, b) -> b), the longest context. Loss: the buffer
    hands out tuples cut at t = 0 whose y- shares no token with y+, the longest row (x + y+ + y-; past the model's
    max_seq_len the recipe falls back to two rows per tuple, and the estimate is then taken with shared_prefix off).
  - Stand-ins: a tokenizer with the family's special-token ids, a checkpointer that hands out fake bf16 state
    dicts and drops what it is asked to save, torch.save writing empty files in a temporary output_dir, and the
    shared-prefix probe answered as on a GPU (packed rows: torchtune honours mask / input_pos; its numerical check
    cannot run on fake tensors).
  - device: cuda is traced as cpu (fake CUDA tensors need CUDA's SDPA and generators). Kept as on a GPU: the
    optimizer's foreach implementation (torch picks it for CUDA tensors and DTensors, the per-tensor loop on CPU).
    What differs: autocast's CPU op lists (both compute matmuls in bf16; the recipe casts logits to fp32 itself),
    the attention kernel (CPU flash attention, like CUDA's memory-efficient kernel: no T x T weights, the mask
    expanded to a bias), and where the checkpoint's gathered state dicts live (host RAM of process 0 on a GPU; here
    counted with the rest: the table says how large they are).
  - Tracker pitfalls under fake tensors, handled here: DTensor's sharding propagation builds global-shaped fake
    arguments in the active fake mode (the first time it sees an op), which MemTracker / FSDPMemTracker count as
    this rank's allocations; inside optimizer.step they are labelled optimizer state (FSDPMemTracker reports ~26x the
    real state on a 4-layer toy at step 1: the over-count seen before). Given no active fake mode, DTensor makes one
    of its own, as in eager mode, and the tracker leaves its tensors out. What remains in the optimizer phase's
    Optstate category is the state plus the foreach step's temporaries (one state tensor's size), both real.

Estimate: scale.memory.estimate(cfg, nproc, seq_len=max_length, response_len=max_length - prompt-len,
runtime_gib=0) (the trace counts tensors only: no CUDA context or NCCL buffers); each phase's figure is the resident
state (the sharded state without gradients) plus the phase's own term (checkpoint save: checkpoint_host_process0).
On the three 7-8B configs, 8 of Llama-3-8B's layers, Qwen2-7B's shapes and Llama-3.2-1B (tied embeddings) with the
config's variants (no FSDP mixed precision, bf16, fp32, no activation checkpointing, two rows per tuple,
accumulation, no weight gathering for generation, no resharding after forward, ORPO, LoRA on 1 and 2 processes)
every phase came within 10% (scale/README.md; tests/test_scale_simulate.py).

Other models at their real widths, cut to a few layers: the model section `{_component_: scale.simulate.few_layers,
builder: torchtune.models.gemma2.gemma2_9b, num_layers: 2}` (few_layers) builds any torchtune builder's model with
num_layers layers; the tests trace one model of each torchtune 0.6.1 text-decoder family so.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale.memory import GIB, cli_config, load_config  # noqa: E402
PHASES = ("EMA update", "generation", "reference forward", "policy forward + backward", "optimizer step",
          "checkpoint save")
# scale/memory.py's name of each phase's own term
ESTIMATOR_PHASE = {"EMA update": "EMA update", "generation": "generation", "reference forward": "reference forward",
                   "policy forward + backward": "policy forward + backward", "optimizer step": "optimizer step",
                   "checkpoint save": "checkpoint"}
# integer / bool tensors made by factories (arange, zeros, full, eye ...) up to this many elements are real: index
# data. Float factories are always fake, however small: a real float buffer filled by a collective (FSDP's
# reduce-scatter output of a small unit) would keep its uninitialised bytes, since the fake process group copies
# nothing (a NaN gradient norm then skips the optimizer step)
REAL_INT_LIMIT = 2 ** 30


# ---------------------------------------------------------------------------------------------------
# Stand-ins: tokenizer, examples, checkpointer, random draws
# ---------------------------------------------------------------------------------------------------

class StandInTokenizer:
    """The attributes the recipe reads from a torchtune tokenizer once the examples are encoded: pad_id,
    stop_tokens, decode (samples.jsonl). Built by config.instantiate from the config's tokenizer section."""

    def __init__(self, pad_id: int, stop_tokens: list[int], bos_id: int = 0):
        self.pad_id, self.stop_tokens, self.bos_id = int(pad_id), [int(t) for t in stop_tokens], int(bos_id)

    def decode(self, ids, **_) -> str:
        return " ".join(str(i) for i in ids)


def stand_in_tokenizer_cfg(cfg, vocab_size: int) -> dict:
    """The config section of a StandInTokenizer with the special ids of the config's tokenizer family."""
    component = str(cfg.tokenizer.get("_component_", ""))
    if "llama3" in component:
        from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS
        if vocab_size >= max(LLAMA3_SPECIAL_TOKENS.values()) + 1:
            ids = LLAMA3_SPECIAL_TOKENS
        else:   # scale/tiny.py's layout: its special tokens sit at the top of a small vocabulary
            from scale import tiny
            ids = {name: vocab_size - len(tiny.SPECIAL_TOKENS) + i for i, name in enumerate(tiny.SPECIAL_TOKENS)}
        return {"pad_id": ids["<|finetune_right_pad_id|>"], "bos_id": ids["<|begin_of_text|>"],
                "stop_tokens": [ids["<|end_of_text|>"], ids["<|eot_id|>"], ids["<|eom_id|>"]]}
    if "qwen2" in component and vocab_size > 151645:   # <|endoftext|> (pad, stop), <|im_end|> (stop); no BOS
        return {"pad_id": 151643, "bos_id": 151644, "stop_tokens": [151645, 151643]}
    # SentencePiece (Mistral): <unk> 0, <s> 1, </s> 2; torchtune's MistralTokenizer pads with 0
    return {"pad_id": 0, "bos_id": 1, "stop_tokens": [2]}


def content_ids(vocab_size: int, specials: set[int], n: int, offset: int) -> list[int]:
    """n ordinary token ids (no special, pad or stop id): only shapes matter, ids must be valid."""
    lo, hi = 3, min(vocab_size, 128000) - 16
    pool = [i for i in range(lo, min(hi, lo + 4096)) if i not in specials]
    return [pool[(offset + k) % len(pool)] for k in range(n)]


def worst_case_examples(n: int, prompt_len: int, response_len: int, tok: StandInTokenizer, vocab_size: int):
    """n sapo.Examples of prompt_len + response_len tokens; y+ ends with a stop token, as encoded data does."""
    import sapo
    specials = {tok.pad_id, tok.bos_id, *tok.stop_tokens}
    out = []
    for i in range(n):
        x = [tok.bos_id] + content_ids(vocab_size, specials, prompt_len - 1, 7 * i)
        y = content_ids(vocab_size, specials, response_len - 1, 7 * i + 1) + [tok.stop_tokens[0]]
        out.append(sapo.Example(x, y))
    return out


def longest_tuples(examples, n: int, segment_len: int, tok: StandInTokenizer, vocab_size: int):
    """n replay tuples cut at t = 0 whose y- differs from y+ from its first token (no shared prefix): each is one
    packed row of x + y+ + y- tokens, the longest the loss sees."""
    import sapo
    specials = {tok.pad_id, tok.bos_id, *tok.stop_tokens}
    out = []
    for i in range(n):
        e = examples[i % len(examples)]
        G = min(segment_len, len(e.chosen_ids))
        segment = [t for t in content_ids(vocab_size, specials, G + 1, 3) if t != e.chosen_ids[0]][:G]
        y_neg, kept = sapo.splice_negative(e.chosen_ids, 0, G, segment, set(tok.stop_tokens))
        out.append(sapo.preference_tuple(e.prompt_ids, e.chosen_ids, y_neg, 0, kept))
    return out


class UpperBoundRandom(random.Random):
    """The recipe's shared random.Random with randint(a, b) -> b: sapo.truncation_point then cuts y+ as late as
    max_length allows, the longest generation context. Buffer sampling (choices) is unchanged."""

    def randint(self, a, b):
        return b


class StandInCheckpointer:
    """torchtune's FullModelHFCheckpointer as the recipe uses it: load_checkpoint hands out a state dict of fake
    bf16 tensors shaped like the config's model (a fresh dict each call, as the real one reads the files again);
    save_checkpoint drops what it gets (it records the bytes: process 0's gathered state dicts)."""

    def __init__(self, shapes: dict, saved: dict, name: str):
        self.shapes, self.saved, self.name = shapes, saved, name
        self._weight_map = {}

    def load_checkpoint(self) -> dict:
        from torchtune import training
        return {training.MODEL_KEY: {k: torch.empty(s, dtype=torch.bfloat16) for k, s in self.shapes.items()}}

    def save_checkpoint(self, state: dict, epoch: int, **_) -> None:
        tensors = [t for t in tree_flatten(state)[0] if isinstance(t, torch.Tensor)]
        self.saved[self.name] = sum(t.numel() * t.element_size() for t in tensors)


def few_layers(builder: str, num_layers: int):
    """The model of a torchtune model builder (its dotted path, e.g. torchtune.models.gemma2.gemma2_9b) with only
    num_layers layers: the family's own widths, heads, vocabulary, tying, norms and attention. As a config's model
    section, `{_component_: scale.simulate.few_layers, builder: ..., num_layers: 2}`, it traces a family at its real
    widths in seconds (tests/test_scale_simulate.py). The builder's component builders (the functions of its module
    that take num_layers) are called with num_layers replaced."""
    import importlib
    import inspect
    module_name, name = builder.rsplit(".", 1)
    fn = getattr(importlib.import_module(module_name), name)
    home = importlib.import_module(fn.__module__)
    originals = {k: v for k, v in vars(home).items() if inspect.isfunction(v) and v is not fn
                 and "num_layers" in inspect.signature(v).parameters}
    if not originals:
        raise ValueError(f"few_layers: {builder} calls no component builder with num_layers")

    def shortened(component):
        @functools.wraps(component)
        def call(*a, **k):
            return component(*a, **{**k, "num_layers": int(num_layers)})
        return call
    try:
        for k, v in originals.items():
            setattr(home, k, shortened(v))
        return fn()
    finally:
        for k, v in originals.items():
            setattr(home, k, v)


def checkpoint_shapes(cfg_model) -> dict:
    """{key: shape} of the base checkpoint the config's builder loads (LoRA adapters are not in it)."""
    from torchtune import config
    with torch.device("meta"):
        model = config.instantiate(cfg_model)
    return {k.replace("._checkpoint_wrapped_module", ""): tuple(v.shape) for k, v in model.state_dict().items()
            if "lora" not in k and "magnitude" not in k}


# ---------------------------------------------------------------------------------------------------
# Fake tensors with real index data, and the memory tracker
# ---------------------------------------------------------------------------------------------------

def _is_fake(t) -> bool:
    return isinstance(t, FakeTensor)


def _tensors(x, out: list) -> list:
    """The tensors in an op's arguments (lists, tuples, dicts): torch's pytree, minus its cost per op."""
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _tensors(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _tensors(y, out)
    return out


class RealIndexMode(TorchDispatchMode):
    """Sits above FakeTensorMode. Token ids, masks, positions and other integer / bool tensors made from Python
    data are real CPU tensors, and ops on real tensors only run for real, so a boolean
    mask indexes a fake tensor with the positions it really holds (torch's fake mode cannot: the count is
    data-dependent). Model-sized tensors stay fake. A scalar read from a fake tensor returns 0 (the worst case
    for the recipe's checks: not done, finite); generator-driven random fills on fake tensors drop the generator."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._guards import active_fake_mode
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented                      # let DTensor unwrap to its local tensors first
        if active_fake_mode() is not self.fake_mode:   # DTensor's sharding propagation, in a fake mode of its own
            return func(*args, **kwargs)
        flat = _tensors(kwargs, _tensors(args, []))
        fake = [a for a in flat if _is_fake(a)]
        if func is torch.ops.aten._local_scalar_dense.default and fake:
            dtype = args[0].dtype
            return False if dtype == torch.bool else (0.0 if dtype.is_floating_point else 0)
        if fake and "generator" in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
        if not fake:
            # an op on real data (CPU index tensors), or on real meta tensors (models are built on the meta device,
            # as in the recipe: plain meta tensors, which e.g. Module.float() may swap, unlike fake ones): run it.
            # Not when it leaves the meta device (to_empty's empty_like(device=cpu)): that storage stays fake
            where = {a.device.type for a in flat}
            target = kwargs.get("device")
            target = torch.device(target).type if target is not None else None
            if (where == {"cpu"} and target in (None, "cpu")) or (where <= {"meta"} and target == "meta") or \
                    (where == {"meta"} and target is None):
                with unset_fake_temporarily():
                    out = func(*args, **kwargs)
                    if func is torch.ops.c10d.allgather_.default:
                        # the fake process group gathers nothing: every process holds what this one does (the
                        # recipe's all-gathered segments: all of them G tokens long, not uninitialised memory)
                        for outputs, inp in zip(args[0], args[1]):
                            for o in outputs:
                                o.copy_(inp)
                    return out
        if fake and func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                             torch.ops.aten.index_put_.default, torch.ops.aten._unsafe_index.Tensor):
            args = list(args)
            with unset_fake_temporarily():             # real bool masks -> the real positions they hold
                args[1] = [i.nonzero(as_tuple=True) if isinstance(i, torch.Tensor) and not _is_fake(i)
                           and i.dtype == torch.bool else (i,) for i in args[1]]
            args[1] = [j for i in args[1] for j in i]
        out = func(*args, **kwargs)
        if not flat and isinstance(out, torch.Tensor) and out.device.type == "cpu" and \
                not out.dtype.is_floating_point and not out.dtype.is_complex and out.numel() <= REAL_INT_LIMIT:
            with unset_fake_temporarily():             # a factory of index data (arange, zeros, full, eye ...)
                return func(*args, **kwargs)
        return out


def _mem_tracker_class():
    from torch._guards import active_fake_mode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _ModState

    class PhaseTracker(MemTracker):
        """MemTracker's accounting (every live storage, by category) without its per-module statistics, which
        refuse a module called twice in one context (decoding calls the model G + 1 times) and hook gradients of
        frozen parameters. Categories: Parameter, Buffer, Gradient (labelled at phase ends), Activation (made in
        forward), Temp (made in backward, activation recomputation included), Optstate (made inside
        optimizer.step: its temporaries too), Other."""

        def _pre_fw_hook(self, module, inputs):
            pass

        def _post_fw_hook(self, module, inputs, outputs):
            pass

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # MemTracker.__torch_dispatch__, with a cheaper walk over each op's results (it runs on every op)
            if any(t == DTensor for t in types):
                return NotImplemented
            if func is torch.ops._c10d_functional.wait_tensor.default and active_fake_mode():
                res = args[0]     # (MemTracker's note: fake wait_tensor would return a new tensor, eager does not)
            else:
                res = func(*args, **(kwargs or {}))
            if active_fake_mode() is self._fake_mode_on_entry:
                if self._in_opt:
                    reftype = _MemRefType.OPT
                elif self._mod_tracker.is_bw and not self._in_ac:
                    reftype = _MemRefType.TEMP
                else:
                    reftype = _MemRefType.ACT
                for t in _tensors(res, []):
                    self._track(reftype, t)
                self._update_peak_stats(_ModState.PEAK_BW if self._mod_tracker.is_bw else _ModState.PEAK_FW)
            return res

        def total(self) -> int:
            return sum(s.get("Total", 0) for s in self._curr_mem_snap.values())

        def peak(self) -> tuple[int, dict]:
            snap = {}
            for dev_snap in self._peak_mem_snap.values():
                for k, v in dev_snap.items():
                    snap[str(getattr(k, "value", k))] = snap.get(str(getattr(k, "value", k)), 0) + v
            return sum(self._peak_mem.values()), snap

        def reset_peak(self) -> None:
            self._peak_mem_snap = self.get_tracker_snapshot()
            self._peak_mem = {dev: s.get("Total", 0) for dev, s in self._peak_mem_snap.items()}

    return PhaseTracker


class Phases:
    """Cuts the traced step into phases: mark(name) ends the current phase (its peak is the tracker's peak since
    the previous mark) and starts `name`. A phase that recurs (one per micro-batch) keeps its largest peak."""

    def __init__(self, tracker, relabel):
        self.tracker, self.relabel = tracker, relabel
        self.current, self.peaks, self.breakdown, self.start, self.seconds = None, {}, {}, {}, {}
        self.t = time.perf_counter()

    def mark(self, name: str | None) -> None:
        self.relabel()
        now = time.perf_counter()
        if self.current is not None:
            self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self.t
        self.t = now
        if self.current is not None:
            peak, snap = self.tracker.peak()
            if peak >= self.peaks.get(self.current, -1):
                self.peaks[self.current], self.breakdown[self.current] = peak, snap
        self.tracker.reset_peak()
        if name is not None and name not in self.start:
            self.start[name] = self.tracker.total()
        self.current = name

    def wrap(self, obj, attr: str, start: str, end: str | None = None) -> None:
        """obj.attr marks `start` when called and `end` (if given) when it returns."""
        f = getattr(obj, attr)

        @functools.wraps(f)   # (keeps the LR scheduler's mark on optimizer.step)
        def wrapped(*a, **k):
            self.mark(start)
            out = f(*a, **k)
            if end is not None:
                self.mark(end)
            return out
        setattr(obj, attr, wrapped)


# ---------------------------------------------------------------------------------------------------
# The trace
# ---------------------------------------------------------------------------------------------------

def _nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict; a DTensor counts its local shard."""
    total = 0
    for t in tree_flatten(obj)[0]:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def simulate(cfg, nproc: int, prompt_len: int = 32) -> dict:
    """Trace one optimizer step of the recipe on rank 0 of nproc fake processes (see the module docstring).
    cfg: the recipe's config (OmegaConf), overrides applied. Returns bytes: {"phases": {name: peak}, "breakdown":
    {name: {category: bytes at that peak}}, "phase_start", "seconds", "state_bytes", ...}. Raises whatever the
    recipe's code raises."""
    from omegaconf import OmegaConf
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.tensor import _sharding_prop
    from torch.testing._internal.distributed.fake_pg import FakeStore
    import sapo
    from scale import sapo_recipe as R
    from scale.memory import model_shapes

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised: the trace needs its own fake one")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    R.check_recipe_config(cfg)                   # the config as given (device: cuda included) must be valid
    shapes = model_shapes(cfg.model)
    T = int(cfg.max_length)
    if not 1 <= prompt_len <= T - 4:
        raise ValueError(f"prompt_len must be in [1, {T - 4}] (max_length {T}), got {prompt_len}")
    response_len = T - prompt_len
    tok_cfg = stand_in_tokenizer_cfg(cfg, shapes.V)
    tok = StandInTokenizer(**tok_cfg)
    out_dir = tempfile.mkdtemp(prefix="sapo_simulate_")
    on_gpu = str(cfg.device).startswith("cuda")
    cfg.tokenizer = {"_component_": f"{__name__}.StandInTokenizer", **tok_cfg}
    cfg.device, cfg.output_dir, cfg.resume_from_checkpoint = "cpu", out_dir, False
    if on_gpu and "foreach" not in cfg.optimizer:
        # torch's optimizers pick foreach (one temporary per state tensor list) for CUDA tensors and DTensors,
        # the per-tensor loop on CPU: trace what the GPU runs
        cfg.optimizer.foreach = True
    n_examples = 2 * int(cfg.batch_size) * nproc * int(cfg.gradient_accumulation_steps)
    examples = worst_case_examples(n_examples, prompt_len, response_len, tok, shapes.V)
    saved, ckpt_shapes = {}, checkpoint_shapes(cfg.model)

    def checkpointer(self, name, source=None):
        return StandInCheckpointer(ckpt_shapes, saved, name)

    def packing_ok(model, device, tol=1e-4, enabled=True):
        # the probe compares numbers, which fake tensors do not have; torchtune's decoders pass it on a GPU
        model.sapo_shared_prefix = bool(enabled)
        return model.sapo_shared_prefix

    def sharded_save(root, step, state, trainer, device, keep):   # checkpoint_format sharded: nothing written
        saved["sharded (this process's part)"] = _nbytes(state)
        return Path(root) / f"step_{step}"

    def empty_file(obj, f, *a, **k):     # recipe_state/step_N.pt: fake tensors have no bytes to write
        saved["optimizer"] = _nbytes(obj.get("optimizer")) if isinstance(obj, dict) else 0
        Path(f).write_bytes(b"")

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=nproc)
    t0 = time.perf_counter()
    try:
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        # recipe logs go to stderr, so that stdout holds only the table or the JSON
        with contextlib.redirect_stdout(sys.stderr), fake_mode, RealIndexMode(fake_mode), \
                mock.patch.object(R.SAPORecipe, "_checkpointer", checkpointer), \
                mock.patch.object(R, "torchtune_packing_ok", packing_ok), \
                mock.patch.object(sapo, "load_examples", lambda *a, **k: list(examples)), \
                mock.patch.object(torch, "save", empty_file), \
                mock.patch.object(R.sharded_checkpoint, "save", sharded_save), \
                mock.patch.object(_sharding_prop, "detect_fake_mode", lambda *a, **k: None):
            # (DTensor's sharding propagation builds global-shaped fake tensors in the active fake mode, which
            # the tracker cannot tell from this process's own: given none, it makes a fake mode of its own, as
            # in eager mode, and the tracker leaves its tensors out)
            recipe = R.SAPORecipe(cfg)
            recipe.setup(cfg)
            setup_s = time.perf_counter() - t0
            result = _trace_step(recipe, cfg, examples, tok, shapes.V)
            worst = longest_tuples(examples, 1, int(cfg.segment_len), tok, shapes.V)
            result["packed"] = bool(getattr(recipe.policy, "sapo_shared_prefix", False)) and \
                R.longest_segment(worst) <= R.packed_row_limit(recipe.policy)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(out_dir, ignore_errors=True)     # metrics.jsonl, samples.jsonl, empty checkpoint files
    result.update(nproc=nproc, max_length=T, prompt_len=prompt_len, response_len=response_len,
                  traced_device="cpu", config_device="cuda" if on_gpu else "cpu", gathered_state_dicts=saved,
                  setup_s=round(setup_s, 1), wall_s=round(time.perf_counter() - t0, 1))
    return result


def _trace_step(recipe, cfg, examples, tok, vocab_size: int) -> dict:
    """recipe.train() for one optimizer step, after a warm-up that leaves what step 1 leaves (the optimizer state),
    under the tracker, with phase marks around the recipe's methods."""
    from torch.distributed._tools.mem_tracker import _MemRefType
    trainable = [p for p in recipe.policy.parameters() if p.requires_grad]
    # warm-up, untracked: the optimizer's state, as step 1 creates it (zero gradients: only shapes matter)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    recipe.optimizer.step()
    recipe.optimizer.zero_grad(set_to_none=True)
    # the traced step: SAPO-DPO's reference refresh step (its EMA phase then includes the copy), and the run's
    # last, so that it saves a checkpoint
    step = max(1, recipe.ref_every) if cfg.method == "sapo-dpo" and recipe.ref_every > 0 else 1
    recipe.step, recipe.max_steps = step, step + 1
    recipe.rng = UpperBoundRandom(recipe.seed)
    worst = longest_tuples(examples, recipe.global_batch, int(cfg.segment_len), tok, vocab_size)
    recipe.buffer.sample = lambda n, rng: [dict(t) for t in worst[:n]]

    tracker = _mem_tracker_class()()
    models = [recipe.policy] + ([recipe.live] if recipe.lora else []) + \
        [m for m in (recipe.ema, recipe.ref) if m is not None]

    def relabel():   # gradients and optimizer state by their names (the tracker first sees them made as Temp)
        for p in trainable:
            if p.grad is not None:
                tracker._update_and_maybe_create_winfos(p.grad, _MemRefType.GRAD)
        tracker._track_optimizer_states(_MemRefType.OPT, recipe.optimizer)

    phases = Phases(tracker, relabel)
    between = "(between phases)"
    phases.wrap(recipe, "_ema_update", "EMA update")           # and _refresh_reference, called right after it
    phases.wrap(recipe, "_make_negatives", "generation", between)
    phases.wrap(recipe, "_loss", "policy forward + backward")  # until the next mark: backward runs in _step
    if cfg.method == "sapo-dpo":
        phases.wrap(recipe, "_reference_logps", "reference forward", "policy forward + backward")
    phases.wrap(recipe.optimizer, "step", "optimizer step", between)   # guarded_step's clip is before it
    phases.wrap(recipe, "save_checkpoint", "checkpoint save", between)
    tracker.track_external(*models, recipe.optimizer)          # what exists before the step
    relabel()
    state_bytes = tracker.total()
    t0 = time.perf_counter()
    with tracker:
        phases.mark(between)
        recipe.train()
        phases.mark(None)
    if recipe.skipped:   # scalars read from fake tensors are 0: a NaN / inf came from real (index) data
        raise RuntimeError("the traced optimizer step was skipped for a non-finite loss or gradient norm, which "
                           "only real tensors can produce here: the trace has no optimizer phase to report")
    order = [k for k in PHASES if k in phases.peaks]
    return {"phases": {k: phases.peaks[k] for k in order}, "phase_start": {k: phases.start[k] for k in order},
            "breakdown": {k: phases.breakdown[k] for k in order},
            "seconds": {k: round(phases.seconds.get(k, 0.0), 1) for k in order},
            "state_bytes": state_bytes, "optimizer_state_bytes": _nbytes(
                [v for s in recipe.optimizer.state.values() for v in s.values() if getattr(v, "dim", lambda: 0)()]),
            "step_s": round(time.perf_counter() - t0, 1)}


# ---------------------------------------------------------------------------------------------------
# The estimator's figures, and the table
# ---------------------------------------------------------------------------------------------------

def estimator_phases(cfg, nproc: int, seq_len: int, response_len: int, packed: bool = True) -> dict:
    """scale/memory.py's per-process figure for each traced phase, bytes: the resident state on the device plus the
    phase's own term (process 0's gathered state dicts for the checkpoint save). No host
    baseline (the trace counts tensors only). packed: the row layout the recipe chose (False: it fell back to
    two rows per tuple, which the estimator models as shared_prefix: False)."""
    from omegaconf import OmegaConf
    from scale.memory import estimate
    if not packed:
        cfg = OmegaConf.merge(cfg, {"shared_prefix": False})
    e = estimate(cfg, nproc, seq_len=seq_len, response_len=response_len, runtime_gib=0.0)
    out = {}
    for phase, term in ESTIMATOR_PHASE.items():
        extra = e["checkpoint_host_process0"] if term == "checkpoint" else e["phases"].get(term, 0.0)
        out[phase] = e["resident_on_device"] + extra
    return {"phases": out, "estimate": e}


def compare(cfg, r: dict) -> dict:
    """The trace's result with the estimator's figure for each phase and the difference (estimate - traced) / traced."""
    est = estimator_phases(cfg, r["nproc"], r["max_length"], r["response_len"], r["packed"])
    rows = {phase: {"traced": traced, "estimated": est["phases"][phase],
                    "difference": (est["phases"][phase] - traced) / traced} for phase, traced in r["phases"].items()}
    return {**r, "table": rows, "estimated_state_on_device": est["estimate"]["resident_on_device"]}


def render(r: dict, config: str = "") -> str:
    small = max(v["traced"] for v in r["table"].values()) < 10 * GIB
    f = (lambda b: f"{b / GIB:.4f}") if small else (lambda b: f"{b / GIB:.2f}")
    lines = [f"{config}: process 0 of {r['nproc']}; T = {r['max_length']} tokens (prompt {r['prompt_len']} + "
             f"response {r['response_len']}); loss rows: {'packed' if r['packed'] else 'two rows per tuple'}; "
             f"state before the step {f(r['state_bytes'])} GiB (estimator: {f(r['estimated_state_on_device'])})", "",
             f"{'phase':<26} | {'traced peak GiB':>15} | {'scale/memory.py GiB':>19} | {'difference %':>12} | "
             f"{'trace s':>7}",
             f"{'-' * 27}|{'-' * 17}|{'-' * 21}|{'-' * 14}|{'-' * 8}"]
    for phase, row in r["table"].items():
        lines.append(f"{phase:<26} | {f(row['traced']):>15} | {f(row['estimated']):>19} | "
                     f"{100 * row['difference']:>+11.1f}% | {r['seconds'].get(phase, 0):>7.0f}")
    lines += ["", "difference = (estimate - traced) / traced."]
    host = max(r["gathered_state_dicts"].values(), default=0)
    sharded = "sharded (this process's part)" in r["gathered_state_dicts"]
    lines += [f"checkpoint save: sharded, this process writes its own part ({f(host)} GiB of shards); nothing is "
              "gathered." if sharded else
              f"checkpoint save: process 0's gathered state dicts (largest {f(host)} GiB) are host RAM on a GPU; "
              "here they count with the rest.",
              f"optimizer state {f(r['optimizer_state_bytes'])} GiB (its tensors; the tracker's Optstate category at "
              f"the optimizer step's peak: {f(r['breakdown'].get('optimizer step', {}).get('Optstate', 0))} GiB, "
              "its foreach temporaries included)",
              f"wall time {r['wall_s']:.0f} s (setup {r['setup_s']:.0f} s, step {r['step_s']:.0f} s)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scale.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a scale/configs/*.yaml (required unless --report-from)")
    ap.add_argument("--nproc", type=int, default=1, help="processes (world size) to simulate; this is rank 0")
    ap.add_argument("--prompt-len", type=int, default=32,
                    help="prompt tokens; the response takes the rest of max_length (default 32)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON (bytes)")
    ap.add_argument("--report-from", metavar="JSON", help="no trace: compare a trace saved with --json against "
                    "scale/memory.py as it is now (after editing the estimator, in a second)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, as on tune run")
    a = ap.parse_args(argv)
    if a.report_from:
        return report_from(a.report_from, a.json)
    if not a.config:
        print("error: --config is required (or --report-from)", file=sys.stderr)
        return 2
    cfg = cli_config(a.config, a.nproc, a.overrides)
    if cfg is None:
        return 2
    from scale.sapo_recipe import ConfigError, check_recipe_config
    try:
        check_recipe_config(cfg)
        if not 1 <= a.prompt_len <= int(cfg.max_length) - 4:
            raise ConfigError(f"--prompt-len must be in [1, {int(cfg.max_length) - 4}] (max_length - 4), got "
                              f"{a.prompt_len}")
    except ConfigError as e:     # the recipe's own one-line errors for a bad config, exit status 2 as it has
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.get("fsdp_cpu_offload", False) and a.nproc > 1:
        # the trace runs on CPU, where the recipe refuses to offload (there is nowhere to offload to): trace the
        # same config without it, and say what differs on a GPU
        print("note: fsdp_cpu_offload: traced without it; on a GPU the resident state in the table lives in host "
              "RAM instead, the rest of each phase is the same (python -m scale.memory shows both)", file=sys.stderr)
        a.overrides = [*a.overrides, "fsdp_cpu_offload=False"]
        cfg = load_config(a.config, a.overrides)
    try:
        r = simulate(cfg, a.nproc, a.prompt_len)
    except Exception:  # noqa: BLE001  (anything the recipe's code raises under the trace: report it, exit 1)
        traceback.print_exc()
        print("error: the trace failed (traceback above)", file=sys.stderr)
        return 1
    try:
        r = compare(cfg, r)
    except Exception:  # noqa: BLE001  (the estimator failed: keep the trace)
        traceback.print_exc()
        print(json.dumps({"config": a.config, **r}, indent=1))
        print("error: scale/memory.py failed on this config (traceback above); the trace is printed", file=sys.stderr)
        return 1
    print(json.dumps({"config": a.config, "overrides": a.overrides, **r}, indent=1) if a.json else render(r, a.config))
    return 0


def report_from(path: str, as_json: bool) -> int:
    """The table for a trace saved by --json, with the estimator as it is now."""
    try:
        saved = json.loads(Path(path).read_text())
        cfg = load_config(saved["config"], saved.get("overrides", []))
        trace = {k: v for k, v in saved.items() if k not in ("table", "estimated_state_on_device")}
        r = compare(cfg, trace)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: --report-from {path}: not a trace saved by --json ({type(e).__name__}: {e})".splitlines()[0],
              file=sys.stderr)
        return 2
    print(json.dumps(r, indent=1) if as_json else render(r, saved["config"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
