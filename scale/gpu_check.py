"""Check scale/ on one CUDA GPU, in about 8 minutes: decoding speed at 8B shapes, a 1.5 B-parameter model with the
full 128k vocabulary through the recipe (memory against scale/memory.py, DPO's log 2 at step 1, resume), and the
FSDP2 code paths on CUDA / NCCL in one process.

    python -m scale.gpu_check [--out gpu_check.json] [--budget-s 480]    # one CUDA GPU (~30 GB free), ~45 GB of disk
    python -m scale.gpu_check --dry-run        # the plan and the commands it would run; no GPU needed
    python -m scale.gpu_check --cpu-smoke      # every part on tiny shapes on CPU (gloo): what tests/test_gpu_check.py runs

Without a CUDA device (and without --dry-run / --cpu-smoke) it prints one line, `no CUDA device: nothing to check`,
and exits 0: that is what CI sees. Otherwise it prints a table (one row per check: PASS, FAIL, INFO or SKIP),
writes it as JSON (--out) and exits 1 if any check FAILs (2: bad arguments).

The parts, each within its share of --budget-s (an unused share goes to the next part; a part over its share FAILs):
  decode   torchtune's llama3_8b() (fewer layers if the GPU lacks ~20 GB free; the table says how many), random
           weights in bf16 on the GPU; the recipe's own decode, scale.sapo_recipe.torchtune_generate, on 8 rows with
           prompts of 449-512 tokens, sampling (temperature 0.7, top-k 50, top-p 0.95) under bf16 autocast with a
           bf16 KV cache, as the recipe runs it. ms per decoding step = (median time of 64 new tokens - median time
           of 16) / 48, after a warm-up, with torch.cuda.synchronize around each call. Host syncs per decoding step
           from the same difference, counted twice: torch.cuda.set_sync_debug_mode("warn")'s warnings, and the
           calls that read a tensor's value on the host (host_read_counter). The recipe checks
           whether every row has stopped every DONE_CHECK_EVERY (16) steps and reads nothing else: PASS at most
           1 / DONE_CHECK_EVERY per step. No row stops early (the stop id is -1), so every call decodes all steps.
           Then the same calls through compile_decode's step (scale.sapo_recipe.compiled_decode_step: inductor,
           CUDA graphs), timed the same way after compiling: its ms per step beside the eager one's (INFO).
  fsdp     the recipe's own model building (SAPORecipe._build: meta device, scale/fsdp.py's sharding plan with
           FSDP2's bf16 MixedPrecisionPolicy, activation checkpointing, load_full_model_state_dict) on a
           one-process NCCL group from scale.fsdp.init_distributed, on 2 layers of the 1 B shapes with the 128k
           vocabulary, against the same model unsharded: packed log-probs and gradient norm, greedy decoding of the
           EMA inside scale.fsdp.gathered, and scale.fsdp.local_ema_update against sapo.ema_update. (The recipe run
           below has one process, so it never shards: sharding needs 2 processes, and NCCL 2 GPUs.)
  recipe   a random Llama-3 with Llama-3.2-1B's shapes and an untied output layer (1.50 B parameters, vocabulary
           128256; scale/tiny.py writes it with its small tokenizer: ids >= 322 are never encoded, so num_samples=0)
           through `tune run scale/sapo_recipe.py` in one process (NCCL: NCCL_DEBUG=INFO marks it in the log),
           bf16-mixed, SAPO-DPO, RMSprop (the 8B config's optimizer: 4 bytes of state per parameter), 3 steps of
           4 prompts x 2 micro-batches, checkpoints at steps 2 and 3. Checks: step 1's loss is log 2 (policy ==
           reference) within 1e-3; memory/peak_allocated_gib (the largest over the steps) against
           scale.memory.estimate for the same config, nproc 1 and the run's longest batch (within 20%); then a
           resume from step 2 (step 3's checkpoint deleted) gives the uninterrupted run's step 3: forward metrics
           (loss, log-probs, rewards, lr, buffer size) within 1e-5 relative, grad_norm within 1e-3 (attention's
           backward on a GPU may add in another order). Fewer layers if the GPU memory (estimate) or the disk
           (the model in fp32 and two checkpoints of 12 bytes per parameter: ~45 GB) would not hold 16.

Not checked here: 2 or more processes (sharded training, NCCL collectives between GPUs, CPU offload:
tests/test_scale_resilience.py's test_gpu_lora_with_cpu_offload needs 2 GPUs), real checkpoints and tokenizers.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA device: nothing to check"
LLAMA3_VOCAB = 128_256
# torchtune.models.llama3.llama3_8b()'s arguments (tests check the count against the builder)
EIGHT_B = dict(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336, max_seq_len=8192,
               rope_base=500_000, norm_eps=1e-5)
# torchtune.models.llama3_2.llama3_2_1b(tie_word_embeddings=False)'s shapes with plain RoPE (scale/tiny.py writes an
# untied transformers folder): 1.50 B parameters at the 128k vocabulary
ONE_B = dict(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192, max_seq_len=2048,
             rope_base=500_000, norm_eps=1e-5)
PASS, FAIL, INFO, SKIP = "PASS", "FAIL", "INFO", "SKIP"
# compared between the uninterrupted run's step 3 and the resumed run's: computed in forward (exact on a GPU too)
FORWARD_KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "lr", "buffer/size")
NCCL_MARKERS = ("NCCL INFO", "NCCL version", "ProcessGroupNCCL")
GIB = 2**30


@dataclass
class Plan:
    """What the run does: the GPU profile, or tiny shapes on CPU (--cpu-smoke)."""
    device: str = "cuda"
    workdir: str = ""
    parts: tuple = ("decode", "fsdp", "recipe")
    budget_s: float = 480.0
    shares: dict = field(default_factory=lambda: {"decode": 0.3, "fsdp": 0.1, "recipe": 0.6})
    # decode
    decode_model: dict = field(default_factory=lambda: dict(EIGHT_B))
    decode_vocab: int = LLAMA3_VOCAB
    decode_rows: int = 8
    prompt_len: int = 512
    new_tokens: tuple = (16, 64)
    repeats: int = 3
    compile_backend: str = "inductor"   # the recipe's compile_decode step, timed beside the eager one ("": skip)
    # fsdp
    fsdp_model: dict = field(default_factory=lambda: {**ONE_B, "num_layers": 2})
    fsdp_vocab: int = LLAMA3_VOCAB
    # recipe
    recipe_model: dict = field(default_factory=lambda: dict(ONE_B))
    recipe_vocab: int = LLAMA3_VOCAB
    initializer_range: float = 0.02
    batch_size: int = 4
    grad_accum: int = 2
    dtype: str = "bf16-mixed"
    loss_tol: float = 1e-3
    memory_tol: float = 0.2
    resume_rtol: float = 1e-5
    grad_norm_rtol: float = 1e-3

    @classmethod
    def cpu_smoke(cls, **kw) -> "Plan":
        from scale import tiny
        return cls(device="cpu", decode_model=dict(tiny.TINY_MODEL), decode_vocab=tiny.TINY_VOCAB, decode_rows=2,
                   prompt_len=24, new_tokens=(16, 48), repeats=1, fsdp_model=dict(tiny.TINY_MODEL),
                   fsdp_vocab=tiny.TINY_VOCAB, recipe_model=dict(tiny.TINY_MODEL), recipe_vocab=tiny.TINY_VOCAB,
                   initializer_range=0.1, batch_size=2, compile_backend="aot_eager", **kw)


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.checks: list[dict] = []
        self.details: dict = {}

    def add(self, part: str, name: str, status: str, value=None, expected: str = "", detail: str = "",
            seconds: float | None = None) -> dict:
        row = {"part": part, "check": name, "status": status, "value": value, "expected": expected, "detail": detail}
        if seconds is not None:
            row["seconds"] = round(seconds, 1)
        self.checks.append(row)
        return row

    @property
    def failed(self) -> bool:
        return any(c["status"] == FAIL for c in self.checks)

    def table(self) -> str:
        def fmt(v):
            if isinstance(v, float):
                return f"{v:.4g}"
            return "" if v is None else str(v)
        rows = [("part", "check", "status", "value", "expected", "s")] + [
            (c["part"], c["check"], c["status"], fmt(c["value"]), c["expected"], fmt(c.get("seconds"))) for c in self.checks]
        widths = [min(max(len(r[i]) for r in rows), 44) for i in range(len(rows[0]))]
        lines = ["  ".join(str(x)[:w].ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
        for c in self.checks:
            if c["status"] in (FAIL, INFO) and c["detail"]:
                lines.append(f"{c['status']} {c['part']} / {c['check']}: {c['detail']}")
        verdict = "FAIL" if self.failed else "PASS"
        lines.append(f"{verdict}: {sum(c['status'] == PASS for c in self.checks)} passed, "
                     f"{sum(c['status'] == FAIL for c in self.checks)} failed, "
                     f"{sum(c['status'] == SKIP for c in self.checks)} skipped")
        return "\n".join(lines)


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in this (main) thread after `seconds` (SIGALRM; in-process parts)."""
    def fire(signum, frame):
        raise PartTimeout(f"over its time budget of {seconds:.0f} s")
    if seconds <= 0:
        raise PartTimeout("no time left in --budget-s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested on CPU)
# ---------------------------------------------------------------------------------------------------

def read_metrics(path) -> list[dict]:
    """metrics.jsonl as the recipe writes it (one JSON object per step); a torn last line is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def rel_gap(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(a), abs(b))


def check_step1_loss(metrics: list[dict], tol: float) -> tuple[str, float | None, str]:
    """DPO with policy == reference at step 1: loss = -log sigmoid(0) = log 2."""
    first = next((m for m in metrics if m.get("step") == 1), None)
    if first is None or "loss" not in first:
        return FAIL, None, "no step 1 in metrics.jsonl"
    gap = abs(first["loss"] - math.log(2))
    return (PASS if gap <= tol else FAIL), first["loss"], f"|loss - log 2| = {gap:.2e}"


def compare_resumed(uninterrupted: list[dict], resumed: list[dict], step: int, rtol: float,
                    grad_norm_rtol: float) -> tuple[str, dict, str]:
    """The resumed run's `step` against the uninterrupted run's: FORWARD_KEYS within rtol, grad_norm within
    grad_norm_rtol (relative to max(1, |x|)). Returns status, the gap per key, and what failed."""
    a = next((m for m in uninterrupted if m.get("step") == step), None)
    b = next((m for m in resumed if m.get("step") == step), None)
    if a is None or b is None:
        return FAIL, {}, f"step {step} missing ({'uninterrupted' if a is None else 'resumed'} run)"
    gaps, bad = {}, []
    for key, tol in [(k, rtol) for k in FORWARD_KEYS] + [("grad_norm", grad_norm_rtol)]:
        if key not in a or key not in b:
            bad.append(f"{key} missing")
            continue
        gaps[key] = rel_gap(float(a[key]), float(b[key]))
        if not gaps[key] <= tol:          # (NaN fails)
            bad.append(f"{key}: {a[key]} vs {b[key]}")
    steps_b = [m.get("step") for m in resumed]
    if steps_b != list(range(1, step + 1)):
        bad.append(f"resumed metrics.jsonl holds steps {steps_b}")
    return (FAIL if bad else PASS), gaps, "; ".join(bad)


def longest_batch(metrics: list[dict]) -> tuple[int, int]:
    """(T, R): the longest prompt + y+ and the longest response the run saw (the recipe's shape/* metrics)."""
    return (max(int(m["shape/max_tokens"]) for m in metrics), max(int(m["shape/max_response"]) for m in metrics))


def check_memory(metrics: list[dict], estimate_bytes: float, tol: float) -> tuple[str, float | None, str]:
    """The largest memory/peak_allocated_gib over the steps against scale/memory.py's estimate (bytes)."""
    peaks = [m["memory/peak_allocated_gib"] for m in metrics if "memory/peak_allocated_gib" in m]
    if not peaks:
        return FAIL, None, "no memory/peak_allocated_gib in metrics.jsonl (the recipe logs it on CUDA)"
    measured = max(peaks) * GIB
    err = estimate_bytes / measured - 1
    return ((PASS if abs(err) <= tol else FAIL), max(peaks),
            f"estimate {estimate_bytes / GIB:.2f} GiB, measured {max(peaks):.2f} GiB (per step "
            f"{', '.join(f'{p:.2f}' for p in peaks)}): estimate error {err:+.1%}")


def backend_from_log(text: str) -> str | None:
    """The process group's backend, from a recipe log run with NCCL_DEBUG=INFO: 'nccl' if NCCL speaks."""
    return "nccl" if any(m in text for m in NCCL_MARKERS) else None


def largest_fitting(n_max: int, fits) -> int:
    """The largest n in 1..n_max with fits(n) (fits is monotone: fewer layers, less memory); 0 if none."""
    for n in range(n_max, 0, -1):
        if fits(n):
            return n
    return 0


def sync_checks_due(n_steps: int, every: int) -> int:
    """torchtune_generate's `done` reads in a call of n_steps decoding steps (at k + 1 = every, 2 every, ...
    below n_steps)."""
    return (n_steps - 1) // every


def tune_executable() -> str:
    tune = Path(sys.executable).with_name("tune")
    return str(tune) if tune.exists() else "tune"


def model_cfg(shape: dict, vocab: int) -> dict:
    return {"_component_": "torchtune.models.llama3.llama3", "vocab_size": vocab, **shape}


def recipe_config(plan: Plan, model_dir: Path, layers: int | None = None, files=("model.safetensors",)):
    """tiny_cpu.yaml with the check's model (its shapes, repeated by hand as tiny_cpu.yaml does: torchtune's HF
    checkpointer does not read them from config.json) and checkpoint files. The rest is set on the command line."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / "scale" / "configs" / "tiny_cpu.yaml")
    shape = {**plan.recipe_model, **({"num_layers": layers} if layers else {})}
    cfg.model = model_cfg(shape, plan.recipe_vocab)
    cfg.model_dir = str(model_dir)
    cfg.checkpointer.checkpoint_files = list(files)
    return cfg


def recipe_overrides(plan: Plan, output_dir: Path, resume: bool = False) -> list[str]:
    """The `tune run` key=value arguments of both runs (the resumed one adds resume_from_checkpoint)."""
    over = [f"device={plan.device}", f"dtype={plan.dtype}", "method=sapo-dpo", f"output_dir={output_dir}",
            "max_steps=3", "save_every_n_steps=2", "keep_last_n_checkpoints=2", "num_samples=0",
            f"batch_size={plan.batch_size}", f"gradient_accumulation_steps={plan.grad_accum}",
            "optimizer._component_=torch.optim.RMSprop", "optimizer.lr=1e-5", "optimizer.weight_decay=0.0"]
    return over + (["resume_from_checkpoint=True"] if resume else [])


def tune_command(config_path: Path, overrides: list[str]) -> list[str]:
    return [tune_executable(), "run", "scale/sapo_recipe.py", "--config", str(config_path)] + overrides


def memory_command(config_path: Path, overrides: list[str], seq_len: int, response_len: int) -> list[str]:
    return [sys.executable, "-m", "scale.memory", "--config", str(config_path), "--nproc", "1", "--seq-len",
            str(seq_len), "--response-len", str(response_len), "--json"] + overrides


def merged_config(config_path: Path, overrides: list[str]):
    """The run's config as the recipe sees it: the YAML plus the command line (as scale.memory's CLI merges)."""
    from omegaconf import OmegaConf
    return OmegaConf.merge(OmegaConf.load(config_path), OmegaConf.from_dotlist(overrides))


def recipe_disk_bytes(estimate: dict, params: int) -> float:
    """The model folder (fp32) and two checkpoints (steps 2 and 3), with 5% to spare."""
    return 1.05 * (4 * params + 2 * estimate["checkpoint_total"])


# ---------------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------------

def synchronize(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_device_bytes(device) -> float:
    import torch
    if torch.device(device).type == "cuda":
        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def release(device):
    import torch
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def autocast(device):
    import torch
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def host_read_counter():
    """A TorchFunctionMode counting (in .n) the calls that read a tensor's value on the host: each one a sync on a
    GPU (tests/test_scale.py counts a decoding loop's with it)."""
    import torch

    class HostReads(torch.overrides.TorchFunctionMode):
        READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "nonzero"}

        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += getattr(func, "__name__", "") in self.READS
            return func(*args, **(kwargs or {}))
    return HostReads()


def count_cuda_syncs(fn) -> int:
    """Synchronizing CUDA operations while fn runs (torch.cuda.set_sync_debug_mode('warn') warns at each)."""
    import torch
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def random_contexts(rows: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of length - 9 i % 64 tokens (left padding in a batch), ids below Llama-3's special tokens."""
    import torch
    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, 128_000)
    return [torch.randint(0, hi, (max(1, length - (9 * i) % 64),), generator=g).tolist() for i in range(rows)]


# ---------------------------------------------------------------------------------------------------
# Part 1: decoding speed at 8B shapes
# ---------------------------------------------------------------------------------------------------

def decode_part(plan: Plan, rep: Report, seconds: float) -> None:
    import torch
    from omegaconf import OmegaConf
    from torchtune import training
    from torchtune.models.llama3 import llama3, llama3_8b
    import sapo
    from scale import memory
    from scale import sapo_recipe as R

    part, t0 = "decode", time.perf_counter()
    device = torch.device(plan.device)
    if device.type == "cuda" and device.index is None:     # as the recipe's utils.get_device: cuda:<current>
        device = torch.device("cuda", torch.cuda.current_device())
    shape, V, B = dict(plan.decode_model), plan.decode_vocab, plan.decode_rows
    n1, n2 = plan.new_tokens
    s = memory.model_shapes(OmegaConf.create(model_cfg(shape, V)))
    L = shape["num_layers"]
    kv_per_layer = 2 * s.kv * (plan.prompt_len + n2) * B * 2
    fixed = 2 * (s.P - L * s.P_layer) + 3e9                 # embedding, output layer; prefill and logits to spare
    free = free_device_bytes(device)
    layers = largest_fitting(L, lambda n: fixed + n * (2 * s.P_layer + kv_per_layer) <= 0.9 * free)
    rep.details[part] = d = {"layers": layers, "of_layers": L, "rows": B, "prompt_len": plan.prompt_len,
                             "new_tokens": [n1, n2], "free_gib": free / GIB}
    if layers == 0:
        rep.add(part, "model fits", FAIL, free / GIB, f">= {(fixed + 2 * s.P_layer) / GIB:.1f} GiB free",
                "not even one layer fits in the free memory")
        return
    model = None
    try:
        with time_limit(seconds):
            torch.manual_seed(0)
            with training.set_default_dtype(torch.bfloat16), device:
                full_8b = shape == EIGHT_B and V == LLAMA3_VOCAB and layers == L
                model = llama3_8b() if full_8b else llama3(vocab_size=V, **{**shape, "num_layers": layers})
            model.requires_grad_(False)
            R.enable_position_selection(model)
            d["builder"] = "llama3_8b()" if full_8b else f"llama3({layers} layers)"
            d["params"] = sum(p.numel() for p in model.parameters())
            contexts = random_contexts(B, plan.prompt_len, V)
            sampling = sapo.segment_sampling(0.7, 50, 0.95)
            seeds = [R.row_seed(0, 0, 0, i) for i in range(B)]

            def generate(n, **decode):     # decode: torchtune_generate's decode_step and cache_len
                with autocast(device):
                    return R.torchtune_generate(model, contexts, [n] * B, 0, [-1], sampling, seeds, n,
                                                torch.bfloat16, device, **decode)

            def timed(n, **decode):
                synchronize(device)
                t = time.perf_counter()
                out = generate(n, **decode)
                synchronize(device)
                return time.perf_counter() - t, out
            lengths = {n: [len(x) for x in timed(n)[1]] for n in (n1, n2)}      # warm-up
            times = {n: [] for n in (n1, n2)}
            for _ in range(plan.repeats):
                for n in (n1, n2):
                    times[n].append(timed(n)[0])
            med = {n: statistics.median(v) for n, v in times.items()}
            ms = (med[n2] - med[n1]) / (n2 - n1) * 1e3
            d.update(times_s={str(n): v for n, v in times.items()}, ms_per_step=ms,
                     prefill_ms=(med[n1] * 1e3 - n1 * ms))
            ok_len = all(x == [n] * B for n, x in lengths.items())
            rep.add(part, "every row decodes all its tokens", PASS if ok_len else FAIL, None,
                    f"{B} rows x {n1} / {n2}", "" if ok_len else f"segment lengths {lengths}")
            label = f"{layers}/{L} layers" + ("" if layers == L else f"; x{L / layers:.2f} = {ms * L / layers:.1f} ms at {L}")
            rep.add(part, "ms per decoding step", INFO, round(ms, 2), f"{B} rows, {label}",
                    f"median call: {med[n1] * 1e3:.0f} ms for {n1} tokens, {med[n2] * 1e3:.0f} ms for {n2} "
                    f"(prompts <= {plan.prompt_len})", seconds=time.perf_counter() - t0)
            rep.add(part, "decoded tokens per second", INFO, round(B / ms * 1e3, 1) if ms > 0 else None, f"{B} rows")

            if plan.compile_backend:     # compile_decode: the same calls through the compiled step
                compiled = dict(decode_step=R.compiled_decode_step(model, plan.compile_backend),
                                cache_len=plan.prompt_len + n2)
                tc = time.perf_counter()
                same = [generate(n, **compiled) for n in (n1, n2)]              # compiles (CUDA graphs recorded)
                compile_s = time.perf_counter() - tc
                ctimes = {n: [timed(n, **compiled)[0] for _ in range(plan.repeats)] for n in (n1, n2)}
                cmed = {n: statistics.median(v) for n, v in ctimes.items()}
                ms_c = (cmed[n2] - cmed[n1]) / (n2 - n1) * 1e3
                d.update(compiled_ms_per_step=ms_c, compile_s=compile_s)
                rep.add(part, "ms per decoding step, compiled", INFO, round(ms_c, 2),
                        f"compile_decode, backend {plan.compile_backend}",
                        f"eager {ms:.2f} ms: x{ms / ms_c:.2f}; compiling took {compile_s:.0f} s" if ms_c > 0 else "")
                agree = sum(a == b for n, x in zip((n1, n2), same) for a, b in zip(x, generate(n)))
                rep.add(part, "compiled step's tokens = eager's", INFO, agree, f"of {2 * B} rows",
                        "bf16 kernels may differ in the last bit and flip a sampled token")

            every = R.DONE_CHECK_EVERY
            due = (sync_checks_due(n2, every) - sync_checks_due(n1, every)) / (n2 - n1)

            def counted(n):
                """(host reads, CUDA syncs) of one call: both counters on the same call."""
                counter = host_read_counter()
                with counter:
                    syncs = count_cuda_syncs(lambda: generate(n)) if device.type == "cuda" else None
                    if syncs is None:
                        generate(n)
                return counter.n, syncs
            (r1, c1), (r2, c2) = counted(n1), counted(n2)
            per_step = (r2 - r1) / (n2 - n1)
            d["host_reads_per_step"] = per_step
            rep.add(part, "host reads per decoding step", PASS if per_step <= due + 1e-9 else FAIL, round(per_step, 4),
                    f"<= {due:.4f} (a done check every {every})", f"{r1} reads in {n1} steps, {r2} in {n2}")
            if device.type == "cuda":
                syncs = (c2 - c1) / (n2 - n1)
                d["cuda_syncs_per_step"] = syncs
                rep.add(part, "CUDA syncs per decoding step", PASS if syncs <= due + 1e-9 else FAIL, round(syncs, 4),
                        f"<= {due:.4f}", f"torch.cuda.set_sync_debug_mode('warn'): {c1} warnings in {n1} steps, "
                        f"{c2} in {n2}")
            else:
                rep.add(part, "CUDA syncs per decoding step", SKIP, None, "", "no CUDA device")
    except Exception as e:  # noqa: BLE001  (reported, the next part runs)
        rep.add(part, "decode", FAIL, None, "", f"{type(e).__name__}: {e}".splitlines()[0][:300],
                seconds=time.perf_counter() - t0)
    finally:
        model = None
        release(device)


# ---------------------------------------------------------------------------------------------------
# Part 3 (run second): the FSDP2 paths in one process, on NCCL when on CUDA
# ---------------------------------------------------------------------------------------------------

def preference_batch(rows: int, vocab: int, seed: int = 1) -> list[dict]:
    """Tuples of (x, y+, y-) with a shared prefix of y+ and y-, as the recipe's replay buffer holds them."""
    import torch
    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, 128_000)

    def ids(n):
        return torch.randint(0, hi, (n,), generator=g).tolist()
    out = []
    for i in range(rows):
        x, shared = ids(20 + 3 * i), ids(4 + i)
        out.append({"prompt_ids": x, "chosen_ids": shared + ids(12), "rejected_ids": shared + ids(10 + i)})
    return out


