"""Processes and shards for scale/sapo_recipe.py: the process group, the FSDP2 sharding plan, gathering a sharded
model for decoding, filling sharded models and optimizers from full (mmapped) state dicts, agreeing across
processes. Nothing here is SAPO: it is what torchtune's FSDP2 recipes do, with the changes each docstring names."""
from __future__ import annotations

import contextlib
import datetime
from functools import partial

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchtune import modules, training
from torchtune.modules import TiedLinear
from torchtune.modules.peft import LoRALinear, get_adapter_params, set_trainable_params


def init_distributed(cfg: DictConfig) -> None:
    """gloo on CPU, NCCL on GPU (plus gloo for CPU offload). A single process not launched by torchrun gets a
    one-process group, so that the same code (barriers, state-dict gathers) runs everywhere."""
    device_type = torch.device(cfg.device).type
    backend = training.get_distributed_backend(device_type, offload_ops_to_cpu=cfg.get("fsdp_cpu_offload", False))
    # setup (loading and sharding the weights) and the barrier while process 0 writes a checkpoint (about 100 GB
    # at 8B) may take this long; training's collectives get a bound sized to the step (set_collective_timeout)
    timeout = datetime.timedelta(minutes=float(cfg.get("dist_timeout_minutes", 60)))
    if training.is_distributed():
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def set_collective_timeout(minutes: float) -> None:
    """How long any later collective of the default process group may wait (gloo and NCCL alike) before it fails
    and its process exits (NCCL: torch's watchdog aborts it, TORCH_NCCL_ASYNC_ERROR_HANDLING's default). A peer that
    died or hangs then ends the job within this bound instead of holding every GPU of the node: gloo notices a
    dead peer's closed connection at once, NCCL notices nothing and waits for the timeout."""
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(minutes=minutes))


def step_timeout_minutes(floor_minutes: float, longest_step_s: float, factor: float = 4.0) -> float:
    """The collective timeout during training: factor x the longest step so far (a step's collectives all fit
    in one step), never below floor_minutes (a slow step must not kill a healthy job)."""
    return max(floor_minutes, factor * longest_step_s / 60)


def is_lora(cfg_model: DictConfig) -> bool:
    return "lora_rank" in cfg_model


# --- The sharding plan ------------------------------------------------------------------------------

def prepare_model(model: nn.Module, cfg: DictConfig, trainable: bool, shard: bool) -> None:
    """What happens to a freshly built (meta) model before its weights arrive: which parameters train (LoRA:
    the adapters, in fp32 under bf16-mixed), activation checkpointing (trained model only), and the FSDP2
    sharding plan (torchtune.training.shard_model: each transformer layer, then custom_sharded_layers, then
    the root). The 7-8B configs are checked by running this on the meta device (tests/test_scale.py)."""
    if is_lora(cfg.model):
        if cfg.dtype == "bf16-mixed":   # trained adapters in fp32 beside a bf16 base (autocast computes in bf16)
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_a.float()
                    m.lora_b.float()
        set_trainable_params(model, get_adapter_params(model))
    else:
        model.requires_grad_(trainable)
    if trainable and cfg.get("enable_activation_checkpointing", False):
        training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if shard:
        shard_model(model, cfg, trainable)


def fsdp_kwargs(cfg: DictConfig, trainable: bool) -> dict:
    """fully_shard's arguments for one model.
    - bf16-mixed, trained model: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32). FSDP2 casts each shard
      to bf16 before the all-gather, so a gathered layer is bf16 (half the traffic) and its memory is freed at
      reshard. Without it (torchtune 0.6.1's shard_model passes no policy; `fsdp_mixed_precision: False` here)
      the all-gathers move fp32 and torch.autocast caches the bf16 cast of every gathered weight until its block
      exits: a second, bf16 copy of the whole model per process (about 16 GB at 8B; scale/README.md).
      Gradients are reduce-scattered in fp32 into the fp32 master shards.
    - fsdp_reshard_after_forward applies to the trained model only: the EMA and the reference never run a
      backward, so left unsharded after a forward they would stay unsharded plain tensors, and ema_update /
      copy_weights would mix them with the policy's DTensor shards. They always reshard.
    - fsdp_cpu_offload: sharded state in CPU RAM (torchtune's CPUOffloadPolicy)."""
    kw = {"reshard_after_forward": bool(cfg.get("fsdp_reshard_after_forward", True)) if trainable else True}
    if cfg.get("fsdp_cpu_offload", False):
        kw["offload_policy"] = CPUOffloadPolicy()
    if trainable and cfg.dtype == "bf16-mixed" and cfg.get("fsdp_mixed_precision", True):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return kw


