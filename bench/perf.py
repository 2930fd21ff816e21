"""Speed and memory of sapo.py's training step on this machine, in one run, against TRL and against the limit.

    pip install torch==2.13.0 -r bench/requirements-perf.txt     # TRL, for the peer comparison (not a project dependency)
    python bench/perf.py            # full run (the figures in docs/performance.md); ~14 minutes on 2 idle cores
    python bench/perf.py --quick    # tiny settings, one repetition: checks that everything runs (tests/test_perf.py)

Same model (SmolLM2-135M-Instruct, fp32 weights, CPU), same batch (rows of data/ifeval_lite_train.jsonl
tokenised by sapo.load_examples, real lengths) everywhere. It measures:

1. our offline DPO step (exactly what `sapo.py --method dpo` runs: sapo.batch_loss("dpo") + backward +
   clip + AdamW) against TRL's DPOTrainer.training_step (+ the same clip + AdamW) on the same token ids,
   alternating the two so that machine drift cancels; medians; tokens/s = real (unpadded) tokens per second;
2. a SAPO step, broken down in sapo.py's loop order: EMA update, segment generation (sapo.make_negatives,
   HF generate with KV cache), replay buffer push/sample, reference forward, policy forward, backward,
   optimizer step; and its time / our DPO step's time, in fp32 and bf16-mixed (sapo.autocast);
3. utilization: model FLOPs of the step / step time / dense matmul FLOP/s measured here at the model's
   shapes (best of a few torch.matmul calls), for fp32 and bf16; and how far bf16-mixed losses are from fp32;
4. memory: peak RSS of a SAPO training process (a child process, so TRL and the other copies here do not
   count) against the floor policy + gradients + AdamW state + EMA + reference, plus one batch of activations
   (the largest of the batches its SAPO steps trained on).

Model FLOPs are the work the step needs, whoever does it: per real token 2*N_body (the transformer
blocks' weights) plus causal attention 2*L*T*d, and the output layer 2*d*V only at positions whose next token
is scored (completion tokens); x3 for the policy's forward+backward, x1 for the reference forward. Padding,
prompt-position logits and recomputation are not counted, so work a trainer wastes lowers its utilization.

Prints the command line first, then markdown tables; writes bench/perf_results.json (--out).
Nothing here changes sapo.py: its functions are imported and timed; the policy and reference forwards are timed
apart by a timed copy of sapo.ops_for's functions passed to sapo.batch_loss (timed_ops).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import sapo  # noqa: E402
import sapo_fast  # noqa: E402
import sapo_utils.models  # noqa: E402
import sapo_utils.optim  # noqa: E402

GB = 1e9


# --------------------------------------------------------------------------------------------- machine

def machine_info() -> dict:
    flags, model = set(), platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = 0.0
    try:
        mem = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) * 1024 / GB
    except (OSError, StopIteration):
        pass
    import transformers
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "isa_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "ram_gb": round(mem, 1),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": _trl_version(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()[0]}


def _trl_version():
    try:
        import trl
        return trl.__version__
    except ImportError:
        return None


def rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024 / GB
    return float("nan")


def peak_rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024 / GB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:   # "5" resets VmHWM to the current RSS (Linux >= 4.0)
            fh.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- data and FLOPs

def load_batch(args, tok) -> tuple[list[dict], list]:
    """batch_size rows of the training file (seeded pick), tokenised by sapo.load_examples, as replay tuples
    whose negative is the dataset's `rejected` (what `--method dpo` trains on)."""
    lines = [l if l.endswith("\n") else l + "\n" for l in open(args.dataset, encoding="utf-8") if l.strip()]
    order = list(range(len(lines)))
    random.Random(args.seed).shuffle(order)
    examples = []
    for start in range(0, len(order), 4 * args.batch_size):    # tokenise only as many rows as needed
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as fh:
            fh.writelines(lines[i] for i in order[start: start + 4 * args.batch_size])
        try:
            examples += sapo.load_examples(fh.name, tok, args.max_length, args.max_prompt_length, verbose=False)
        except sapo.UserError:   # every row of this chunk too long
            pass
        finally:
            os.unlink(fh.name)
        examples = [e for e in examples if e.rejected_ids and len(e.prompt_ids) + len(e.rejected_ids) <= args.max_length]
        if len(examples) >= args.batch_size:
            break
    examples = examples[: args.batch_size]
    if len(examples) < args.batch_size:
        raise SystemExit(f"{args.dataset}: fewer than {args.batch_size} usable rows with a 'rejected' response")
    return [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids, "t": 0,
             "segment_len": len(e.rejected_ids), "times_sampled": 0} for e in examples], examples


def rows_of(batch) -> list[tuple[int, int]]:
    """(sequence length, scored completion tokens) of the 2B rows of the two-row layout, [y+ rows; y- rows] (TRL's)."""
    return ([(len(b["prompt_ids"]) + len(b["chosen_ids"]), len(b["chosen_ids"])) for b in batch]
            + [(len(b["prompt_ids"]) + len(b["rejected_ids"]), len(b["rejected_ids"])) for b in batch])


def shared_layout(b) -> tuple[int, int, int, int]:
    """(|x|, k, own y+ tokens, own y- tokens) of one tuple as sapo_fast.packed_logps lays it out: one row
    [x, y+[:k], y+[k:], y-[k:]] with k the common prefix of y+ and y- (each keeps >= 1 token of its own)."""
    yp, yn = b["chosen_ids"], b["rejected_ids"]
    k = sapo_fast.shared_prefix_len(yp, yn)
    return len(b["prompt_ids"]), k, len(yp) - k, len(yn) - k


def batch_stats(batch) -> dict:
    """Pair tokens: the real tokens of the two-row layout (the same work for every trainer, so tokens/s compare).
    Distinct tokens: each prompt and shared prefix once, what the step needs to compute (sapo.py's layout)."""
    rows = rows_of(batch)
    real = sum(T for T, _ in rows)
    padded = len(rows) * max(T for T, _ in rows)
    shared = [shared_layout(b) for b in batch]
    lengths = [P + k + C + R for P, k, C, R in shared]
    packed_rows = len(sapo_fast.shared_prefix_layout(batch, 0)["ids"])   # sapo.py packs short tuples into shared rows
    return {"rows": len(rows), "real_tokens": real, "padded_tokens": padded, "completion_tokens": sum(C for _, C in rows),
            "max_len": max(T for T, _ in rows), "mean_len": real / len(rows), "real_fraction": real / padded,
            "distinct_tokens": sum(lengths), "distinct_rows": packed_rows, "distinct_padded_tokens": packed_rows * max(lengths),
            "unpacked_padded_tokens": len(lengths) * max(lengths),
            "distinct_scored_tokens": sum(k + C + R for _, k, C, R in shared)}