def fsdp_part(plan: Plan, rep: Report, seconds: float) -> None:
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from torch.distributed.tensor import DTensor
    from torchtune import training
    from torchtune.models.llama3 import llama3
    import sapo
    from sapo_utils.evaluation import GREEDY
    from scale import fsdp as FS
    from scale import sapo_recipe as R

    part, t0 = "fsdp", time.perf_counter()
    device = torch.device(plan.device)
    V = plan.fsdp_vocab
    cfg = OmegaConf.load(ROOT / "scale" / "configs" / "tiny_cpu.yaml")
    cfg.model = model_cfg(plan.fsdp_model, V)
    cfg.update({"device": plan.device, "dtype": "bf16-mixed", "output_dir": str(Path(plan.workdir) / "fsdp_unused")})
    started = False
    try:
        with time_limit(seconds):
            FS.init_distributed(cfg)        # the recipe's own: NCCL on CUDA, one process
            started = True
            backend = str(dist.get_backend())
            want = "nccl" if device.type == "cuda" else "gloo"
            rep.add(part, "process group backend", PASS if backend == want else FAIL, backend, want,
                    "scale.fsdp.init_distributed, one process")
            recipe = R.SAPORecipe(cfg)
            device = recipe.device           # cuda:<LOCAL_RANK>, as in the recipe
            torch.manual_seed(0)
            with training.set_default_dtype(torch.float32), recipe.device:
                source = llama3(vocab_size=V, **plan.fsdp_model)
            sd = {k: v.detach() for k, v in source.state_dict().items()}
            models = {}
            for shard in (True, False):
                recipe.shard = shard
                models["policy", shard] = recipe._build(cfg.model, torch.float32, True, sd)
                models["ema", shard] = recipe._build(cfg.model, torch.bfloat16, False, sd)
            del source, sd
            sharded = all(isinstance(p, DTensor) for k in ("policy", "ema") for p in models[k, True].parameters())
            rep.add(part, "policy and EMA sharded (DTensor)", PASS if sharded else FAIL, sharded, "True")

            # packed log-probs and their gradients: sharded (FSDP2 bf16 mixed precision) vs unsharded (autocast)
            batch = preference_batch(4, V)
            sums, norms = {}, {}
            for shard in (True, False):
                m = models["policy", shard]
                with autocast(device):
                    R.torchtune_packing_ok(m, device, 5e-2)
                    pos, neg, _, _ = R.torchtune_preference_logps(m, batch, 0, device)
                (pos.sum() - neg.sum()).backward()
                sums[shard] = torch.cat([pos, neg]).detach().float().cpu()
                norms[shard] = math.sqrt(sum(float(FS.full_tensor(p.grad).float().pow(2).sum())
                                             for p in m.parameters() if p.grad is not None))
            packed = all(models["policy", s].sapo_shared_prefix for s in (True, False))
            gap = float((sums[True] - sums[False]).abs().max() / sums[False].abs().max().clamp(min=1))
            rep.add(part, "log-probs sharded vs unsharded", PASS if gap <= 2e-2 and packed else FAIL, gap,
                    "<= 2e-2 relative, packed layout", "" if packed else "the packing check failed")
            ngap = rel_gap(norms[True], norms[False])
            rep.add(part, "grad norm sharded vs unsharded", PASS if ngap <= 2e-2 and math.isfinite(norms[True]) else FAIL,
                    ngap, "<= 2e-2 relative", f"{norms[True]:.5g} vs {norms[False]:.5g}")

            # greedy decoding of the EMA, gathered once (scale.fsdp.gathered) vs unsharded
            contexts = random_contexts(2, 40, V, seed=2)
            segments = {}
            for shard in (True, False):
                m = models["ema", shard]
                with autocast(device), FS.gathered(m, shard):
                    segments[shard] = R.torchtune_generate(m, contexts, [12, 12], 0, [-1], GREEDY, [0, 1], 12,
                                                           torch.bfloat16, device)
            same = segments[True] == segments[False]
            rep.add(part, "greedy decode, gathered EMA vs unsharded", PASS if same else FAIL, same, "True",
                    "" if same else f"{segments[True]} vs {segments[False]}")

            # the EMA update on shards (one foreach lerp) vs sapo.ema_update
            local = FS.local_ema_update(models["ema", True], models["policy", True], 0.5)
            sapo.ema_update(models["ema", False], models["policy", False], 0.5)
            wgap = max(float((FS.full_tensor(a.detach()).float() - b.detach().float()).abs().max())
                       for a, b in zip(models["ema", True].parameters(), models["ema", False].parameters()))
            rep.add(part, "local_ema_update vs sapo.ema_update", PASS if local and wgap <= 1e-6 else FAIL, wgap,
                    "shards pair, max gap <= 1e-6", "" if local else "local_ema_update found the shards unpaired",
                    seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        rep.add(part, "fsdp", FAIL, None, "", f"{type(e).__name__}: {e}".splitlines()[0][:300],
                seconds=time.perf_counter() - t0)
    finally:
        models = None
        if started and dist.is_initialized():
            dist.destroy_process_group()
        release(device)


# ---------------------------------------------------------------------------------------------------
# Part 2 (run last): the recipe on a 1.5 B model with the 128k vocabulary, and a resume
# ---------------------------------------------------------------------------------------------------

def plan_recipe_layers(plan: Plan, model_dir: Path) -> tuple[int, dict]:
    """The most layers (up to the plan's) whose estimated peak fits 85% of the free GPU memory and whose model
    folder plus two checkpoints fit 90% of the free disk; the estimate for them (max_length, R = half)."""
    from scale import memory
    out = Path(plan.workdir)
    free_disk = shutil.disk_usage(out if out.exists() else out.parent).free
    free_dev = free_device_bytes(plan.device)
    over = recipe_overrides(plan, out / "run")
    info = {"free_disk_gib": free_disk / GIB, "free_device_gib": free_dev / GIB}

    def estimate(n):
        cfg = merged_config_from(recipe_config(plan, model_dir, n), over)
        return memory.estimate(cfg, 1)

    def fits(n):
        e = estimate(n)
        dev_ok = e["peak"] <= 0.85 * free_dev or plan.device == "cpu"
        return dev_ok and recipe_disk_bytes(e, e["params"]) <= 0.9 * free_disk
    layers = largest_fitting(plan.recipe_model["num_layers"], fits)
    if layers:
        e = estimate(layers)
        info.update(params=e["params"], estimate_peak_gib=e["peak"] / GIB, disk_need_gib=recipe_disk_bytes(e, e["params"]) / GIB)
    return layers, info


def merged_config_from(cfg, overrides: list[str]):
    from omegaconf import OmegaConf
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict) -> tuple[int, str]:
    """Run cmd from the repository root (tune run wants the recipe path relative), its output into log."""
    if timeout <= 0:
        return 124, "no time left in --budget-s"
    with open(log, "w") as fh:
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    text = log.read_text(errors="replace")
    if rc == 124:
        text += f"\n(killed: over its time budget of {timeout:.0f} s)"
    return rc, text