def tied_output(model: nn.Module) -> bool:
    """Is the output layer the token embeddings' weight (torchtune's TiedLinear: Llama-3.2, Qwen2 / Qwen2.5 up to
    3B, Gemma, Gemma 2)? TiedLinear is no nn.Module: it reads tok_embeddings.weight when called."""
    return isinstance(getattr(model, "output", None), TiedLinear)


def custom_units(names, tied: bool) -> list[str]:
    """The custom_sharded_layers the recipe applies. With a tied output layer, tok_embeddings and output stay in
    the root unit: given a unit of its own, the embedding's weight is gathered only while the embedding runs,
    and the output layer, which reads that weight after the last layer, would get a sharded DTensor ("aten.mm
    got mixed torch.Tensor and DTensor"). In the root unit it is gathered from the forward's start to the
    backward's end, when both uses run (torchtune's own configs for tied models name no custom units)."""
    names = list(names or [])
    return [n for n in names if n not in ("tok_embeddings", "output")] if tied else names


def shard_model(model: nn.Module, cfg: DictConfig, trainable: bool) -> None:
    """torchtune.training.shard_model with fsdp_kwargs: each transformer layer, then custom_sharded_layers (minus
    the embeddings where the output layer is tied to them: custom_units), then the root, bottom-up."""
    kw = fsdp_kwargs(cfg, trainable)
    names = custom_units(cfg.get("custom_sharded_layers"), tied_output(model))
    match = partial(training.get_shard_conditions, names_to_match=names)
    for name, m in reversed(list(model.named_modules())):
        if match(name, m):
            fully_shard(m, **kw)
    fully_shard(model, **kw)


# --- Sharded models at run time -----------------------------------------------------------------------

def all_processes(value, device, op=None):
    """The processes' agreement on a value, in one all-reduce: a flag (bool, or a one-element bool tensor on the
    device) is True when it is True on every process (op MIN, the default); a number (or a tensor) comes back
    reduced with op (dist.ReduceOp.MAX, SUM). A tensor is reduced where it is and read on the host once, after the
    all-reduce (reading it first, then the result, would be two waits on the device)."""
    op = dist.ReduceOp.MIN if op is None else op
    is_flag = isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if isinstance(value, torch.Tensor):
            t = value.detach().reshape(1).to(torch.int32 if is_flag else torch.float64)
        else:
            t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        value = t.item()
    elif isinstance(value, torch.Tensor):
        value = value.item()
    return bool(value) if is_flag else float(value)


@torch.no_grad()
def local_ema_update(ema_model: nn.Module, policy: nn.Module, decay: float) -> bool:
    """sapo.ema_update on each process's own shards, in one foreach call: the same lerp, without a DTensor
    dispatch per parameter (~600 at 8B). Both models are sharded alike (the same plan on the same mesh), so
    shard i of the EMA pairs with shard i of the policy. Returns False, having changed nothing, where they do
    not pair up (the caller then runs sapo.ema_update)."""
    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t
    ema_shards = [local(p) for p in ema_model.parameters()]
    policy_shards = [local(p.detach()) for p in policy.parameters()]
    if len(ema_shards) != len(policy_shards) or any(a.shape != b.shape for a, b in zip(ema_shards, policy_shards)):
        return False
    policy_shards = [b.to(a.dtype) for a, b in zip(ema_shards, policy_shards)]
    torch._foreach_lerp_(ema_shards, policy_shards, 1.0 - decay)
    return True