def model_shape(model) -> dict:
    c = model.config
    n_total = sum(p.numel() for p in model.parameters())
    n_body = sum(p.numel() for p in model.base_model.layers.parameters() if p.dim() == 2)
    return {"n_params": n_total, "n_body": n_body, "layers": c.num_hidden_layers, "d_model": c.hidden_size,
            "d_ff": c.intermediate_size, "vocab": c.vocab_size, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def forward_flops(batch, shape) -> float:
    """FLOPs of one forward of the work a preference step needs: the blocks on every distinct token (each prompt and
    shared response prefix once), causal attention over the (query, key) pairs it allows, the output layer at the
    distinct scored positions. Padding, a second copy of the prompt, prompt-position logits are not counted."""
    L, d, V, N = shape["layers"], shape["d_model"], shape["vocab"], shape["n_body"]
    total = 0.0
    for P, k, C, R in map(shared_layout, batch):
        S = P + k                                                     # y+ attends causally; y-[k:] to x + y+[:k] and itself
        pairs = (S + C) * (S + C + 1) / 2 + R * S + R * (R + 1) / 2
        total += 2 * N * (S + C + R) + 4 * L * d * pairs + 2 * d * V * (k + C + R)   # QK^T and AV: 2 x 2 FLOPs per pair
    return total


def dpo_step_flops(batch, shape) -> float:
    return 4 * forward_flops(batch, shape)   # policy forward + backward (3x) + reference forward (1x)


def executed_linear_flops(stats: dict, shape: dict) -> dict:
    """FLOPs of the linear layers each trainer's DPO step runs, padding included (attention left out): the blocks at
    every position of its rows, the output layer where it computes logits (TRL: every position of its 2B padded
    rows; ours: the scored positions of its packed shared-prefix rows); x4 for policy forward + backward and the
    reference forward. Their ratio is the speedup the layouts alone give at equal matmul efficiency."""
    body, head = 2 * shape["n_body"], 2 * shape["d_model"] * shape["vocab"]
    ours = 4 * (body * stats["distinct_padded_tokens"] + head * stats["distinct_scored_tokens"])
    trl = 4 * (body + head) * stats["padded_tokens"]
    unpadded = 4 * (body * stats["distinct_tokens"] + head * stats["distinct_scored_tokens"])   # ours, no padding
    return {"ours": ours, "trl": trl, "ratio": trl / ours, "ours_unpadded": unpadded}


# --------------------------------------------------------------------------------------------- matmul peak

def matmul_peak(shape, M: int, Mc: int, dtype, reps: int, head_rows: int = 512, min_time: float = 0.25) -> dict:
    """Best-of FLOP/s of the matmuls a training step runs, at the model's shapes: M = tokens of a batch,
    Mc = scored positions. Forward y = F.linear(x, W); backward dx = dy @ W and dW = dy^T @ x."""
    d, f, V = shape["d_model"], shape["d_ff"], shape["vocab"]
    Mh = min(Mc, head_rows)
    cases = {f"fwd {M}x{d} @ ({f}x{d})^T gate/up": ("linear", M, d, f), f"fwd {M}x{f} @ ({d}x{f})^T down": ("linear", M, f, d),
             f"fwd {M}x{d} @ ({d}x{d})^T q/o": ("linear", M, d, d), f"dx {M}x{f} @ {f}x{d} gate/up": ("dx", M, d, f),
             f"dW ({M}x{f})^T @ {M}x{d} gate/up": ("dw", M, d, f), f"fwd {Mh}x{d} @ ({V}x{d})^T output layer": ("linear", Mh, d, V)}
    out, g = {}, torch.Generator().manual_seed(0)
    for name, (kind, m, k, n) in cases.items():
        x = torch.randn(m, k, generator=g).to(dtype)           # activations
        w = torch.randn(n, k, generator=g).to(dtype)           # weight, (out, in) as nn.Linear stores it
        dy = torch.randn(m, n, generator=g).to(dtype)          # output gradient
        op = {"linear": lambda: torch.nn.functional.linear(x, w), "dx": lambda: dy @ w, "dw": lambda: dy.t() @ x}[kind]
        t = time.perf_counter()
        op()                                                  # warm-up (oneDNN/MKL primitive creation)
        best, spent, n_runs = time.perf_counter() - t, 0.0, 0
        while n_runs < reps and (spent < 20 * min_time or n_runs == 0) and not (best > 2.0 and n_runs >= 1):
            t = time.perf_counter()
            op()
            dt = time.perf_counter() - t
            best, spent, n_runs = min(best, dt), spent + dt, n_runs + 1
        out[name] = 2 * m * k * n / best
        del x, w, dy
    body = {k: v for k, v in out.items() if "output layer" not in k}
    return {"peak_flops": max(body.values()), "output_layer_flops": next(v for k, v in out.items() if "output layer" in k),
            "by_shape_flops": out}


# --------------------------------------------------------------------------------------------- timed steps

_FORWARD_TIME: dict[str, float] = {}


def timed_ops(cfg, device, pack: bool = True, two_rows: bool = False) -> "sapo.Ops":
    """The functions sapo.train computes with for cfg (sapo.ops_for), with preference_logps timed: the
    policy's (grad on) and the reference's (no grad) forwards apart. Passed to sapo.batch_loss as its ops
    (a hook: nothing in sapo.py is patched). pack=False: the shared-prefix layout one row per tuple;
    two_rows: two rows per tuple with head-only logits (the fallback for models that fail the check)."""
    ops = sapo.ops_for(cfg, device)

    def two_row_logps(model, batch, pad_id, device):
        return sapo.preference_logps(model, batch, pad_id, device, logps_at=sapo_fast.head_logps)

    def unpacked(model, batch, pad_id, device):
        return sapo_fast.packed_logps(model, batch, pad_id, device, pack=False)
    logps = ops.preference_logps
    if two_rows:
        logps = two_row_logps
    elif not pack:
        logps = sapo_fast.preference_logps(sapo.preference_logps, packed=unpacked)

    def preference_logps(model, batch, pad_id, device, **kw):
        key = "policy_forward" if torch.is_grad_enabled() else "ref_forward"
        t = time.perf_counter()
        out = logps(model, batch, pad_id, device, **kw)
        _FORWARD_TIME[key] = _FORWARD_TIME.get(key, 0.0) + time.perf_counter() - t
        return out
    return dataclasses.replace(ops, preference_logps=preference_logps)


def optimizer_for(cfg, params):
    return sapo_utils.optim.make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)