def judge_first_run(plan: Plan, rep: Report, d: dict, first: list[dict], log: str, config_path: Path,
                    overrides: list[str], on_cuda: bool) -> None:
    """The uninterrupted run's checks: its steps, DPO's log 2 at step 1, and on CUDA the backend (its log) and
    the peak allocated memory against scale.memory.estimate for the same config, nproc 1, the run's longest batch."""
    from scale import memory
    part = "recipe"
    steps_ok = [m.get("step") for m in first] == [1, 2, 3]
    rep.add(part, "steps logged", PASS if steps_ok else FAIL, [m.get("step") for m in first], "[1, 2, 3]")
    status, loss, detail = check_step1_loss(first, plan.loss_tol)
    rep.add(part, "step 1 loss = log 2", status, loss, f"0.6931 +- {plan.loss_tol:g}", detail)
    if not on_cuda:
        rep.add(part, "process group backend (log)", SKIP, None, "nccl", "CPU run (gloo)")
        rep.add(part, "peak allocated vs scale/memory.py", SKIP, None, "", "CPU run: no memory/peak_allocated_gib")
        return
    backend = backend_from_log(log)
    rep.add(part, "process group backend (log)", PASS if backend == "nccl" else FAIL, backend, "nccl",
            "NCCL_DEBUG=INFO lines in the recipe's output" if backend else
            f"none of {NCCL_MARKERS} in the log ({Path(plan.workdir) / 'run1.log'})")
    T, Rl = longest_batch(first)
    e = memory.estimate(merged_config(config_path, overrides), 1, seq_len=T, response_len=Rl)
    d["estimate"] = {"peak_gib": e["peak"] / GIB, "peak_phase": e["peak_phase"], "seq_len": T, "response_len": Rl,
                     "state_on_device_gib": e["state_on_device"] / GIB,
                     "phases_gib": {k: v / GIB for k, v in e["phases"].items()},
                     "command": " ".join(memory_command(config_path, overrides, T, Rl))}
    # memory/peak_allocated_gib is torch's allocator: the estimate without the CUDA context it adds
    status, peak, detail = check_memory(first, e["peak"] - e["runtime"], plan.memory_tol)
    rep.add(part, "peak allocated vs scale/memory.py", status, peak,
            f"{e['peak'] / GIB:.2f} GiB +- {plan.memory_tol:.0%}", detail + f"; estimate's largest phase: {e['peak_phase']}")