def reshard(model: nn.Module) -> None:
    """Back to shards (a no-op where they already are): with fsdp_reshard_after_forward False a forward leaves
    the gathered weights as the module's parameters until a backward reshards them."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def gathered(model: nn.Module, enabled: bool, reshard_after_forward: bool = True):
    """Decoding G tokens runs G + 1 forwards. On a sharded model each would all-gather every layer (at 8B:
    16 GB of bf16 per token step); inside this block the weights are gathered once and kept, then sharded again.
    Costs one unsharded copy of the model for the length of the block (no training activations are alive)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)] if enabled else []
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(reshard_after_forward, recurse=False)


def full_tensor(t):
    """A plain tensor from a DTensor (sharded) or a tensor (one process)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


# --- Filling sharded models and optimizers from full state dicts ----------------------------------------

def local_piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's piece of a full tensor, a view (nothing is read or copied yet): for a DTensor `like`, the slice
    its placements give this process (FSDP2's Shard(0): a block of rows, the last one possibly shorter); for a plain
    tensor, all of it."""
    if not isinstance(like, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + n) for n, o in zip(shape, offset))]


def load_full_model_state_dict(model: nn.Module, full_sd: dict, consume: bool = False) -> tuple[list[str], list[str]]:
    """Fill a model whose parameters already have storage (sharded or not) from a full state dict, one tensor at
    a time: each process copies its own piece of each tensor, cast to the parameter's dtype, straight into the
    parameter (a DTensor's local shard). Returns (missing, unexpected) keys, as load_state_dict(strict=False).

    Memory: with the checkpoint's tensors mmapped (safetensors, torch.load(mmap=True)) a process reads only the
    pages of its own rows, and nothing but the parameters is allocated: no collective, no full copy of a tensor
    (torchtune 0.6.1's load_from_full_model_state_dict casts each full tensor, and distribute_tensor splits it into
    contiguous copies of every process's chunk on every process, then scatters from process 0, which so reads the
    whole file). consume: drop each tensor from full_sd once copied (torchtune's HF checkpointer converts some
    tensors, e.g. Llama's q/k permutation, into memory of their own: freed as the load goes)."""
    own = model.state_dict(keep_vars=True)      # FSDP2: the sharded parameters themselves (DTensors)
    unexpected = [k for k in full_sd if k not in own]
    missing = [k for k in own if k not in full_sd]
    with torch.no_grad():
        for key in [k for k in full_sd if k in own]:
            full = full_sd.pop(key) if consume else full_sd[key]
            target = own[key]
            (target.to_local() if isinstance(target, DTensor) else target).copy_(local_piece(full, target))
            del full
    return missing, unexpected


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """The optimizer state from a full (gathered) state dict, as training.get_full_optimizer_state_dict writes it,
    one parameter at a time: each process copies its own piece of each state tensor out of the (mmapped)
    checkpoint into memory of its own, so that nothing refers to the file afterwards (torchtune 0.6.1's
    load_from_full_optimizer_state_dict first creates a zero state for every parameter beside the loaded one, reads
    every full tensor on process 0, and keeps the checkpoint's own 'step' tensors: the whole mmapped file stays
    mapped, its pages in the process's RSS, for the rest of the run)."""
    saved_groups = full["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(saved_groups)} parameter groups, this one "
                         f"{len(optimizer.param_groups)}")
    param_of = {}
    for group, saved in zip(optimizer.param_groups, saved_groups):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(f"the checkpoint's optimizer has {len(saved['params'])} parameters in a group, this one "
                             f"{len(group['params'])}")
        param_of.update(zip(saved["params"], group["params"]))
    state = {}
    for pid, saved_state in full["state"].items():
        p, mine = param_of[pid], {}
        for k, v in saved_state.items():
            if isinstance(v, torch.Tensor) and isinstance(p, DTensor) and v.dim() and tuple(v.shape) == tuple(p.shape):
                local = torch.empty(p.to_local().shape, dtype=v.dtype, device=p.to_local().device)
                local.copy_(local_piece(v, p))
                mine[k] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                             stride=p.stride())
            elif isinstance(v, torch.Tensor):   # 'step'; an unsharded process's state
                mine[k] = v.to(device=p.device if v.dim() else v.device, copy=True)
            else:
                mine[k] = v
        state[pid] = mine
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})
