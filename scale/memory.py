"""Per-process peak memory of scale/sapo_recipe.py, by component, for any config and world size.

    python -m scale.memory --config scale/configs/llama3_8b_sapo_dpo.yaml --nproc 8
    python -m scale.memory --config scale/configs/llama3_8b_sapo_dpo.yaml --nproc 8 --seq-len 2048 --response-len 1024 batch_size=10
    python -m scale.memory --config scale/configs/llama3_8b_sapo_dpo.yaml --nproc 8 --largest-batch 80
    python -m scale.memory --config scale/configs/tiny_cpu.yaml --nproc 2 --json ...    (what the tests call)

Shapes come from building the configured model on the meta device (no memory, no weights); key=value arguments
override the config as on `tune run`. Sizes are in GiB = 2^30 bytes, the unit of the recipe's memory/* metrics
(--json: bytes).

The model of one process (W processes, P parameters, L layers of P_l, width D, MLP width F, vocabulary V; c the
compute dtype's bytes; B prompts per micro-batch; T = prompt + y+ tokens; R = response tokens, G = segment_len):
  sharded state   policy weights, gradients and optimizer state (trained dtype), EMA and reference (frozen
                  dtype), each / W; LoRA: the frozen base / W plus adapter-sized copies. 0 with fsdp_cpu_offload.
  gathered weights
                  the layer in use and the prefetched next one, each P_l in the gathered dtype (bf16 under
                  bf16-mixed with FSDP mixed precision, else the stored dtype), their unsharded gradients and the fp32
                  reduce-scatter input in backward, and the output layer (V x D) at the loss. Without FSDP mixed
                  precision (`fsdp_mixed_precision: False`, torchtune's own shard_model) autocast also caches a bf16
                  copy of every trained weight for the length of the forward: + 2 P (+ 2 P / W on one process).
  activations     activation checkpointing keeps each layer's input: L x D x (residual dtype) per token, over
                  B x (T + R) tokens (one row per tuple: x, y+ and y-'s own tokens; packing short tuples into
                  shared rows only lowers it) or B x 2T (two rows), and
                  recomputes one layer in backward (its activations and their gradients, ~ (8 D + 2 kv + 4 F) x c x 2
                  per token). One row per tuple adds the (B, T', T') attention mask, bool plus its float bias.
  logits          the output layer runs at the N = 2 B R scored positions only, C = min(N, sapo_fast.CHUNK_POSITIONS)
                  positions at a time, each chunk recomputed in backward (sapo_fast.chunked_token_logps): one chunk's
                  (C, V) logits are alive, c + 4 (fp32 copy) + 4 (log-softmax) + 4 (its gradient) bytes per entry in
                  backward, plus the scored positions' hidden states (N x D x c) kept for it. The reference's
                  (no grad): c + 8 per entry of one chunk (its logits, the fp32 copy, cross-entropy's log-softmax).
  generation      the EMA gathered whole (gather_generator_weights, W > 1: the (W-1)/W of it other processes hold),
                  its KV cache (L x 2 x kv x (T + G) x B' x c) and one layer's prefill activations, for the B' rows
                  of one generate call: B x gradient_accumulation_steps (all of a step's micro-batches), or
                  generate_rows_per_call.
  host process baseline (CPU runs only)
                  what a CPU process holds before any model: python + torch + torchtune + the recipe imported, gloo,
                  tokenizer and data (HOST_BASELINE_GIB, measured; the recipe logs its own as memory/runtime_rss_gib;
                  --runtime-gib overrides).
  CUDA context and NCCL buffers (GPU runs): outside torch's allocator, so not in memory/peak_allocated_gib, but on
                  the GPU: CUDA_CONTEXT_GIB + NCCL_BUFFERS_GIB with several processes (an allowance; --runtime-gib).
  checkpoint save process 0 gathers each model's full state dict in turn, then the full optimizer state, into host
                  memory: max(P x trained dtype, P x optimizer bytes). A phase of the RSS peak on CPU runs; on CUDA
                  host RAM besides the GPU (printed, not in the GPU peak).
The training peak is the largest of the phases: generation, reference forward, policy forward + backward,
optimizer step (torch's foreach optimizers hold temporaries of one state tensor's size, P / W x trained dtype),
and on CPU the checkpoint save.

Not counted: memory an allocator keeps after tensors are freed. On CPU, glibc keeps freed blocks below its mmap
threshold (up to 32 MB) in per-thread arenas, so RSS ratchets above the live tensors: on the 55 M-parameter CPU runs
the estimate is 27% below the measured peak RSS (scale/README.md, scale/memory_phases.py), outside the 15% target.
Not validated on GPUs: no GPU was available.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
CHUNK_POSITIONS = 2048   # = sapo_fast.CHUNK_POSITIONS (tests/test_scale.py checks)
# What a CPU process holds before any model (python + torch + torchtune + sapo imported, gloo initialised, tokenizer
# and data read): measured 0.41 GiB on the 2-core dev machine (scale/README.md).
HOST_BASELINE_GIB = 0.41
# On a GPU, what lives outside torch's allocator: the CUDA context (kernels, cuBLAS / cuDNN workspaces: 0.5-1 GiB
# on current drivers with lazy module loading) and, with several processes, NCCL's buffers (channels x peers x
# NCCL_BUFFSIZE, 4 MiB by default: about 1 GiB on 8 GPUs). An allowance, not a measurement: --runtime-gib sets it.
CUDA_CONTEXT_GIB = 1.0
NCCL_BUFFERS_GIB = 1.0


@dataclass
class Shapes:
    P: int            # all parameters (LoRA: the base's)
    P_layer: int      # one transformer layer
    P_out: int        # the output layer (V x D; 0 extra when tied)
    L: int
    D: int
    F: int
    kv: int           # num_kv_heads x head_dim
    V: int
    adapters: int = 0  # LoRA parameters


def model_shapes(cfg_model) -> Shapes:
    """Count parameters of the configured builder on the meta device."""
    import torch
    from torchtune import config
    with torch.device("meta"):
        m = config.instantiate(cfg_model)
    named = list(m.named_parameters())
    adapters = sum(p.numel() for n, p in named if "lora" in n or "magnitude" in n)
    P = sum(p.numel() for n, p in named) - adapters
    layer = m.layers[0]
    P_layer = sum(p.numel() for n, p in layer.named_parameters() if "lora" not in n)
    out = getattr(m, "output", None)
    P_out = sum(p.numel() for n, p in out.named_parameters() if "lora" not in n) if isinstance(out, torch.nn.Module) else 0
    attn = layer.attn
    D = m.tok_embeddings.embedding_dim
    w1 = getattr(layer.mlp, "w1", None)
    F = w1.weight.shape[0] if w1 is not None and hasattr(w1, "weight") else 4 * D
    return Shapes(P=P, P_layer=P_layer, P_out=P_out or m.tok_embeddings.weight.numel(), L=len(m.layers), D=D, F=F,
                  kv=attn.num_kv_heads * attn.head_dim, V=m.tok_embeddings.num_embeddings, adapters=adapters)


def optimizer_state_bytes(cfg_opt, param_bytes: int) -> float:
    """Bytes of optimizer state per trained parameter."""
    name = str(cfg_opt.get("_component_", "")).lower()
    if "8bit" in name:
        return 2.0
    if "adam" in name:
        return 2.0 * param_bytes
    if "rmsprop" in name:
        return param_bytes * (1 + (float(cfg_opt.get("momentum", 0) or 0) > 0) + bool(cfg_opt.get("centered", False)))
    if "sgd" in name:
        return param_bytes * (float(cfg_opt.get("momentum", 0) or 0) > 0)
    return 2.0 * param_bytes   # unknown: assume Adam-like


def estimate(cfg, nproc: int, seq_len: int | None = None, response_len: int | None = None, batch_size: int | None = None,
             runtime_gib: float | None = None, shapes: Shapes | None = None) -> dict:
    """Per-process bytes by component and phase, and the peak. cfg: an OmegaConf config of the recipe."""
    s = shapes or model_shapes(cfg.model)
    W = nproc
    B = int(batch_size or cfg.batch_size)
    T = int(seq_len or cfg.max_length)
    R = int(response_len or max(1, T // 2))
    G = min(int(cfg.segment_len), R)
    dtype = cfg.dtype
    lora = "lora_rank" in cfg.model
    dpo = cfg.method == "sapo-dpo"
    cpu = str(cfg.device).startswith("cpu")
    offload = bool(cfg.get("fsdp_cpu_offload", False))
    mixed = dtype == "bf16-mixed"
    fsdp_mp = mixed and bool(cfg.get("fsdp_mixed_precision", True)) and W > 1
    shared_prefix = bool(cfg.get("shared_prefix", True))
    wb = 2 if dtype == "bf16" else 4          # trained weights
    fb = 4 if dtype == "fp32" else 2          # frozen copies: EMA, reference, LoRA base
    c = 4 if dtype == "fp32" else 2           # compute
    opt_b = optimizer_state_bytes(cfg.optimizer, wb)

    # -- sharded state (on the device unless offloaded) ---------------------------------------------------
    state = {}
    if lora:
        A = s.adapters
        state["base weights (frozen, shared)"] = s.P * (fb if mixed else wb) / W
        state["adapters: policy + grads + optimizer + EMA + reference"] = A * (4 + 4 + 2 * 4 + 4 + 4 * dpo) / W
    else:
        state["policy weights"] = s.P * wb / W
        state["gradients"] = s.P * wb / W
        state["optimizer state"] = s.P * opt_b / W
        state["EMA"] = s.P * fb / W
        if dpo:
            state["reference"] = s.P * fb / W
    state_total = sum(state.values())
    on_device_state = 0.0 if offload and W > 1 else state_total

    # -- working memory ------------------------------------------------------------------------------------
    gb = 2 if fsdp_mp else (fb if lora else wb)                            # a gathered weight's bytes
    gathered_layers = 0.0 if W == 1 else 2 * s.P_layer * gb                 # in use + prefetched
    trained_layer = 0 if lora else s.P_layer                               # LoRA: adapter gradients only (small)
    grad_layer = 0.0 if W == 1 else trained_layer * (gb + 4)               # unsharded grads + fp32 reduce-scatter input
    out_layer = 0.0 if W == 1 else s.P_out * gb
    autocast_cache = 0.0
    if mixed and not fsdp_mp and not lora:
        autocast_cache = 2 * s.P                                           # bf16 copy of every trained fp32 weight
    act_b = c if (fsdp_mp or lora or not mixed) else 4                      # residual stream: fp32 embeddings -> 4
    tokens = B * (T + R) if shared_prefix else B * 2 * T
    row_len = (T + R) if shared_prefix else T
    rows = B if shared_prefix else 2 * B
    checkpoints = tokens * s.L * s.D * act_b if cfg.get("enable_activation_checkpointing", False) else \
        tokens * s.L * (8 * s.D + 2 * s.kv + 4 * s.F) * c
    per_token_layer = (8 * s.D + 2 * s.kv + 4 * s.F) * c
    recompute = tokens * per_token_layer * 2
    mask = rows * row_len ** 2 * (1 + c) if shared_prefix else 0
    N = B * 2 * R                                                          # scored positions
    C = min(N, CHUNK_POSITIONS)                                            # positions per output-layer chunk
    hidden_scored = N * s.D * c
    logits_bwd = C * s.V * (c + (4 if c < 4 else 0) + 4 + 4) + hidden_scored
    logits_ref = C * s.V * (c + (4 if c < 4 else 0) + 4)
    policy_phase = {
        "gathered weights (2 layers, output layer)": gathered_layers + out_layer,
        "gathered gradients (1 layer, reduce-scatter)": grad_layer,
        "autocast weight cache (no FSDP mixed precision)": autocast_cache,
        "activation checkpoints": checkpoints,
        "recomputed layer (backward)": recompute,
        "attention mask (one row per tuple)": mask,
        "logits at response positions (one chunk)": logits_bwd,
    }
    # the loss's peak: logits are alive with the checkpoints; the recomputed layer comes after the logits are freed
    policy_peak = (gathered_layers + out_layer + autocast_cache + checkpoints + mask
                   + max(logits_bwd, recompute + grad_layer))
    ref_phase = (gathered_layers + out_layer + tokens * per_token_layer + mask + logits_ref) if dpo else 0.0
    ema_gather = s.P * fb * (W - 1) / W if (W > 1 and cfg.get("gather_generator_weights", True)) else 0.0
    # one generate call decodes this process's rows of all the step's micro-batches (generate_rows_per_call: fewer)
    gen_rows = B * int(cfg.get("gradient_accumulation_steps", 1))
    if cfg.get("generate_rows_per_call"):
        gen_rows = max(B, min(gen_rows, int(cfg.generate_rows_per_call) // B * B))
    kv_cache = s.L * 2 * s.kv * (T + G) * gen_rows * c
    prefill = gen_rows * T * per_token_layer
    gen_phase = ema_gather + kv_cache + prefill + gen_rows * s.V * 4 * 3
    opt_phase = (s.P if not lora else s.adapters) * wb / W
    # process 0 writing a checkpoint: each model's full state dict in turn (gathered into host memory), then the full
    # optimizer state; host RAM on CUDA (besides the GPU), part of the RSS peak on CPU runs that save mid-training
    if lora:
        ckpt_host = 2 * s.P * fb + s.adapters * 4 * 3      # the gathered base + the merged copy, adapters
    else:
        ckpt_host = max(s.P * wb, s.P * opt_b)
    if runtime_gib is None:
        runtime_gib = HOST_BASELINE_GIB if cpu else CUDA_CONTEXT_GIB + (NCCL_BUFFERS_GIB if W > 1 else 0.0)
    runtime = runtime_gib * GIB

    phases = {"generation": gen_phase, "reference forward": ref_phase, "policy forward + backward": policy_peak,
              "optimizer step": opt_phase}
    if cpu:
        phases["checkpoint save (process 0, host)"] = ckpt_host
    peak_phase = max(phases, key=phases.get)
    peak = runtime + on_device_state + phases[peak_phase]
    # checkpoint sizes: policy in its trained dtype (exact resume), EMA / reference frozen dtype, optimizer state
    if lora:
        ckpt = {"policy (merged, base dtype) + adapters": s.P * fb + s.adapters * 4,
                "EMA + reference adapters": s.adapters * 4 * (1 + dpo), "optimizer state": s.adapters * 8}
    else:
        ckpt = {"policy": s.P * wb, "EMA": s.P * fb, "reference": s.P * fb * dpo, "optimizer state": s.P * opt_b}
    return {"nproc": W, "batch_size": B, "seq_len": T, "response_len": R, "params": s.P, "adapters": s.adapters,
            "state": state, "state_on_device": on_device_state, "policy_phase": policy_phase, "phases": phases,
            "runtime": runtime, "peak_phase": peak_phase, "peak": peak, "checkpoint": ckpt,
            "checkpoint_total": sum(ckpt.values()), "offload_host_per_process": state_total if offload else 0.0,
            "checkpoint_host_process0": ckpt_host}


def largest_batch(cfg, nproc: int, budget_gib: float, **kw) -> int:
    """The largest batch_size whose estimated peak fits budget_gib (0 if none does)."""
    shapes = model_shapes(cfg.model)
    best = 0
    for b in range(1, 257):
        if estimate(cfg, nproc, batch_size=b, shapes=shapes, **kw)["peak"] <= budget_gib * GIB:
            best = b
        else:
            break
    return best


def render(e: dict, worst: dict | None = None) -> str:
    f = lambda x: f"{x / GIB:8.2f}"  # noqa: E731
    lines = [f"per-process memory, {e['nproc']} processes, batch_size {e['batch_size']}, T = {e['seq_len']} tokens "
             f"(prompt + y+), R = {e['response_len']} response tokens; {e['params'] / 1e9:.2f} B parameters"
             + (f" + {e['adapters'] / 1e6:.1f} M adapter parameters" if e["adapters"] else ""), "",
             "sharded state (GiB)"]
    lines += [f"  {f(v)}  {k}" for k, v in e["state"].items()]
    lines += [f"  {f(e['state_on_device'])}  on the device (0 with fsdp_cpu_offload)", "",
              "policy forward + backward (GiB)"]
    lines += [f"  {f(v)}  {k}" for k, v in e["policy_phase"].items() if v]
    lines += ["", "phases above the sharded state (GiB)"] + [f"  {f(v)}  {k}" for k, v in e["phases"].items()]
    lines += ["", f"  {f(e['runtime'])}  outside the model: CUDA context and NCCL buffers (GPU), or the host process "
              "baseline (CPU)",
              f"peak {e['peak'] / GIB:.2f} GiB per process, in: {e['peak_phase']}"]
    if worst is not None:
        lines.append(f"worst case the config admits (R = {worst['response_len']}: a {worst['seq_len'] - worst['response_len']}"
                     f"-token prompt, y+ and y- parting at once): peak {worst['peak'] / GIB:.2f} GiB, in: "
                     f"{worst['peak_phase']}")
    lines += ["", "checkpoint (GiB): " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in e["checkpoint"].items() if v)
              + f"; total {e['checkpoint_total'] / GIB:.1f}",
              f"host RAM of process 0 while it writes one (full state dicts gathered): "
              f"{e['checkpoint_host_process0'] / GIB:.1f} GiB"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scale.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a scale/configs/*.yaml")
    ap.add_argument("--nproc", type=int, required=True, help="processes (GPUs) in total")
    ap.add_argument("--seq-len", type=int, default=None, help="prompt + y+ tokens per example (default: max_length)")
    ap.add_argument("--response-len", type=int, default=None, help="response tokens (default: half of --seq-len)")
    ap.add_argument("--min-prompt-len", type=int, default=16, help="the shortest prompt, for the worst case: every "
                    "response max_length minus this")
    ap.add_argument("--runtime-gib", type=float, default=None, help="memory outside the model: CPU, the host process "
                    f"baseline (default {HOST_BASELINE_GIB}); GPU, CUDA context + NCCL buffers (default "
                    f"{CUDA_CONTEXT_GIB} + {NCCL_BUFFERS_GIB} with several processes)")
    ap.add_argument("--largest-batch", type=float, default=None, metavar="GIB",
                    help="print the largest batch_size whose peak fits this many GiB per process")
    ap.add_argument("--json", action="store_true", help="print the estimate as JSON (bytes)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides, as on tune run")
    a = ap.parse_args(argv)
    from omegaconf import OmegaConf
    if not Path(a.config).exists():
        print(f"error: --config: {a.config} does not exist", file=sys.stderr)
        return 2
    if a.nproc < 1:
        print(f"error: --nproc must be >= 1, got {a.nproc}", file=sys.stderr)
        return 2
    try:
        cfg = OmegaConf.merge(OmegaConf.load(a.config), OmegaConf.from_dotlist(a.overrides))
    except Exception as e:  # noqa: BLE001  (a malformed key=value)
        print(f"error: overrides: {e}".splitlines()[0], file=sys.stderr)
        return 2
    kw = dict(seq_len=a.seq_len, response_len=a.response_len, runtime_gib=a.runtime_gib)
    if a.largest_batch is not None:
        print(largest_batch(cfg, a.nproc, a.largest_batch, **kw))
        return 0
    e = estimate(cfg, a.nproc, **kw)
    T = int(cfg.max_length)
    worst = estimate(cfg, a.nproc, seq_len=T, response_len=max(1, T - a.min_prompt_len), runtime_gib=a.runtime_gib,
                     shapes=None)
    print(json.dumps({**e, "worst_case": worst}, indent=1) if a.json else render(e, worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