def our_dpo_step(cfg, policy, ref, opt, batch, pad_id, device, ops=None) -> dict:
    """What sapo.train runs per step for --method dpo (grad_accum 1): loss, backward, clip, optimizer step."""
    _FORWARD_TIME.clear()
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with sapo.autocast(cfg, device):
        loss, m = sapo.batch_loss("dpo", cfg, policy, ref, batch, pad_id, device, ops or timed_ops(cfg, device))
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    opt.step()
    t3 = time.perf_counter()
    return {"ref_forward": _FORWARD_TIME["ref_forward"], "policy_forward": _FORWARD_TIME["policy_forward"],
            "loss_math": t1 - t0 - _FORWARD_TIME["ref_forward"] - _FORWARD_TIME["policy_forward"],
            "backward": t2 - t1, "optimizer": t3 - t2, "forward_backward": t2 - t0, "step": t3 - t0,
            "loss": m["loss"], "logps_chosen": m["logps/chosen"], "logps_rejected": m["logps/rejected"]}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def step_profile(cfg, policy, ref, opt, batch, pad_id, device, matmul_peak_flops: float) -> dict:
    """Where one of our DPO steps spends its time (torch.profiler, self time per op): the matrix multiplies, the
    attention kernels, the optimizer's ops, and everything else (norms, rotary, masks, softmax, elementwise, autograd
    bookkeeping); and the FLOP/s of the matrix multiplies alone, counted on the shapes they ran (padding included)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        our_dpo_step(cfg, policy, ref, opt, batch, pad_id, device)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = lambda pred: sum(e.self_cpu_time_total for e in events if pred(e.key)) / total  # noqa: E731
    mm_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    mm_flops = sum(e.flops for e in events if e.key in MATMUL_OPS)
    return {"profiled_s": total / 1e6, "matmul_share": mm_us / total,
            "attention_share": share(lambda k: "scaled_dot_product" in k),
            "optimizer_share": share(lambda k: "adam" in k.lower() or "foreach" in k or "Optimizer" in k),
            "matmul_gflops": mm_flops / max(mm_us, 1) / 1e3, "matmul_efficiency": mm_flops / (mm_us / 1e6) / matmul_peak_flops}


def trl_step(trainer, inputs, opt, max_grad_norm) -> dict:
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = trainer.training_step(trainer.model, inputs)
    t1 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), max_grad_norm)
    opt.step()
    t2 = time.perf_counter()
    return {"forward_backward": t1 - t0, "optimizer": t2 - t1, "step": t2 - t0, "loss": float(loss)}


def sapo_step(cfg, policy, ema, ref, opt, buffer, fresh, rng, pad_id, stop_ids, device) -> dict:
    """One SAPO-DPO step in sapo.train's order (grad_accum 1): EMA update, negatives for the fresh batch,
    push, sample, loss (reference + policy forward), backward, clip, optimizer step."""
    _FORWARD_TIME.clear()
    t0 = time.perf_counter()
    sapo.ema_update(ema, policy, cfg.ema_decay)
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    ops = timed_ops(cfg, device)
    with sapo.autocast(cfg, device):
        tuples = sapo.make_negatives(ema, fresh, cfg.segment_len, cfg.max_length, rng, pad_id, stop_ids,
                                     sapo.segment_sampling(cfg.temperature, cfg.top_k, cfg.top_p),
                                     generate=ops.generate)
    t2 = time.perf_counter()
    buffer.push(tuples)
    batch = buffer.sample(cfg.batch_size, rng)
    t3 = time.perf_counter()
    with sapo.autocast(cfg, device):
        loss, m = sapo.batch_loss("dpo", cfg, policy, ref, batch, pad_id, device, ops)
    t4 = time.perf_counter()
    loss.backward()
    t5 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    opt.step()
    t6 = time.perf_counter()
    return {"ema_update": t1 - t0, "generation": t2 - t1, "buffer": t3 - t2,
            "ref_forward": _FORWARD_TIME["ref_forward"], "policy_forward": _FORWARD_TIME["policy_forward"],
            "loss_math": t4 - t3 - _FORWARD_TIME["ref_forward"] - _FORWARD_TIME["policy_forward"],
            "backward": t5 - t4, "optimizer": t6 - t5, "step": t6 - t0,
            "gen_tokens": sum(t["segment_len"] for t in tuples), "loss_tokens": sum(T for T, _ in rows_of(batch)),
            "loss": m["loss"]}


def generator_dtype(cfg, device) -> torch.dtype:
    """The weights sapo.train generates segments with for this config on this machine (--generator-dtype auto)."""
    return sapo_fast.generation_dtype(cfg.generator_dtype, cfg.precision, device)


SAMPLING = sapo.segment_sampling(0.7, 50, 0.95)     # the authors' (and sapo.Config's) segment sampling
# generate with the given model as is (no dtype copy), drawing through TopKTopPSampler (sapo_fast)
FAST_GENERATE = sapo_fast.generate_segments(sapo.generate_segments, None)


@contextlib.contextmanager
def generate_kwargs(model, **override):
    """Calls of model.generate in this block take these arguments over the caller's."""
    original = model.generate
    if override:
        model.generate = lambda *a, **kw: original(*a, **{**kw, **override})
    try:
        yield
    finally:
        model.generate = original


