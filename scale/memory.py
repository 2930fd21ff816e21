"""Per-process peak memory of scale/sapo_recipe.py, by component, for any config and world size.

    python -m scale.memory --config scale/configs/llama3_8b_sapo_dpo.yaml --nproc 8
    python -m scale.memory --config scale/configs/llama3_8b_sapo_dpo.yaml --nproc 8 --seq-len 2048 --response-len 1024 batch_size=10
    python -m scale.memory --config scale/configs/llama3_8b_sapo_dpo.yaml --nproc 8 --largest-batch 80
    python -m scale.memory --config scale/configs/tiny_cpu.yaml --nproc 2 --json ...    (what the tests call)

Shapes come from building the configured model on the meta device (no memory, no weights); key=value arguments
override the config as on `tune run`. Sizes are in GiB = 2^30 bytes, the unit of the recipe's memory/* metrics
(--json: bytes).

The model of one process (W processes, P parameters, L layers of P_l, width D, MLP width F, vocabulary V; c the
compute dtype's bytes; B prompts per micro-batch; T = prompt + y+ tokens; R = response tokens, G = segment_len).
Each term is what scale/simulate.py's trace of the recipe's step shows alive at that phase's peak (per phase within
10% of the trace on the 7-8B configs and their variants: scale/README.md):
  resident state  policy weights and optimizer state (trained dtype), EMA and reference (frozen dtype), each / W;
                  LoRA: the frozen base / W plus adapter-sized copies. 0 with fsdp_cpu_offload.
  gradients       P / W in the trained dtype, from the step's first backward to its optimizer step (the recipe
                  frees them right after it): in the policy phase with accumulation, the reference forward of
                  micro-batches after the first, and the optimizer step.
  gathered weights
                  FSDP2 units are each layer, custom_sharded_layers and the root. The root's own parameters (the
                  embeddings and output layer unless custom_sharded_layers names them) stay gathered from the
                  forward's start to the backward's end, a layer while it runs plus the prefetched next one (every
                  layer, fsdp_reshard_after_forward: False), a separately sharded output layer at the loss; bf16
                  under FSDP mixed precision, else the stored dtype; at the forward's start the root's all-gather
                  buffer beside its copied-out parameters. In backward, one layer's unsharded gradients and its fp32
                  reduce-scatter input; at its end the root's, beside every sharded gradient. Without FSDP mixed precision (`fsdp_mixed_precision: False`)
                  autocast also caches a bf16 copy of every weight a matmul reads for the length of the forward.
  activations     activation checkpointing keeps each layer's input, D x (residual dtype) per token per layer, over
                  B x (T + R) tokens (one row per tuple: x, y+ and y-'s own tokens) or B x 2T (two rows), plus the
                  (B, T', T') mask (bool and its bias). The backward recomputes one layer: its saved activations
                  ((9 D + 2 kv + 4 F) c + (D + kv) x 4 per token: q and k rotated in fp32) and the gradients of
                  its MLP activations (3 F c); LoRA's frozen projections save less ((3 F + 7 D) c + 2 D x 4).
                  Without grad (reference forward, prefill) a layer holds (4 D + 3 F) c per token at once (LoRA on
                  the MLP: 4 F).
  logits          the output layer runs at the N = 2 B R scored positions only, C = min(N, sapo_fast.CHUNK_POSITIONS)
                  positions at a time, each chunk recomputed in backward (sapo_fast.chunked_token_logps): one chunk's
                  fp32 logits, log-softmax and their gradient (12 bytes per entry) and, for a trained output layer,
                  the gradient in the compute dtype, plus the scored positions' hidden states (N x D x c). The
                  reference's (no grad): 8 bytes per entry.
  EMA update      scale.fsdp.local_ema_update casts every policy shard to the EMA's dtype at once (P x EMA bytes
                  / W where they differ).
  generation      the EMA gathered whole, this process's shard included (gather_generator_weights, W > 1; without
                  it, unit by unit at every decoding step: two layers and a unit's copy, or, for a separately
                  sharded output layer, one layer and the output layer's all-gather buffer beside its copy),
                  its KV cache (L x 2 x kv x T x B' x c: sapo.truncation_point
                  keeps context + G <= T) and the prefill's layer over T - G tokens, for the B' rows of one generate
                  call: B x gradient_accumulation_steps (all of a step's micro-batches), or generate_rows_per_call.
  optimizer step  the gradients and torch's foreach temporaries of one state tensor's size (P / W x trained dtype).
  host process baseline (CPU runs only)
                  what a CPU process holds before any model: python + torch + torchtune + the recipe imported, gloo,
                  tokenizer and data (HOST_BASELINE_GIB, measured; the recipe logs its own as memory/runtime_rss_gib;
                  --runtime-gib overrides).
  CUDA context and NCCL buffers (GPU runs): outside torch's allocator, so not in memory/peak_allocated_gib, but on
                  the GPU: CUDA_CONTEXT_GIB + NCCL_BUFFERS_GIB with several processes (an allowance; --runtime-gib).
  checkpoint save (checkpoint_format full) process 0 gathers each model's full state dict in turn, then the full
                  optimizer state, into host
                  memory: max(P x trained dtype, P x optimizer bytes); LoRA: the base with the adapters merged in
                  place, one delta B @ A (the largest adapted weight's size) at a time. A phase of the RSS peak on CPU runs; on CUDA host RAM besides the GPU (printed, not in the
                  GPU peak). checkpoint_format sharded: 0, each process writes its own shards
                  (scale/sharded_checkpoint.py), 1 / W of the checkpoint.
  loading (host)  torchtune's HF reader permutes every layer's q and k weights (Llama, Mistral, Gemma) into memory
                  of its own while it reads the checkpoint: L x (q + k weights) x 2 bytes per process, printed.
The peak is the resident state plus the largest phase (on CPU, the checkpoint save among them) plus the runtime.

Not counted: memory an allocator keeps after tensors are freed. On CPU, glibc keeps freed blocks below its mmap
threshold (up to 32 MB) in per-thread arenas, so RSS ratchets above the live tensors (scale/README.md gives the
measured gap on the 55 M and 231 M CPU runs), nor the CUDA caching allocator's reserve beyond allocated memory
(the recipe logs memory/peak_reserved_gib beside memory/peak_allocated_gib). Not yet checked on a GPU.
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
    P_embed: int = 0   # the token embeddings (V x D)
    tied: bool = False  # the output layer is the embeddings' weight (TiedLinear)
    lora_mlp: bool = False  # LoRA adapters on the MLP's projections
    lora_largest: int = 0   # the largest weight with an adapter (merging it makes a delta of its size)
    qk_layer: int = 0       # one layer's q_proj and k_proj weights (torchtune's HF reader permutes them)


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
    lora_mlp = any("lora" in n for n, _ in layer.mlp.named_parameters())
    lora_largest = max((mod.weight.numel() for mod in m.modules() if hasattr(mod, "lora_a")), default=0)
    qk_layer = sum(getattr(attn, name).weight.numel() for name in ("q_proj", "k_proj") if hasattr(attn, name))
    return Shapes(P=P, P_layer=P_layer, P_out=P_out or m.tok_embeddings.weight.numel(), L=len(m.layers), D=D, F=F,
                  kv=attn.num_kv_heads * attn.head_dim, V=m.tok_embeddings.num_embeddings, adapters=adapters,
                  P_embed=m.tok_embeddings.weight.numel(), tied=not P_out, lora_mlp=lora_mlp,
                  lora_largest=lora_largest, qk_layer=qk_layer)


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
    from scale.fsdp import custom_units
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
        state["adapters: policy + optimizer + EMA + reference"] = A * (4 + 2 * 4 + 4 + 4 * dpo) / W
        state["gradients"] = A * 4 / W
    else:
        state["policy weights"] = s.P * wb / W
        state["gradients"] = s.P * wb / W
        state["optimizer state"] = s.P * opt_b / W
        state["EMA"] = s.P * fb / W
        if dpo:
            state["reference"] = s.P * fb / W
    state_total = sum(state.values())
    on_device = not (offload and W > 1)
    on_device_state = state_total if on_device else 0.0
    # gradients exist from the step's first backward until the optimizer step (zero_grad(set_to_none=True) right
    # after it): in the phases that run before the first backward they are not there
    grads = state["gradients"] if on_device else 0.0
    resident = on_device_state - grads

    # -- working memory ------------------------------------------------------------------------------------
    # FSDP2 units: each layer, custom_sharded_layers, the root. The root's own parameters (the embeddings and the
    # output layer unless custom_sharded_layers names them) stay gathered from the forward's start to the backward's
    # end; a layer only while it runs, the next one prefetched (the policy's every layer from its forward to its
    # backward with fsdp_reshard_after_forward: False); a separately sharded output layer at the loss.
    own_units = set(custom_units(cfg.get("custom_sharded_layers"), s.tied))   # a tied output: both in the root
    root = s.P_embed * ("tok_embeddings" not in own_units) + s.P_out * (not s.tied and "output" not in own_units)

    def gathered(b, layers=2):                                             # b: a gathered weight's bytes
        return 0.0 if W == 1 else (layers * s.P_layer + root) * b

    def output_unit(b):
        return 0.0 if W == 1 or "output" not in own_units or s.tied else s.P_out * b

    gb = 2 if fsdp_mp else (fb if lora else wb)                            # the policy's gathered weights
    policy_layers = 2 if cfg.get("fsdp_reshard_after_forward", True) else s.L
    gathered_policy = gathered(gb, policy_layers) + output_unit(gb)
    trained_layer = 0 if lora else s.P_layer                               # LoRA: adapter gradients only (small)
    grad_layer = 0.0 if W == 1 else trained_layer * (gb + 4)               # unsharded grads + fp32 reduce-scatter input
    autocast_cache = 0.0
    if mixed and not fsdp_mp and not lora:        # bf16 copy of every trained fp32 weight a matmul reads
        autocast_cache = 2 * (s.P - (0 if s.tied else s.P_embed))
    act_b = c if (fsdp_mp or lora or not mixed) else 4                      # residual stream: fp32 embeddings -> 4
    tokens = B * (T + R) if shared_prefix else B * 2 * T
    row_len = (T + R) if shared_prefix else T
    rows = B if shared_prefix else 2 * B
    # One decoder layer, bytes per token (torchtune's layer traced on fake tensors, scale/simulate.py):
    #   saved for backward: the norms, q / k / v, attention output, the MLP's w1 / w3 outputs, their product ...
    #   ((9 D + 2 kv + 4 F) c) and q and k rotated in fp32 ((D + kv) x 4); in backward, the gradients of the MLP's
    #   activations besides (3 F c); without grad only a few at once, the residual stream included: four D-wide
    #   (the stream before and after attention, the normed input, the MLP's output) and three F-wide (w1, w3 and
    #   their product): (4 D + 3 F) c
    layer_saved = (9 * s.D + 2 * s.kv + 4 * s.F) * c + (s.D + s.kv) * 4
    layer_grads = 3 * s.F * c
    if lora:   # a frozen projection saves no input for its weight's gradient: (6 F + 7 D) c + 2 D x 4 in all
        layer_saved, layer_grads = (3 * s.F + 7 * s.D) * c + 2 * s.D * 4, 3 * s.F * c
    layer_no_grad = (4 * s.D + (4 if s.lora_mlp else 3) * s.F) * c         # LoRA: w3's base and adapter outputs
    if cfg.get("enable_activation_checkpointing", False):
        checkpoints = tokens * s.L * s.D * act_b                           # each layer's input
        recompute = tokens * (layer_saved + layer_grads)                   # one layer recomputed in backward
    else:
        checkpoints = tokens * s.L * layer_saved
        recompute = tokens * layer_grads
    mask = rows * row_len ** 2 * (1 + c) if shared_prefix else 0
    N = B * 2 * R                                                          # scored positions
    C = min(N, CHUNK_POSITIONS)                                            # positions per output-layer chunk
    hidden_scored = N * s.D * c
    # in backward, one chunk recomputed: its fp32 logits, log-softmax and their gradient, and (a trained output
    # layer) the gradient in the compute dtype for the weight's gradient (traced: a frozen one holds 12 bytes)
    logits_bwd = C * s.V * (4 + 4 + 4 + (0 if lora else c)) + hidden_scored
    logits_ref = C * s.V * (4 + 4) + hidden_scored         # no grad: the compute-dtype logits are freed once cast
    # with accumulation, micro-batches after the first find the gradients of the ones before
    grads_in_backward = grads if int(cfg.get("gradient_accumulation_steps", 1)) > 1 else 0.0
    policy_phase = {
        "gradients (accumulated over micro-batches)": grads_in_backward,
        "gathered weights (layers in use, root, output layer)": gathered_policy,
        "gathered gradients (1 layer, reduce-scatter)": grad_layer,
        "autocast weight cache (no FSDP mixed precision)": autocast_cache,
        "activation checkpoints": checkpoints,
        "recomputed layer (backward)": recompute,
        "attention mask (one row per tuple)": mask,
        "logits at response positions (one chunk)": logits_bwd,
    }
    # the loss's peak: logits are alive with the checkpoints; the recomputed layer comes after the logits are freed
    # The root unit's gradients (the embeddings' and output layer's) are reduce-scattered last, at the backward's
    # end, unsharded in the gathered dtype plus the fp32 reduce-scatter input, beside every sharded gradient; by
    # then the activations and the gathered weights are freed
    root_grads = 0.0 if W == 1 or lora else root * (gb + 4)
    policy_peak = autocast_cache + max(
        grads_in_backward + gathered_policy + checkpoints + mask + max(logits_bwd, recompute + grad_layer),
        grads + root_grads)
    # no grad: one layer's tensors at a time (the boolean mask; SDPA's bias lives only inside attention); then the
    # output layer, gathered, a chunk at a time, the layers resharded. Micro-batches after the first find the
    # gradients of the ones before.
    # (and at the forward's start the root's all-gather buffer beside its copied-out parameters)
    ref_layers = gathered(fb) + tokens * layer_no_grad
    # (a separately sharded output layer: its all-gather buffer beside its copied-out weight)
    ref_output = gathered(fb, layers=0) + 2 * output_unit(fb) + logits_ref
    ref_start = gathered(fb, layers=1) + (root * fb if W > 1 else 0.0)
    ref_phase = (grads_in_backward + rows * row_len ** 2 * shared_prefix
                 + max(ref_layers, ref_output, ref_start)) if dpo else 0.0
    # the EMA update casts every policy shard to the EMA's dtype at once (scale.fsdp.local_ema_update); the
    # reference refresh copies in place
    ema_phase = s.P * fb / W if (not lora and wb != fb) else 0.0
    # generation: FSDP2 gathers the whole EMA into new buffers, this process's own shard included
    # (without gather_generator_weights: unit by unit at every decoding step, as in a forward; while a unit's
    # parameters are copied out of its all-gather buffer both exist, the root's the largest)
    if W == 1:
        ema_gather, unit_copy = 0.0, 0.0
    elif cfg.get("gather_generator_weights", True):
        ema_gather, unit_copy = s.P * fb, 0.0
    else:
        ema_gather, unit_copy = gathered(fb), max(root, s.P_layer) * fb
    # one generate call decodes this process's rows of all the step's micro-batches (generate_rows_per_call: fewer)
    gen_rows = B * int(cfg.get("gradient_accumulation_steps", 1))
    if cfg.get("generate_rows_per_call"):
        gen_rows = max(B, min(gen_rows, int(cfg.generate_rows_per_call) // B * B))
    # sapo.truncation_point keeps |x| + t + G <= |x| + |y+| (and <= max_length): the KV cache holds at most T
    # tokens per row, the prefill T - G; the causal mask covers the cache, its bias the prefill's rows
    ctx = max(T - G, 1)
    kv_cache = s.L * 2 * s.kv * T * gen_rows * c
    prefill = gen_rows * ctx * layer_no_grad + gen_rows * ctx * T * c
    gen_weights = ema_gather + max(prefill, unit_copy)
    if W > 1 and not cfg.get("gather_generator_weights", True) and output_unit(fb):
        # a separately sharded output layer: when it is gathered the layers are resharded but one (the next
        # token's first, prefetched), and its all-gather buffer and copied-out weight both exist
        gen_weights = max(gathered(fb) + max(prefill, unit_copy), gathered(fb, layers=1) + 2 * output_unit(fb))
    gen_phase = gen_weights + kv_cache + gen_rows * T * T + gen_rows * s.V * 4 * 3
    opt_phase = grads + (s.P if not lora else s.adapters) * wb / W          # + foreach temporaries
    # process 0 writing a checkpoint: each model's full state dict in turn (gathered into host memory), then the full
    # optimizer state; host RAM on CUDA (besides the GPU), part of the RSS peak on CPU runs that save mid-training
    if lora:
        # the gathered base, the adapters merged into it in place, each merge's delta B @ A (adapter dtype) in turn
        ckpt_host = s.P * fb + s.adapters * 4 * 3 + s.lora_largest * (4 if mixed else wb)
    else:
        ckpt_host = max(s.P * wb, s.P * opt_b)
    sharded_ckpt = cfg.get("checkpoint_format", "full") == "sharded"
    if sharded_ckpt:   # each process writes its own shards (torch.distributed.checkpoint): nothing is gathered
        ckpt_host = 0.0
    # loading the transformers checkpoint: each process reads its own rows of the mmapped files, but torchtune's HF
    # reader permutes q and k (Llama's rotary layout; not for Qwen2 / Phi-3, whose readers copy nothing) into memory
    # of its own, every layer's, in the file's dtype (bf16 in the released checkpoints), before the copy begins
    model_type = str(cfg.get("checkpointer", {}).get("model_type", "")).upper()
    load_host = 0.0 if model_type in ("QWEN2", "PHI3_MINI", "PHI4") else s.L * s.qk_layer * 2.0
    if runtime_gib is None:
        runtime_gib = HOST_BASELINE_GIB if cpu else CUDA_CONTEXT_GIB + (NCCL_BUFFERS_GIB if W > 1 else 0.0)
    runtime = runtime_gib * GIB

    phases = {"EMA update": ema_phase, "generation": gen_phase, "reference forward": ref_phase,
              "policy forward + backward": policy_peak, "optimizer step": opt_phase}
    if cpu:
        phases["checkpoint save (process 0, host)"] = ckpt_host
    peak_phase = max(phases, key=phases.get)
    peak = runtime + resident + phases[peak_phase]
    # checkpoint sizes: policy in its trained dtype (exact resume), EMA / reference frozen dtype, optimizer state
    if lora:
        ckpt = {"policy (merged, base dtype) + adapters": s.P * fb + s.adapters * 4,
                "EMA + reference adapters": s.adapters * 4 * (1 + dpo), "optimizer state": s.adapters * 8}
    else:
        ckpt = {"policy": s.P * wb, "EMA": s.P * fb, "reference": s.P * fb * dpo, "optimizer state": s.P * opt_b}
    return {"nproc": W, "batch_size": B, "seq_len": T, "response_len": R, "params": s.P, "adapters": s.adapters,
            "state": state, "state_on_device": on_device_state, "resident_on_device": resident,
            "policy_phase": policy_phase, "phases": phases,
            "runtime": runtime, "peak_phase": peak_phase, "peak": peak, "checkpoint": ckpt,
            "checkpoint_total": sum(ckpt.values()), "offload_host_per_process": state_total if offload else 0.0,
            "checkpoint_sharded": sharded_ckpt, "load_host_per_process": load_host,
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
    lines += [f"  {f(e['state_on_device'])}  on the device (0 with fsdp_cpu_offload)",
              f"  {f(e['resident_on_device'])}  of which resident: all but the gradients, which exist from the step's "
              "first backward to its optimizer step", "", "policy forward + backward (GiB)"]
    lines += [f"  {f(v)}  {k}" for k, v in e["policy_phase"].items() if v]
    lines += ["", "phases above the resident state (GiB; gradients where they exist)"]
    lines += [f"  {f(v)}  {k}" for k, v in e["phases"].items()]
    lines += ["", f"  {f(e['runtime'])}  outside the model: CUDA context and NCCL buffers (GPU), or the host process "
              "baseline (CPU)",
              f"peak {e['peak'] / GIB:.2f} GiB per process, in: {e['peak_phase']}"]
    if worst is not None:
        lines.append(f"worst case the config admits (R = {worst['response_len']}: a {worst['seq_len'] - worst['response_len']}"
                     f"-token prompt, y+ and y- parting at once): peak {worst['peak'] / GIB:.2f} GiB, in: "
                     f"{worst['peak_phase']}")
    lines += ["", "checkpoint (GiB): " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in e["checkpoint"].items() if v)
              + f"; total {e['checkpoint_total'] / GIB:.1f}",
              (f"written sharded: each process writes its own {e['checkpoint_total'] / e['nproc'] / GIB:.1f} GiB, "
               "nothing is gathered (host RAM: the process's own tensors, staged as it writes)"
               if e.get("checkpoint_sharded") else
               f"host RAM of process 0 while it writes one (full state dicts gathered): "
               f"{e['checkpoint_host_process0'] / GIB:.1f} GiB"),
              f"host RAM per process while it loads the transformers checkpoint (torchtune's q/k-permuted copies): "
              f"{e.get('load_host_per_process', 0) / GIB:.1f} GiB"]
    return "\n".join(lines)


def load_config(path: str, overrides: list[str]):
    """The recipe's YAML with key=value overrides, as `tune run` merges them."""
    from omegaconf import OmegaConf
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))


def cli_config(path: str, nproc: int, overrides: list[str]):
    """load_config for a command line: None, after one line on stderr, for a missing file, nproc < 1 or a
    malformed override (the commands then exit 2)."""
    if not Path(path).exists():
        print(f"error: --config: {path} does not exist", file=sys.stderr)
        return None
    if nproc < 1:
        print(f"error: --nproc must be >= 1, got {nproc}", file=sys.stderr)
        return None
    try:
        return load_config(path, overrides)
    except Exception as e:  # noqa: BLE001  (a malformed key=value)
        print(f"error: overrides: {e}".splitlines()[0], file=sys.stderr)
        return None


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
    cfg = cli_config(a.config, a.nproc, a.overrides)
    if cfg is None:
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