def recipe_part(plan: Plan, rep: Report, seconds: float) -> None:
    from scale import tiny
    part, t0 = "recipe", time.perf_counter()
    deadline = t0 + seconds
    work = Path(plan.workdir)
    model_dir, out = work / "model", work / "run"
    d = rep.details[part] = {}
    try:
        with time_limit(seconds):
            layers, info = plan_recipe_layers(plan, model_dir)
            d.update(info, layers=layers, of_layers=plan.recipe_model["num_layers"])
            if not layers:
                rep.add(part, "model fits", FAIL, None, "", f"not one layer fits: {info}")
                return
            rep.add(part, "layers (fit in memory and disk)", INFO, f"{layers}/{plan.recipe_model['num_layers']}",
                    f"{info.get('params', 0) / 1e9:.2f} B params, vocab {plan.recipe_vocab}")
            t = time.perf_counter()
            shape = {**plan.recipe_model, "num_layers": layers}
            tiny.make_tiny_llama3(model_dir, model=shape, vocab_size=plan.recipe_vocab,
                                  initializer_range=plan.initializer_range)
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            d["model_write_s"] = time.perf_counter() - t
        config_path = work / "recipe_config.yaml"
        from omegaconf import OmegaConf
        OmegaConf.save(recipe_config(plan, model_dir, layers, files), config_path)
        env = {**os.environ, "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT", "PYTHONUNBUFFERED": "1"}
        if plan.device == "cpu":
            env["OMP_NUM_THREADS"] = "1"

        # run 1: 3 steps, checkpoints at 2 and 3
        over = recipe_overrides(plan, out)
        cmd = tune_command(config_path, over)
        d["command"] = " ".join(cmd)
        t = time.perf_counter()
        rc, log = run_logged(cmd, work / "run1.log", deadline - time.perf_counter(), env)
        ok = rc == 0 and (out / "metrics.jsonl").exists()
        rep.add(part, "3-step run", PASS if ok else FAIL, rc, "exit 0", "" if ok else log[-1500:],
                seconds=time.perf_counter() - t)
        if not ok:
            return
        first = read_metrics(out / "metrics.jsonl")
        shutil.copy(out / "metrics.jsonl", work / "uninterrupted_metrics.jsonl")
        d["metrics"] = first
        judge_first_run(plan, rep, d, first, log, config_path, over, on_cuda=plan.device == "cuda")

        # run 2: step 3's checkpoint gone (a crash after step 2), resumed
        for name in ("policy", "ema", "ref"):
            shutil.rmtree(out / name / "epoch_3", ignore_errors=True)
        (out / "recipe_state" / "step_3.pt").unlink(missing_ok=True)
        cmd = tune_command(config_path, recipe_overrides(plan, out, resume=True))
        d["resume_command"] = " ".join(cmd)
        t = time.perf_counter()
        rc, log = run_logged(cmd, work / "run2.log", deadline - time.perf_counter(), env)
        resumed_ok = rc == 0 and "resuming from" in log and "step_2.pt" in log
        rep.add(part, "resume from step 2", PASS if resumed_ok else FAIL, rc, "exit 0, from step_2.pt",
                "" if resumed_ok else log[-1500:], seconds=time.perf_counter() - t)
        if not resumed_ok:
            return
        second = read_metrics(out / "metrics.jsonl")
        status, gaps, detail = compare_resumed(first, second, 3, plan.resume_rtol, plan.grad_norm_rtol)
        d["resume_gaps"] = gaps
        rep.add(part, "resumed step 3 = uninterrupted", status, max(gaps.values(), default=None),
                f"forward <= {plan.resume_rtol:g}, grad_norm <= {plan.grad_norm_rtol:g}", detail,
                seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001
        rep.add(part, "recipe", FAIL, None, "", f"{type(e).__name__}: {e}".splitlines()[0][:300],
                seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# Dry run, main
# ---------------------------------------------------------------------------------------------------

def dry_run(plan: Plan) -> str:
    """The plan and the commands, without a GPU: the estimate for the full-size recipe config included."""
    from scale import memory
    work = Path(plan.workdir)
    model_dir, out, config_path = work / "model", work / "run", work / "recipe_config.yaml"
    over = recipe_overrides(plan, out)
    cfg = merged_config_from(recipe_config(plan, model_dir), over)
    e = memory.estimate(cfg, 1)
    shape = {**plan.recipe_model}
    T, Rl = int(cfg.max_length), int(cfg.max_length) // 2
    lines = [
        f"# device {plan.device}, budget {plan.budget_s:.0f} s (shares {plan.shares}), parts {', '.join(plan.parts)}, "
        f"work folder {work}",
        f"# decode: in this process, torchtune llama3 {plan.decode_model} vocab {plan.decode_vocab} in bf16 "
        f"(llama3_8b() at full size), scale.sapo_recipe.torchtune_generate: {plan.decode_rows} rows, prompts of "
        f"<= {plan.prompt_len} tokens, {plan.new_tokens[0]} and {plan.new_tokens[1]} new tokens, {plan.repeats} repeats",
        f"# fsdp: in this process, scale.fsdp.init_distributed ({'nccl' if plan.device == 'cuda' else 'gloo'}, one "
        f"process), SAPORecipe._build sharded and unsharded: llama3 {plan.fsdp_model} vocab {plan.fsdp_vocab}",
        "# recipe: the model folder (scale/tiny.py, random weights, its tokenizer):",
        f"{sys.executable} -c \"from scale import tiny; tiny.make_tiny_llama3('{model_dir}', model={shape!r}, "
        f"vocab_size={plan.recipe_vocab}, initializer_range={plan.initializer_range})\"",
        f"# the config {config_path}: scale/configs/tiny_cpu.yaml with model: {json.dumps(model_cfg(shape, plan.recipe_vocab))}",
        "# run 1 (3 steps; NCCL_DEBUG=INFO):",
        " ".join(tune_command(config_path, over)),
        f"# the estimate it is checked against ({e['params'] / 1e9:.2f} B parameters; peak {e['peak'] / GIB:.2f} GiB "
        f"at T = {T}, R = {Rl}, in {e['peak_phase']}; the check uses the run's longest batch):",
        " ".join(memory_command(config_path, over, T, Rl)),
        f"# disk: {recipe_disk_bytes(e, e['params']) / GIB:.1f} GiB (model folder + checkpoints at steps 2 and 3)",
        f"rm -r {out}/policy/epoch_3 {out}/ema/epoch_3 {out}/ref/epoch_3 {out}/recipe_state/step_3.pt",
        "# run 2 (resume from step 2):",
        " ".join(tune_command(config_path, recipe_overrides(plan, out, resume=True))),
    ]
    return "\n".join(lines)


PARTS = {"decode": decode_part, "fsdp": fsdp_part, "recipe": recipe_part}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m scale.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the results as JSON (default gpu_check.json)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for all parts together (default 480)")
    ap.add_argument("--parts", default="decode,fsdp,recipe", help="comma-separated subset of decode,fsdp,recipe")
    ap.add_argument("--workdir", default=None, help="scratch folder (model, runs: ~45 GB on a GPU); default: a new "
                    "folder in the temp directory, removed at the end")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the commands; run nothing")
    ap.add_argument("--cpu-smoke", action="store_true", help="every part on tiny shapes on CPU (what the tests run)")
    a = ap.parse_args(argv)
    parts = tuple(p for p in a.parts.split(",") if p)
    if not parts or any(p not in PARTS for p in parts):
        ap.error(f"--parts: choose from {','.join(PARTS)}, got {a.parts!r}")
    if not a.budget_s > 0:
        ap.error(f"--budget-s must be > 0, got {a.budget_s}")
    return a, parts


def main(argv=None) -> int:
    a, parts = parse_args(argv)
    import torch
    if not (a.dry_run or a.cpu_smoke) and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    sys.path.insert(0, str(ROOT))
    made = a.workdir is None
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.gettempdir()) / f"sapo_gpu_check_{os.getpid()}"
    kw = dict(workdir=str(workdir), parts=parts, budget_s=a.budget_s)
    plan = Plan.cpu_smoke(**kw) if a.cpu_smoke else Plan(**kw)
    if a.dry_run:
        print(dry_run(plan))
        return 0
    if workdir.exists() and any(workdir.iterdir()):
        print(f"error: --workdir {workdir} is not empty", file=sys.stderr)
        return 2
    workdir.mkdir(parents=True, exist_ok=True)
    rep = Report()
    start = time.perf_counter()
    end = start + plan.budget_s
    try:
        for i, name in enumerate(parts):
            left = end - time.perf_counter()
            share = sum(plan.shares[p] for p in parts[i:])
            seconds = left if i == len(parts) - 1 else left * plan.shares[name] / share
            print(f"[gpu_check] {name}: up to {seconds:.0f} s", flush=True)
            PARTS[name](plan, rep, seconds)
    finally:
        if made and not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    env = {"device": torch.cuda.get_device_name(0) if plan.device == "cuda" else "cpu (--cpu-smoke)",
           "torch": torch.__version__, "total_s": round(time.perf_counter() - start, 1), "budget_s": plan.budget_s}
    result = {"passed": not rep.failed, "environment": env, "checks": rep.checks, "details": rep.details,
              "plan": asdict(plan)}
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print(rep.table())
    print(f"results: {a.out} ({env['total_s']} s)")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