def generation_plain_vs_default(args, cfg, model, examples, stop_ids, pad_id) -> dict:
    """Segment generation for one micro-batch on the plain path (--plain: fp32 weights, transformers' sampler over
    the whole vocabulary) and the default one (TopKTopPSampler, the generator dtype --generator-dtype auto picks
    here), alternating, same prompts and truncation points; medians."""
    default_dtype = generator_dtype(cfg, torch.device("cpu"))
    runs: dict = {"plain": [], "default": []}
    for r in range(args.warmup + args.reps):
        for who in (("plain", "default") if r % 2 == 0 else ("default", "plain")):
            log(f"generation {r + 1}/{args.warmup + args.reps}: {who}")
            rng = random.Random(r)
            torch.manual_seed(r)
            generate = sapo.generate_segments if who == "plain" else sapo.ops_for(cfg, torch.device("cpu")).generate
            t = time.perf_counter()
            tuples = sapo.make_negatives(model, examples, cfg.segment_len, cfg.max_length, rng, pad_id, stop_ids,
                                         sapo.segment_sampling(cfg.temperature, cfg.top_k, cfg.top_p),
                                         generate=generate)
            dt = time.perf_counter() - t
            if r >= args.warmup:
                runs[who].append({"s": dt, "tokens": sum(x["segment_len"] for x in tuples)})
    out = {"rows": len(examples), "segment_len": cfg.segment_len, "generator_dtype_default": str(default_dtype).split(".")[-1]}
    for who, v in runs.items():
        s, n = statistics.median(x["s"] for x in v), sum(x["tokens"] for x in v)
        out[who] = {"s": s, "tokens": statistics.median(x["tokens"] for x in v),
                    "tokens_per_s": n / sum(x["s"] for x in v)}
    out["speedup_tokens_per_s"] = out["default"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def medians(runs: list[dict]) -> dict:
    return {k: median_of(runs, k) for k in runs[0] if isinstance(runs[0][k], (int, float))}


# --------------------------------------------------------------------------------------------- TRL

def make_trl_trainer(init_model, tok, batch, args, workdir):
    """TRL's DPOTrainer on copies of the same weights, fp32 on the CPU, default DPO (sigmoid) loss, beta as ours."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    policy = copy.deepcopy(init_model).train()
    ref = copy.deepcopy(init_model).eval()
    if getattr(policy, "hf_quantizer", None) is not None:     # a GGUF-loaded model keeps a quantized flag
        policy.hf_quantizer.remove_quantization_config(policy)
    text = lambda ids: tok.decode(ids)  # noqa: E731  (only to build the required train_dataset; ids are fed below)
    ds = Dataset.from_list([{"prompt": text(b["prompt_ids"]), "chosen": text(b["chosen_ids"]),
                             "rejected": text(b["rejected_ids"])} for b in batch])
    config = DPOConfig(output_dir=str(workdir), bf16=False, use_cpu=True, gradient_checkpointing=False,
                       per_device_train_batch_size=len(batch), max_length=None, beta=args.beta,
                       learning_rate=args.lr, report_to=[], logging_steps=10**9, save_strategy="no",
                       disable_tqdm=True, seed=args.seed, dataloader_num_workers=0)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr)   # the optimizer ours uses, on TRL's policy
    threads = torch.get_num_threads()
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=ds, processing_class=tok,
                         optimizers=(opt, None))
    torch.set_num_threads(threads)
    trainer.current_gradient_accumulation_steps = 1   # set by Trainer.train's loop, which is not run here
    inputs = trainer.data_collator([{k: b[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for b in batch])
    return trainer, inputs, opt


# --------------------------------------------------------------------------------------------- memory (child process)

def activation_bytes(cfg, policy, ref, batch, pad_id, device) -> int:
    """Bytes autograd saves for backward in one policy forward of the batch (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sapo.autocast(cfg, device):
        loss, _ = sapo.batch_loss("dpo", cfg, policy, ref, batch, pad_id, device, sapo.ops_for(cfg, device))
    del loss
    return sum(seen.values())


def memory_child(args) -> dict:
    """A process that holds exactly what SAPO-DPO training holds, and runs SAPO steps: its peak RSS."""
    base = rss_gb()
    cfg = make_config(args, args.memory_child)
    device = torch.device("cpu")
    policy, tok = sapo_utils.models.load_model_and_tokenizer(args.model)
    _, examples = load_batch(args, tok)
    pad_id, stop_ids = tok.pad_token_id, sapo.stop_token_ids(policy, tok)
    policy.train()
    ema = copy.deepcopy(policy).eval().requires_grad_(False)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = optimizer_for(cfg, [p for p in policy.parameters() if p.requires_grad])
    gc.collect()
    setup = rss_gb()
    reset_ok = reset_peak_rss()
    buffer, rng = sapo.ReplayBuffer(cfg.buffer_capacity, cfg.buffer_sampling), random.Random(args.seed)
    sampled, sample = [], buffer.sample          # the batches the steps train on: the activations the bound counts
    buffer.sample = lambda n, rng: sampled.append(sample(n, rng)) or sampled[-1]
    torch.manual_seed(args.seed)
    for _ in range(3):   # the first step creates AdamW's state; the later ones run with everything allocated
        sapo_step(cfg, policy, ema, ref, opt, buffer, examples, rng, pad_id, stop_ids, device)
    peak = peak_rss_gb()
    # after the peak is read (it allocates): the largest of the trained batches' activations
    act = max(activation_bytes(cfg, policy, ref, b, pad_id, device) for b in sampled)
    shape = model_shape(policy)
    state = sum(p.numel() * p.element_size() for p in policy.parameters())   # policy weights
    state += sum(p.grad.numel() * p.grad.element_size() for p in policy.parameters() if p.grad is not None)
    state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    state += 2 * shape["param_bytes"]                                          # EMA + reference
    twin = sapo_fast.generator_copy(ema, generator_dtype(cfg, device))          # the generator's copy, if one is kept
    state += sum(p.numel() * p.element_size() for p in twin.parameters()) if twin is not ema else 0
    return {"runtime_baseline_gb": base, "after_setup_gb": setup, "peak_rss_gb": peak, "peak_reset": reset_ok,
            "floor_gb": state / GB, "activations_gb": act / GB, "generator_copy": twin is not ema}


def run_memory_child(args, precision: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", precision, "--batch-size", str(args.batch_size),
           "--segment-len", str(args.segment_len), "--seed", str(args.seed), "--dataset", args.dataset, "--model", args.model,
           "--lr", str(args.lr), "--threads", str(args.threads), "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"memory child failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    m = json.loads(lines[-1])
    m["bound_gb"] = 1.3 * m["floor_gb"] + m["activations_gb"]
    m["peak_over_floor"] = m["peak_rss_gb"] / m["floor_gb"]
    return m


# --------------------------------------------------------------------------------------------- the run

def make_config(args, precision: str) -> sapo.Config:
    return sapo.Config(method="dpo", batch_size=args.batch_size, segment_len=args.segment_len, precision=precision,
                       max_length=args.max_length, max_prompt_length=args.max_prompt_length, lr=args.lr, beta=args.beta, seed=args.seed, device="cpu", model=args.model)


def reset(model, state):
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])


def bf16_ties(model) -> float:
    """Fraction of the matrix weights that sit exactly halfway between two bf16 values. Weights de-quantized from a
    low-bit file (the bundled GGUF is 4-bit) sit on a coarse grid, and many land on such ties: round-to-nearest
    then sends each of them half a bf16 spacing up or down with the sign of the first update, however small."""
    ties = total = 0
    for p in model.parameters():
        if p.dim() == 2 and p.dtype == torch.float32:
            ties += int(((p.detach().view(torch.int32) & 0xFFFF) == 0x8000).sum())   # low 16 bits: what bf16 drops
            total += p.numel()
    return ties / max(total, 1)


@torch.no_grad()
def dither(model, seed: int) -> None:
    """Move every non-zero weight by a uniform fraction of its own bf16 spacing (at most half of it): off any
    quantization grid, and as close to the original weights as their bf16 copy is."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        _, e = torch.frexp(p)                                    # p = m * 2^e, 0.5 <= |m| < 1
        spacing = torch.ldexp(torch.ones_like(p), e - 8)         # bf16 keeps 8 significant bits
        p.add_(torch.where(p == 0, 0.0, (torch.rand(p.shape, generator=g) - 0.5) * spacing))


def loss_trajectories(args, policy, ref, start, batch, pad_id, device, n: int) -> dict:
    """n DPO steps on the same batch from the same weights (policy = reference = start), fresh AdamW each: fp32,
    then bf16-mixed. Losses and sequence log-probs step by step; the weights are left at start."""
    out = {}
    for prec in ("fp32", "bf16-mixed"):
        reset(policy, start)
        reset(ref, start)
        cfg = make_config(args, prec)
        opt = optimizer_for(cfg, policy.parameters())
        out[prec] = [our_dpo_step(cfg, policy, ref, opt, batch, pad_id, device) for _ in range(n)]
    reset(policy, start)
    a, b = out["fp32"], out["bf16-mixed"]
    loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    logp_rel = max(abs(x[k] - y[k]) / abs(x[k]) for x, y in zip(a, b) for k in ("logps_chosen", "logps_rejected"))
    return {"steps": n, "pairs": len(batch), "lr": args.lr, "losses_fp32": [x["loss"] for x in a],
            "losses_bf16_mixed": [y["loss"] for y in b], "max_abs_loss_diff": loss_diff, "max_rel_logps_diff": logp_rel,
            "tolerance": {"abs_loss": args.loss_tol, "rel_logps": args.logps_tol},
            "within_tolerance": loss_diff <= args.loss_tol and logp_rel <= args.logps_tol}


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(args) -> dict:
    t_start = time.perf_counter()
    res: dict = {"command": args.command, "mode": "quick" if args.quick else "full", "machine": machine_info()}
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    log("loading model")
    policy, tok = sapo_utils.models.load_model_and_tokenizer(args.model)
    policy.train()
    init_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    ties_at_start = bf16_ties(policy)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    pad_id, stop_ids = tok.pad_token_id, sapo.stop_token_ids(policy, tok)
    batch, examples = load_batch(args, tok)
    shape = model_shape(policy)
    stats = batch_stats(batch)
    flops = dpo_step_flops(batch, shape)
    res["settings"] = {k: getattr(args, k) for k in ("batch_size", "segment_len", "reps", "warmup", "lr", "beta", "seed",
                                                     "max_length", "dataset")}
    res["model"] = {"name": args.model, **shape}
    res["batch"] = stats
    res["flops"] = {"dpo_step": flops, "per_distinct_token": flops / stats["distinct_tokens"],
                    "policy_per_token_6N": 6 * shape["n_body"],
                    "note": "policy fwd+bwd = 3x forward, reference = 1x; distinct tokens: prompt and shared prefix once"}

    # 3a. the matmul peaks at this batch's shapes
    log("matmul peaks")
    res["matmul"] = {name: matmul_peak(shape, stats["distinct_padded_tokens"], stats["distinct_scored_tokens"], dt, args.matmul_reps,
                                 head_rows=64 if args.quick else 512)
                     for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}

    # 1. our DPO step vs TRL's, alternating
    cfg32 = make_config(args, "fp32")
    opt = optimizer_for(cfg32, policy.parameters())
    ours, trl_runs, trl_res = [], [], None
    if not args.no_trl:
        log("TRL DPOTrainer setup")
        with tempfile.TemporaryDirectory() as wd:
            trainer, inputs, trl_opt = make_trl_trainer(policy, tok, batch, args, wd)
            assert inputs["input_ids"].shape == (stats["rows"], stats["max_len"]), inputs["input_ids"].shape
            assert int(inputs["attention_mask"].sum()) == stats["real_tokens"]
            for r in range(args.warmup + args.reps):
                order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
                for who in order:
                    log(f"DPO step {r + 1}/{args.warmup + args.reps}: {who}")
                    if who == "ours":
                        ours.append(our_dpo_step(cfg32, policy, ref, opt, batch, pad_id, device))
                    else:
                        trl_runs.append(trl_step(trainer, inputs, trl_opt, cfg32.max_grad_norm))
            del trainer, inputs, trl_opt
        gc.collect()
    else:
        for r in range(args.warmup + args.reps):
            log(f"DPO step {r + 1}/{args.warmup + args.reps}: ours")
            ours.append(our_dpo_step(cfg32, policy, ref, opt, batch, pad_id, device))
    fp32_losses = [o["loss"] for o in ours]
    o_med = medians(ours[args.warmup:])
    log("one DPO step under the profiler")
    profile_ = step_profile(cfg32, policy, ref, opt, batch, pad_id, device, res["matmul"]["fp32"]["peak_flops"])
    res["dpo"] = {"ours": {**o_med, "tokens_per_s": stats["real_tokens"] / o_med["step"],
                           "utilization_fp32": flops / o_med["step"] / res["matmul"]["fp32"]["peak_flops"]},
                  "ours_runs": [o["step"] for o in ours], "losses_ours": fp32_losses, "profile": profile_}
    if trl_runs:
        t_med = medians(trl_runs[args.warmup:])
        res["dpo"]["trl"] = {**t_med, "tokens_per_s": stats["real_tokens"] / t_med["step"],
                             "utilization_fp32": flops / t_med["step"] / res["matmul"]["fp32"]["peak_flops"]}
        res["dpo"]["trl_runs"] = [t["step"] for t in trl_runs]
        res["dpo"]["losses_trl"] = [t["loss"] for t in trl_runs]
        res["dpo"]["speedup_step"] = t_med["step"] / o_med["step"]                   # = ours tokens/s / TRL tokens/s
        res["dpo"]["speedup_forward_backward"] = t_med["forward_backward"] / o_med["forward_backward"]
        # the same optimizer on the same weights: losses agree step by step (fp noise only)
        res["dpo"]["max_abs_loss_diff_vs_trl"] = max(abs(a - b) for a, b in zip(fp32_losses, res["dpo"]["losses_trl"]))

    # 3b. bf16-mixed (fp32 master weights, bf16 autocast). The same steps as the fp32 ones above: same batch, from the
    # same initial weights, a fresh AdamW, so the two loss trajectories compare step by step. Without bf16 matmul
    # units (no AMX / AVX512-BF16) bf16 runs many times slower than fp32; then it is timed once, on the first
    # --bf16-pairs pairs (default 2), against fp32 steps on those same pairs, and no trajectory is compared.
    res["bf16_slower_than_fp32_matmul"] = slow16 = res["matmul"]["bf16"]["peak_flops"] < res["matmul"]["fp32"]["peak_flops"]
    nb = min(args.bf16_pairs or (2 if slow16 else args.batch_size), args.batch_size)
    bf16_reps, bf16_warmup = (1, 0) if slow16 else (args.reps, args.warmup)
    batch16, stats16, flops16 = batch[:nb], batch_stats(batch[:nb]), dpo_step_flops(batch[:nb], shape)
    examples16 = examples[:nb]
    res["settings"].update(bf16_reps_run=bf16_reps, bf16_pairs=nb)
    fp32_state = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    if nb < args.batch_size:
        log(f"fp32 DPO steps on the {nb} pairs that bf16-mixed runs")
        small = [our_dpo_step(cfg32, policy, ref, opt, batch16, pad_id, device) for _ in range(1 + max(1, args.reps // 2))]
        o16_med = medians(small[1:])
    else:
        o16_med = o_med
    reset(policy, init_state)
    cfg16 = make_config(args, "bf16-mixed")
    opt16 = optimizer_for(cfg16, policy.parameters())
    bf = []
    for r in range(bf16_warmup + bf16_reps):
        log(f"bf16-mixed DPO step {r + 1}/{bf16_warmup + bf16_reps} ({nb} pairs)")
        bf.append(our_dpo_step(cfg16, policy, ref, opt16, batch16, pad_id, device))
    reset(policy, fp32_state)
    b_med = medians(bf[bf16_warmup:])
    res["dpo"]["bf16_mixed"] = {**b_med, "pairs": nb, "tokens_per_s": stats16["real_tokens"] / b_med["step"],
                                "utilization_bf16": flops16 / b_med["step"] / res["matmul"]["bf16"]["peak_flops"],
                                "fp32_step_same_pairs": o16_med["step"], "speedup_vs_fp32": o16_med["step"] / b_med["step"]}
    if nb == args.batch_size:   # step k of both runs: same batch, weights trained k-1 steps from the same start
        loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, bf))
        logp_rel = max(abs(a[k] - b[k]) / abs(a[k]) for a, b in zip(ours, bf) for k in ("logps_chosen", "logps_rejected"))
        res["precision"] = {"model": {"steps": len(bf), "pairs": nb, "lr": args.lr, "bf16_ties": ties_at_start,
                                      "losses_fp32": [o["loss"] for o in ours], "losses_bf16_mixed": [b["loss"] for b in bf],
                                      "max_abs_loss_diff": loss_diff, "max_rel_logps_diff": logp_rel,
                                      "tolerance": {"abs_loss": args.loss_tol, "rel_logps": args.logps_tol},
                                      "within_tolerance": loss_diff <= args.loss_tol and logp_rel <= args.logps_tol}}
        # the same comparison with the weights dithered off the file's 4-bit grid: the bf16 path itself
        log("bf16-mixed vs fp32 on the dithered weights")
        reset(policy, init_state)
        dither(policy, args.seed)
        dithered, ties = {k: v.detach().clone() for k, v in policy.state_dict().items()}, bf16_ties(policy)
        res["precision"]["dithered"] = {**loss_trajectories(args, policy, ref, dithered, batch, pad_id, device, len(bf)),
                                        "bf16_ties": ties}
        del dithered
        reset(ref, init_state)
        reset(policy, fp32_state)
    else:
        res["precision"] = None
    del opt16

    # 2a. segment generation, the plain path vs the default one, on the fp32 SAPO step's micro-batch
    ema0 = copy.deepcopy(policy).eval().requires_grad_(False)
    res["generation"] = generation_plain_vs_default(args, dataclasses.replace(cfg32, batch_size=len(examples)), ema0,
                                                examples, stop_ids, pad_id)
    del ema0
    gc.collect()

    # 2. SAPO steps, broken down, fp32 then bf16-mixed, each from the initial weights (AdamW state allocated). Each
    # alternates with one of our DPO steps on the DPO batch (order flipped every round), so that the ratio of the two
    # compares steps timed side by side: generation speed on this machine drifts by 20% over minutes.
    res["sapo"], opt_state = {}, opt.state_dict()
    for prec, cfg in (("fp32", cfg32), ("bf16-mixed", cfg16)):
        reset(policy, init_state)
        ema = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = optimizer_for(cfg, policy.parameters())
        opt.load_state_dict(copy.deepcopy(opt_state))
        buffer, rng = sapo.ReplayBuffer(cfg.buffer_capacity, cfg.buffer_sampling), random.Random(args.seed)
        torch.manual_seed(args.seed)
        n = args.warmup + args.reps if prec == "fp32" else bf16_warmup + bf16_reps
        fresh, dpo_tokens = (examples, stats["real_tokens"]) if prec == "fp32" else (examples16, stats16["real_tokens"])
        cfg = dataclasses.replace(cfg, batch_size=len(fresh))
        runs, dpo_runs = [], []
        for r in range(n):
            for who in (("sapo", "dpo") if r % 2 == 0 else ("dpo", "sapo")):
                log(f"{'SAPO' if who == 'sapo' else 'DPO'} step {r + 1}/{n} ({prec}, {len(fresh)} pairs)")
                if who == "sapo":
                    runs.append(sapo_step(cfg, policy, ema, ref, opt, buffer, fresh, rng, pad_id, stop_ids, device))
                else:
                    dpo_runs.append(our_dpo_step(cfg, policy, ref, opt, batch if prec == "fp32" else batch16, pad_id, device))
        t = time.perf_counter()
        sapo.copy_weights(ref, ema)       # the reference refresh (once per epoch of prompts), amortized below
        refresh = time.perf_counter() - t
        reset(ref, init_state)            # back to the initial weights for the next precision
        skip = min(args.warmup if prec == "fp32" else bf16_warmup, n - 1)
        s_med, dpo_med = medians(runs[skip:]), medians(dpo_runs[skip:])
        steps_per_epoch = math.ceil(args.epoch_prompts / args.batch_size)
        train_part = s_med["ref_forward"] + s_med["policy_forward"] + s_med["loss_math"] + s_med["backward"]
        equal = s_med["step"] - train_part * (1 - dpo_tokens / s_med["loss_tokens"])
        res["sapo"][prec] = {**s_med, "pairs": len(fresh), "ref_refresh_per_step": refresh / steps_per_epoch,
                             "generator_dtype": str(generator_dtype(cfg, device)).split(".")[-1],
                             "gen_tokens_per_s": s_med["gen_tokens"] / s_med["generation"],
                             "dpo_step_alternating": dpo_med["step"], "ratio_to_dpo": s_med["step"] / dpo_med["step"],
                             "ratio_to_dpo_equal_tokens": equal / dpo_med["step"]}
        del ema, opt, buffer
        gc.collect()

    # 4. memory, in child processes that hold only what SAPO training holds
    log("memory child (fp32)")
    res["memory"] = {"fp32": run_memory_child(args, "fp32")}

    d, s, mem = res["dpo"], res["sapo"], res["memory"]
    res["goals"] = {
        "dpo_ge_3x_trl_tokens_per_s": d["speedup_step"] >= 3.0 if "trl" in d else None,
        "sapo_le_1.2x_dpo_fp32": s["fp32"]["ratio_to_dpo"] <= 1.2,
        "generation_ge_2.5x_tokens_per_s_of_plain": res["generation"]["speedup_tokens_per_s"] >= 2.5,
        "utilization_fp32_ge_55pct": d["ours"]["utilization_fp32"] >= 0.55,
        "utilization_bf16_ge_40pct": d["bf16_mixed"]["utilization_bf16"] >= 0.4,
        "peak_memory_le_1.3x_floor_plus_activations": mem["fp32"]["peak_rss_gb"] <= mem["fp32"]["bound_gb"],
        "bf16_mixed_losses_within_tolerance (model as shipped)": res["precision"]["model"]["within_tolerance"] if res["precision"] else None,
        "bf16_mixed_losses_within_tolerance (weights off the 4-bit grid)":
            res["precision"]["dithered"]["within_tolerance"] if res["precision"] else None}
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    res["wall_s"] = time.perf_counter() - t_start
    return res


# --------------------------------------------------------------------------------------------- report

def g(x, unit=1e9):
    return f"{x / unit:.1f}"


def report(res) -> str:
    m, b, d, s, mem, mm = res["machine"], res["batch"], res["dpo"], res["sapo"], res["memory"], res["matmul"]
    out = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_cpu_capability']}, "
           f"{m['torch_threads']} threads), ISA {'/'.join(m['isa_flags']) or '-'}, transformers {m['transformers']}, "
           f"TRL {m['trl']}; load average {m['loadavg_start']:.1f} at start, {m['loadavg_end']:.1f} at end; {res['wall_s']:.0f} s",
           f"model: {res['model']['name']} fp32, {res['model']['n_params'] / 1e6:.1f} M parameters "
           f"({res['model']['n_body'] / 1e6:.1f} M in the blocks); batch: {res['settings']['batch_size']} pairs = {b['rows']} rows, "
           f"{b['real_tokens']} pair tokens ({b['completion_tokens']} scored) = {b['distinct_tokens']} distinct tokens (each prompt and "
           f"shared response prefix once; {b['distinct_scored_tokens']} scored); two-row layout (TRL) padded to {b['rows']}x{b['max_len']} "
           f"({100 * b['real_fraction']:.0f}% real), shared-prefix layout (ours) to {b.get('distinct_rows', b['rows'] // 2)}x"
           f"{b['distinct_padded_tokens'] // b.get('distinct_rows', b['rows'] // 2)}; medians of {res['settings']['reps']} runs after "
           f"{res['settings']['warmup']} warm-up",
           f"model FLOPs of the step: {res['flops']['dpo_step'] / 1e12:.2f} TFLOP = {res['flops']['per_distinct_token'] / 1e9:.2f} "
           f"GFLOP per distinct token (policy fwd+bwd + reference fwd, attention included; 6N_body alone = "
           f"{res['flops']['policy_per_token_6N'] / 1e9:.2f}); tokens/s below count pair tokens, the same work for both trainers", ""]
    out += ["**1. Offline DPO step: ours vs TRL DPOTrainer (fp32, same token ids, alternating)**", "",
            "| | ours: sapo.batch_loss('dpo') | TRL 1.16 DPOTrainer.training_step | TRL / ours |", "|---|---|---|---|"]
    o, t = d["ours"], d.get("trl")
    rows = [("forward + backward (incl. reference forward), s", "forward_backward", "{:.2f}"),
            ("clip + AdamW step, s", "optimizer", "{:.2f}"), ("whole step, s", "step", "{:.2f}")]
    for label, key, fmt in rows:
        out.append(f"| {label} | {fmt.format(o[key])} | {fmt.format(t[key]) if t else '-'} | "
                   f"{t[key] / o[key]:.2f}x |" if t else f"| {label} | {fmt.format(o[key])} | - | - |")
    if t:
        out.append(f"| real tokens/s (whole step) | {o['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | "
                   f"ours {d['speedup_step']:.2f}x faster |")
        out.append(f"| utilization of fp32 matmul peak | {100 * o['utilization_fp32']:.0f}% | {100 * t['utilization_fp32']:.0f}% | |")
        out.append(f"| losses step by step (max abs diff) | | | {d['max_abs_loss_diff_vs_trl']:.1e} |")
        ex = executed_linear_flops(b, res["model"])
        out.append(f"| linear-layer work executed (padding and every computed logit included), TFLOP | "
                   f"{ex['ours'] / 1e12:.2f} (no padding: {ex['ours_unpadded'] / 1e12:.2f}) | {ex['trl'] / 1e12:.2f} | "
                   f"{ex['ratio']:.2f}x |")
    nb = d["bf16_mixed"]["pairs"]
    out += ["", "**2. SAPO step, broken down (medians, s)**", "",
            f"| part | fp32, {s['fp32']['pairs']} pairs | bf16-mixed, {s['bf16-mixed']['pairs']} pairs |", "|---|---|---|"]
    parts = [("EMA update", "ema_update"), ("segment generation (make_negatives, KV cache)", "generation"),
             ("replay buffer push + sample", "buffer"), ("reference forward", "ref_forward"),
             ("policy forward", "policy_forward"), ("loss math (DPO, metrics)", "loss_math"), ("backward", "backward"),
             ("optimizer (clip + AdamW)", "optimizer"), ("reference refresh, per step (1/epoch)", "ref_refresh_per_step"),
             ("**SAPO step**", "step")]
    for label, key in parts:
        out.append(f"| {label} | {s['fp32'][key]:.3f} | {s['bf16-mixed'][key]:.3f} |")
    out.append(f"| generated tokens (tokens/s) | {s['fp32']['gen_tokens']:.0f} ({s['fp32']['gen_tokens_per_s']:.0f}/s) | "
               f"{s['bf16-mixed']['gen_tokens']:.0f} ({s['bf16-mixed']['gen_tokens_per_s']:.0f}/s) |")
    out.append(f"| generator weights (--generator-dtype auto here) | {s['fp32'].get('generator_dtype', '-')} | "
               f"{s['bf16-mixed'].get('generator_dtype', '-')} |")
    out.append(f"| our DPO step, alternating with the SAPO steps | {s['fp32']['dpo_step_alternating']:.3f} | "
               f"{s['bf16-mixed']['dpo_step_alternating']:.3f} |")
    out.append(f"| **SAPO step / DPO step** | {s['fp32']['ratio_to_dpo']:.2f} | {s['bf16-mixed']['ratio_to_dpo']:.2f} |")
    out.append(f"| same, loss part scaled to the DPO batch's tokens ({s['fp32']['loss_tokens']:.0f} vs {b['real_tokens']}) | "
               f"{s['fp32']['ratio_to_dpo_equal_tokens']:.2f} | {s['bf16-mixed']['ratio_to_dpo_equal_tokens']:.2f} |")
    gen = res.get("generation")
    if gen:
        out += ["", f"**2a. Segment generation, one micro-batch of {gen['rows']} rows, G = {gen['segment_len']} "
                "(alternating, medians)**", "",
                "| | s per call | new tokens | tokens/s |", "|---|---|---|---|",
                f"| --plain: fp32 weights, transformers' sampler (whole vocabulary) | {gen['plain']['s']:.2f} | "
                f"{gen['plain']['tokens']:.0f} | {gen['plain']['tokens_per_s']:.0f} |",
                f"| default: {gen['generator_dtype_default']} weights, TopKTopPSampler | {gen['default']['s']:.2f} | "
                f"{gen['default']['tokens']:.0f} | {gen['default']['tokens_per_s']:.0f} |",
                f"| **default / plain, tokens/s** | | | **{gen['speedup_tokens_per_s']:.2f}x** |"]
    p = res["precision"]
    out += ["", "**3. Against the limit (our DPO step)**", "",
            f"| | fp32, {b['rows'] // 2} pairs | bf16-mixed (fp32 master weights), {nb} pairs |", "|---|---|---|",
            f"| dense matmul peak here, GFLOP/s (best shape) | {g(mm['fp32']['peak_flops'])} | {g(mm['bf16']['peak_flops'])} |",
            f"| output-layer matmul, GFLOP/s | {g(mm['fp32']['output_layer_flops'])} | {g(mm['bf16']['output_layer_flops'])} |",
            f"| DPO step, s | {o['step']:.2f} | {d['bf16_mixed']['step']:.2f} |",
            f"| real tokens/s | {o['tokens_per_s']:.0f} | {d['bf16_mixed']['tokens_per_s']:.0f} |",
            f"| achieved model GFLOP/s | {g(res['flops']['dpo_step'] / o['step'])} | "
            f"{g(d['bf16_mixed']['utilization_bf16'] * mm['bf16']['peak_flops'])} |",
            f"| **utilization** of that precision's peak | {100 * o['utilization_fp32']:.0f}% | {100 * d['bf16_mixed']['utilization_bf16']:.0f}% |",
            f"| speed vs fp32 on the same pairs | 1.00x | {d['bf16_mixed']['speedup_vs_fp32']:.2f}x (fp32: "
            f"{d['bf16_mixed']['fp32_step_same_pairs']:.2f} s) |"]
    pr = d.get("profile")
    if pr:
        out += [f"| where the fp32 step's time goes (one step under torch.profiler, self time) | matrix multiplies "
                f"{100 * pr['matmul_share']:.0f}%, attention kernels {100 * pr['attention_share']:.0f}%, optimizer "
                f"{100 * pr['optimizer_share']:.0f}%, the rest (norms, rotary, masks, softmax, elementwise, autograd) "
                f"{100 * (1 - pr['matmul_share'] - pr['attention_share'] - pr['optimizer_share']):.0f}% | |",
                f"| the matrix multiplies alone, on the shapes they ran (padding included) | {pr['matmul_gflops']:.0f} "
                f"GFLOP/s = {100 * pr['matmul_efficiency']:.0f}% of the peak | |",
                f"| real tokens / positions run in the shared-prefix rows | {b['distinct_tokens']} / "
                f"{b['distinct_padded_tokens']} = {100 * b['distinct_tokens'] / b['distinct_padded_tokens']:.0f}% | |"]
    if p:
        fmt = lambda xs: " ".join(f"{x:.4f}" for x in xs)  # noqa: E731
        for label, q in (("model as shipped", p["model"]), ("weights dithered off the 4-bit grid", p["dithered"])):
            out += [f"| DPO loss at steps 1..{q['steps']}, same batch, same start, lr {q['lr']:g}: {label} "
                    f"({100 * q['bf16_ties']:.1f}% of weights on bf16 ties) | {fmt(q['losses_fp32'])} | {fmt(q['losses_bf16_mixed'])} |",
                    f"| bf16-mixed vs fp32 over those steps: {label} | | DPO loss max abs diff {q['max_abs_loss_diff']:.1e} (tol "
                    f"{q['tolerance']['abs_loss']:g}); sequence log-prob max rel diff {q['max_rel_logps_diff']:.1e} (tol "
                    f"{q['tolerance']['rel_logps']:g}) |"]
    copy_note = ", the generator's bf16 copy" if mem["fp32"].get("generator_copy") else ""
    out += ["", f"**4. Memory (a SAPO-DPO training process, fp32: policy, grads, AdamW, EMA, reference{copy_note})**", "",
            "| | fp32 |", "|---|---|"]
    for label, key in (("model-state floor, GB", "floor_gb"), ("one batch of activations (saved for backward; the largest batch the steps trained on), GB", "activations_gb"),
                       ("python + torch runtime before the model, GB", "runtime_baseline_gb"),
                       ("**peak RSS**, GB", "peak_rss_gb"), ("goal bound 1.3 x floor + activations, GB", "bound_gb"),
                       ("peak / floor", "peak_over_floor")):
        out.append(f"| {label} | {mem['fp32'][key]:.2f} |")
    if res.get("bf16_slower_than_fp32_matmul"):
        out += ["", f"Note: bf16 matmul is slower than fp32 on this CPU (no AMX / AVX512-BF16), so bf16-mixed was timed "
                f"{res['settings']['bf16_reps_run']} time(s), on {nb} pairs, against fp32 on the same pairs."]
    out += ["", "**Goals**", ""] + [f"- {k}: {'met' if v else ('n/a' if v is None else 'NOT met')}" for k, v in res["goals"].items()]
    return "\n".join(out)


def parse(argv=None, ap=None, default_out="perf_results.json", script="bench/perf.py"):
    """The benchmark's flags; bench/levers.py passes its own parser with its flags added."""
    ap = ap or argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings, 1 repetition, no warm-up (a smoke test)")
    ap.add_argument("--batch-size", type=int, default=None, help="preference pairs per step (default 8; --quick 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default 5; --quick 1)")
    ap.add_argument("--bf16-pairs", type=int, default=None, help="pairs for the bf16-mixed timings (default: all, or 2 "
                    "when bf16 matmul is slower than fp32 here)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first runs per measurement (default 1; --quick 0)")
    ap.add_argument("--segment-len", type=int, default=None, help="SAPO segment length G (default 32, sapo.py's; --quick 8)")
    ap.add_argument("--matmul-reps", type=int, default=None, help="timed calls per matmul shape (default 5; --quick 2)")
    ap.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (sapo.py's default; the losses move, so the "
                    "step-by-step comparisons mean something; speed does not depend on it)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-length", type=int, default=None, help="longest prompt + response kept (default 512, sapo.py's; --quick 96)")
    ap.add_argument("--max-prompt-length", type=int, default=384)
    ap.add_argument("--epoch-prompts", type=int, default=400, help="prompts per epoch, to amortize the reference refresh")
    ap.add_argument("--loss-tol", type=float, default=0.02, help="bf16-mixed vs fp32: max abs DPO-loss difference allowed")
    ap.add_argument("--logps-tol", type=float, default=0.02, help="bf16-mixed vs fp32: max relative sequence log-prob difference")
    ap.add_argument("--dataset", default=str(sapo.BUNDLED_TRAIN))
    ap.add_argument("--model", default=sapo.BUNDLED_MODEL)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch CPU threads (default: torch's, one per core); on a loaded machine 1 thread can be faster")
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL comparison (TRL not installed)")
    ap.add_argument("--out", default=None, help=f"JSON results (default bench/{default_out})")
    ap.add_argument("--report-from", default=None, help="print the report of a results JSON written earlier (no run)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = {"batch_size": 2, "reps": 1, "warmup": 0, "segment_len": 8, "matmul_reps": 1, "max_length": 96}
    full = {"batch_size": 8, "reps": 5, "warmup": 1, "segment_len": 32, "matmul_reps": 5, "max_length": 512}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.max_prompt_length = min(args.max_prompt_length, args.max_length - 1)
    args.out = args.out or str(ROOT / "bench" / default_out)
    args.command = " ".join(shlex.quote(a) for a in ["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT) if argv is None else script]
                            + (sys.argv[1:] if argv is None else list(argv)))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)), flush=True)
        return 0
    if args.report_from:
        try:
            res = json.loads(Path(args.report_from).read_text())
            print(f"command: {res['command']}\n" + report(res))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {args.report_from}: not a bench/perf.py results file ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        return 0
    print(f"command: {args.command}", flush=True)
    if not args.no_trl and _trl_version() is None:
        print("error: TRL is not installed: pip install torch==2.13.0 -r bench/requirements-perf.txt (or pass --no-trl)",
              file=sys.stderr)
        return 2
    res = run(args)
    text = report(res)
    print(text, flush=True)
    res["report_markdown"] = text
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
