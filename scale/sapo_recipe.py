"""SAPO at scale: a torchtune recipe. FSDP2, activation checkpointing, KV-cached segment generation under
sharding, torchtune's HF checkpointer; full fine-tuning or LoRA; one process to many nodes.

The algorithm is sapo.py's, imported, not copied: the DPO and ORPO losses, per-sequence log-probs from logits,
the EMA update, the reference refresh, truncation points, splicing, the replay buffer, the prompt stream,
the LR schedule, the data readers. What lives here is what torchtune and many processes need: building and
sharding torchtune models, log-probs and KV-cached sampling on them, the split of each step across processes,
checkpoints in transformers format, LoRA.

Run it (from the repository root: `tune run` wants the recipe path relative)
    tune run --nproc_per_node 8 scale/sapo_recipe.py --config scale/configs/llama3_8b_sapo_dpo.yaml
    tune run --nproc_per_node 8 scale/sapo_recipe.py --config scale/configs/mistral_7b_sapo_orpo.yaml
    tune run scale/sapo_recipe.py --config scale/configs/llama3_8b_sapo_dpo_lora.yaml           # one GPU, LoRA
    python -m scale.tiny /tmp/sapo_tiny && \
    tune run --nproc_per_node 2 scale/sapo_recipe.py --config scale/configs/tiny_cpu.yaml model_dir=/tmp/sapo_tiny
    ... resume_from_checkpoint=True     continues from the newest complete checkpoint in output_dir
    multi-node: see scale/README.md (torchrun rendezvous).

One optimizer step on W processes, each with a micro-batch of B prompts (every process runs the same code):
  1. EMA update  theta_ema <- b*theta_ema + (1-b)*theta   (sapo.ema_update, on each process's shards); then, SAPO-DPO,
     when the optimizer steps done so far are a multiple of ref_update_steps, reference <- EMA (sapo.copy_weights):
     at the start of the step, right after its EMA update, before its loss (the authors' moving_average)
  2. for each of the gradient_accumulation_steps micro-batches:
     a. all processes draw the same B*W fresh prompts (sapo.PromptStream) and the same truncation points
        (sapo.truncation_point, one seeded random.Random replicated on every process);
     b. process r generates the segments of rows r*B .. r*B+B-1 with the sharded EMA model (torchtune KV cache);
        segments are all-gathered and spliced (sapo.splice_negative) into B*W replay tuples;
     c. every process pushes the same tuples into its copy of the replay buffer (sapo.ReplayBuffer) and samples
        the same B*W tuples from it; process r keeps rows r*B .. r*B+B-1;
     d. loss on those B tuples (sapo.dpo_loss / sapo.orpo_loss), each one segment [x, y+, y-'s own tokens], short
        segments packed into shared rows, with torchtune's mask and input_pos (as sapo.shared_prefix_logps; two
        rows where the model fails the check),
        backward; FSDP averages gradients over processes.
  3. clip, optimizer step, LR schedule (sapo.lr_lambda); all processes agree (one all-reduce) whether a SIGTERM /
     SIGINT arrived: if so, checkpoint and exit 143 / 130 after this step.
So W processes with batch_size B compute what sapo.py computes with --batch-size B*W (tests/test_scale.py
checks per-step losses against a sapo.py run).

Where this recipe departs from sapo.py, and why
  - The replay buffer is global: replicated on every process, so buffer_capacity counts tuples over all
    processes. The authors kept 2000 per process (16000 over 8 GPUs); the 8-GPU configs set 16000.
  - Segments are sampled by our own loop on torchtune's KV cache (torchtune's `generate` has no top-p and
    runs the output layer over the whole prompt). Its noise is seeded per (seed, step, micro-batch, row), so a
    negative does not depend on the number of processes, and a resumed run draws the same negatives.
    Greedy when top_k = 1 (the tests use that to compare with transformers' generate in sapo.py).
  - Prompts are encoded with torchtune's tokenizers (`tokenize_messages`): y+ is the assistant's text plus its
    end-of-turn token (Llama-3 <|eot_id|>, Mistral </s>); torchtune's extra <|end_of_text|> after the last turn
    is not part of y+. Contents are stripped (torchtune's Llama-3 tokenizer strips them).
  - ORPO's NLL is a token mean over the whole global batch: the chosen-token count is all-reduced, so W
    processes give the same loss as one process with W times the batch.
  - dtype bf16-mixed keeps fp32 master weights (and fp32 optimizer state) for what is trained, stores the EMA,
    the reference and LoRA's frozen base in bf16, and computes in bf16: at the authors' lr 5e-7 a pure-bf16
    weight (torchtune's dtype bf16) would not move (bf16 resolves 1 part in 256). Sharded, the policy has FSDP2's
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (torchtune 0.6.1's shard_model passes none): layers
    are gathered in bf16, and no autocast cache keeps a bf16 copy of every gathered weight (fsdp_kwargs).
  - Dropout is off in every model (policy, EMA, reference), attention dropout included (disable_dropout).
  - Memory: scale/memory.py estimates each process's peak by component for any config and world size.
  - Bad input (config values, a checkpoint whose shapes differ from the builder's) stops with one line naming
    the field and exit status 2 (ConfigError).
  - LoRA: the EMA averages the adapter weights only; the reference is the base model with adapters disabled
    until the first refresh, then the base model with a frozen copy of the EMA adapters. EMA and reference
    adapters are swapped into the policy module for generation and for reference log-probs, so SAPO adds
    two adapter-sized copies to LoRA-DPO's memory.
  - Checkpoints: output_dir/{policy,ema,ref}/epoch_<step>/ are transformers folders written by torchtune's
    FullModelHFCheckpointer (it names folders epoch_*; here the number is the optimizer step; LoRA adds
    PEFT adapter files), and output_dir/recipe_state/step_<step>.pt holds optimizer, LR schedule, replay buffer,
    data position, RNG and step. It is written last, atomically: its presence marks the checkpoint complete.
    The policy is written in its trained dtype (fp32 under bf16-mixed: an exact resume needs the master
    weights; transformers loads it into bf16 with dtype=torch.bfloat16), EMA and reference in bf16. At 8B a
    checkpoint is 96 GB (scale/README.md). A resume reads one model at a time and mmaps the checkpoint files:
    each process copies only its own rows of each tensor into its shards (load_full_model_state_dict,
    load_full_optimizer_state_dict).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path
from types import MethodType, SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from torchtune import config, modules, training, utils
from torchtune.data import Message
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import local_kv_cache
from torchtune.modules.peft import (LoRALinear, disable_adapter, get_adapter_params, get_adapter_state_dict,
                                    get_lora_module_names, get_merged_lora_ckpt, set_trainable_params,
                                    validate_missing_and_unexpected_for_lora)
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.checkpointing._utils import safe_torch_load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import sapo` also when launched from elsewhere
import sapo  # noqa: E402

try:   # plumbing (rows, checkpoints, LR schedule, prompt stream, ...) is moving from sapo.py to sapo_io.py
    import sapo_io  # noqa: E402
except ImportError:
    sapo_io = None


def _from_sapo(name: str):
    """A name from sapo.py, else from its plumbing module sapo_io.py (wherever it lives today)."""
    for module in (sapo, sapo_io):
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"{name} is in neither sapo.py nor sapo_io.py")


(Example, PromptStream, ReplayBuffer, copy_weights, describe_tuple, dpo_loss, ema_update, logps_from_logits, lr_lambda,
 orpo_loss, preference_metrics, response_targets, shared_prefix_layout, SHARED_PREFIX_PROBE, splice_negative,
 truncation_point, parse_row, read_rows, collate) = map(_from_sapo, (
    "Example", "PromptStream", "ReplayBuffer", "copy_weights", "describe_tuple", "dpo_loss", "ema_update",
    "logps_from_logits", "lr_lambda", "orpo_loss", "preference_metrics", "response_targets", "shared_prefix_layout",
    "SHARED_PREFIX_PROBE", "splice_negative", "truncation_point", "parse_row", "read_rows", "collate"))

log = utils.get_logger("INFO")
DTYPES = ("fp32", "bf16", "bf16-mixed")
METHODS = ("sapo-dpo", "sapo-orpo")   # sapo.py also runs the baselines (sft, dpo, orpo, spin); this recipe runs SAPO


# ---------------------------------------------------------------------------------------------------
# 1. Config check: every key the recipe reads, with its constraint (tests run it on every YAML)
# ---------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """Bad input (a config value, a checkpoint that does not fit the builder): recipe_main prints its one line,
    naming the field, and exits with status 2, without a traceback."""


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key. Values are resolved (${...} interpolations included)."""
    need = ("output_dir", "method", "model", "tokenizer", "checkpointer", "dataset", "optimizer", "seed", "beta",
            "orpo_lambda", "ema_decay", "segment_len", "buffer_capacity", "buffer_sampling", "ref_update_steps",
            "temperature", "top_p", "top_k", "batch_size", "gradient_accumulation_steps", "max_length",
            "max_prompt_length", "lr_schedule", "dtype", "device")
    for key in need:
        if cfg.get(key) is None:
            raise ConfigError(f"config: '{key}' is missing")
    if cfg.method not in METHODS:
        raise ConfigError(f"config: method must be one of {METHODS}, got {cfg.method!r} (the baselines run in sapo.py)")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"config: dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    for key in ("batch_size", "gradient_accumulation_steps", "segment_len", "buffer_capacity", "max_length",
                "max_prompt_length"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"config: {key} must be >= 1, got {cfg[key]}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise ConfigError(f"config: ema_decay must be in [0, 1], got {cfg.ema_decay}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"config: max_prompt_length ({cfg.max_prompt_length}) must be below max_length ({cfg.max_length})")
    if cfg.temperature <= 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ConfigError("config: temperature must be > 0, top_p in (0, 1], top_k >= 0 (0: off, 1: greedy)")
    if cfg.buffer_sampling not in ("weighted", "uniform"):
        raise ConfigError(f"config: buffer_sampling must be weighted or uniform, got {cfg.buffer_sampling!r}")
    if cfg.lr_schedule not in ("linear", "cosine", "constant", "inverse_sqrt"):
        raise ConfigError(f"config: lr_schedule must be linear, cosine, constant or inverse_sqrt, got {cfg.lr_schedule!r}")
    if cfg.get("on_nonfinite", "skip") not in ("skip", "stop"):
        raise ConfigError(f"config: on_nonfinite must be skip or stop, got {cfg.on_nonfinite!r}")
    if cfg.get("max_steps") is None and cfg.get("epochs") is None:
        raise ConfigError("config: set max_steps or epochs")
    if "source" not in cfg.dataset:
        raise ConfigError("config: dataset.source is missing (a .jsonl file or a hub dataset name)")
    if cfg.checkpointer.get("_component_") != "torchtune.training.FullModelHFCheckpointer":
        raise ConfigError("config: checkpointer must be torchtune.training.FullModelHFCheckpointer (transformers in and out)")
    if cfg.get("max_length") > _model_max_seq_len(cfg.model):
        raise ConfigError(f"config: max_length {cfg.max_length} exceeds the model's max_seq_len")
    if cfg.get("fsdp_cpu_offload", False) and torch.device(cfg.device).type != "cuda":
        raise ConfigError(f"config: fsdp_cpu_offload: True needs device: cuda (it moves sharded state from the GPU to "
                          f"CPU RAM), got device: {cfg.device}")
    if not cfg.get("fsdp_reshard_after_forward", True) and is_lora(cfg.model):
        # LoRA swaps EMA / reference adapter values into the policy's own (sharded) parameters; with the policy left
        # unsharded after a forward, the module would compute with the unsharded copies and ignore the swap
        raise ConfigError("config: fsdp_reshard_after_forward: False is not supported with LoRA (the EMA and reference "
                          "adapters are swapped into the sharded policy); set it to True")
    if int(cfg.get("dist_timeout_minutes", 60)) < 1:
        raise ConfigError(f"config: dist_timeout_minutes must be >= 1, got {cfg.dist_timeout_minutes}")


def _model_max_seq_len(cfg_model: DictConfig) -> int:
    """max_seq_len of the configured builder (its argument, else the builder's own default)."""
    if "max_seq_len" in cfg_model:
        return int(cfg_model.max_seq_len)
    with torch.device("meta"):
        return config.instantiate(cfg_model).max_seq_len


def is_lora(cfg_model: DictConfig) -> bool:
    return "lora_rank" in cfg_model


# ---------------------------------------------------------------------------------------------------
# 2. Data: sapo.py's readers, torchtune's tokenizers
# ---------------------------------------------------------------------------------------------------

def encode_example(tokenizer, prompt: list[dict], chosen: str) -> Example:
    """(x, y+) as token ids with a torchtune tokenizer. x ends where the assistant's text starts (its header
    included, for Llama-3); y+ is that text plus the turn's end token. tokenize_messages marks the assistant
    turn with mask False; Llama-3 also puts the assistant header in that turn, which belongs to x."""
    messages = [Message(role=m["role"], content=m["content"], masked=True) for m in prompt]
    tokens, mask = tokenizer.tokenize_messages(messages + [Message(role="assistant", content=chosen, masked=False)])
    start = mask.index(False)
    end = len(mask) - mask[::-1].index(False)      # one past the turn's last token; drops a trailing <|end_of_text|>
    if hasattr(tokenizer, "tokenize_message"):     # Llama-3: skip the assistant header
        start += len(tokenizer.tokenize_message(Message(role="assistant", content=""), add_end_tokens=False))
    return Example(tokens[:start], tokens[start:end])


def load_examples(source: str, split: str, tokenizer, max_length: int, max_prompt_length: int) -> tuple[list[Example], int]:
    """sapo.load_examples with a torchtune tokenizer: rows read and validated by sapo.read_rows / parse_row;
    examples whose prompt or prompt + response is too long are skipped (y+ is never truncated). Returns
    (examples, number skipped)."""
    examples, skipped = [], 0
    for where, row in read_rows(source, split):
        prompt, chosen, _ = parse_row(row, where)
        e = encode_example(tokenizer, prompt, chosen)
        if len(e.prompt_ids) > max_prompt_length or len(e.prompt_ids) + len(e.chosen_ids) > max_length:
            skipped += 1
        else:
            examples.append(e)
    if not examples:
        raise ConfigError(f"dataset.source: {source}: no example fits max_prompt_length={max_prompt_length} / max_length={max_length}")
    return examples, skipped


class _Decoder:
    """sapo.describe_tuple calls tok.decode(ids, skip_special_tokens=...); torchtune's tokenizers differ in
    keywords (Llama-3 truncates at EOS by default, SentencePiece has no skip_special_tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        try:
            return self.tokenizer.decode(ids, truncate_at_eos=False, skip_special_tokens=skip_special_tokens)
        except TypeError:
            return self.tokenizer.decode(ids)


# ---------------------------------------------------------------------------------------------------
# 3. Log-probs on torchtune models: the output layer only where a log-prob is needed
# ---------------------------------------------------------------------------------------------------

def _unembed_at_positions(self, h):
    """Replaces TransformerDecoder.unembed on our models: with `self.sapo_positions` (B, T) set, the output
    layer runs on those N positions only and returns (N, V) logits. At V = 128k, (B, T, V) logits would
    dominate memory (sapo.sequence_logps does the same for transformers models)."""
    h = self.norm(h)
    if self.sapo_positions is not None:
        h = h[self.sapo_positions]        # (B, T, D) -> (N, D): a (B, T) bool mask or (rows, positions) index tensors
    return self.output(h)


def enable_position_selection(model: nn.Module) -> None:
    model.sapo_positions = None
    model.unembed = MethodType(_unembed_at_positions, model)


@contextlib.contextmanager
def logits_at(model, positions):
    """Within this block, model(tokens) returns logits at `positions` only, (N, V): a (B, T) bool mask, or a pair
    of (N,) index tensors (rows, positions), which may repeat a position."""
    model.sapo_positions = positions
    try:
        yield
    finally:
        model.sapo_positions = None


def sequence_logps(model, input_ids, loss_mask):
    """Sum of log pi(y_t | x, y_<t) over response tokens, and their count, per sequence: (B,), (B,).
    The torchtune twin of sapo.sequence_logps; the sum itself is sapo.logps_from_logits. Right padding
    needs no attention mask: under the causal mask no real token sees a pad."""
    target_mask, targets, rows = response_targets(input_ids, loss_mask)  # (B, T-1), (N,), (N,)
    with logits_at(model, F.pad(target_mask, (0, 1), value=False)):     # (B, T)
        logits = model(input_ids)                                       # (N, V)
    return logps_from_logits(logits, targets, rows, input_ids.shape[0]), target_mask.sum(-1)


def two_row_logps(model, batch: list[dict], pad_id: int, device):
    """sapo.preference_logps's two-row path (one concatenated forward over [y+ rows; y- rows], sapo.collate) with
    the torchtune log-probs: (sum+, sum-, n+, n-), each (B,). (Not through sapo.preference_logps itself: it reads
    the transformers model.config, which a torchtune decoder has not.)"""
    pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch] + [(b["prompt_ids"], b["rejected_ids"]) for b in batch]
    c = collate(pairs, pad_id, device)
    logps, counts = sequence_logps(model, c["input_ids"], c["loss_mask"])
    B = len(batch)
    return logps[:B], logps[B:], counts[:B], counts[B:]


def shared_prefix_logps(model, batch: list[dict], pad_id: int, device):
    """(sum+, sum-, n+, n-), each (B,), one segment per tuple in sapo.shared_prefix_layout's packed rows (x and the
    shared prefix go through the model once), given to torchtune's decoder as its `mask` (bool, True: may attend)
    and `input_pos`.
    The output layer runs only at the N scored positions."""
    L = {k: v.to(device) for k, v in shared_prefix_layout(batch, pad_id).items()}
    with logits_at(model, (L["row_of"], L["h_at"])):
        logits = model(L["ids"], mask=L["allow"], input_pos=L["pos"])                     # (N, V)
    token_logps = -F.cross_entropy(logits.float(), L["targets"], reduction="none")      # (N,)
    zeros = torch.zeros(len(batch), device=token_logps.device)
    return (zeros.index_add(0, L["tuple_of"][L["is_pos"]], token_logps[L["is_pos"]]),
            zeros.index_add(0, L["tuple_of"][L["is_neg"]], token_logps[L["is_neg"]]), L["n_pos"], L["n_neg"])


@torch.no_grad()
def check_shared_prefix(model, device, tol: float = 1e-4, enabled: bool = True) -> bool:
    """Does this model honour torchtune's `mask` and `input_pos` (so the packed shared-prefix layout is exact)?
    Checked once per model, as sapo._shared_prefix_ok does: the shared-prefix path against the two-row path on
    sapo's SHARED_PREFIX_PROBE (a y- with tokens of its own, two short tuples packed into one row). Every process
    of a sharded model runs it at the same time and they agree (all-reduced). tol: 1e-4 in fp32; the recipe passes
    5e-2 where bf16 computes (a kernel that ignored the mask moves y-'s log-probs by whole nats). The answer is kept
    in model.sapo_shared_prefix."""
    ok = False
    if enabled:
        V = model.tok_embeddings.num_embeddings
        pair = [{k: [i % V for i in ids] for k, ids in p.items()} for p in SHARED_PREFIX_PROBE]
        was_training = model.training
        model.eval()
        try:
            mine = shared_prefix_logps(model, pair, 0, device)[:2]
            plain = two_row_logps(model, pair, 0, device)[:2]
            ok = all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(mine, plain))
        except (TypeError, ValueError, RuntimeError) as e:   # the model rejects the arguments
            log.info(f"shared-prefix layout unavailable ({type(e).__name__}: {e}); two rows per tuple")
        model.train(was_training)
        reshard(model)   # a forward without backward leaves a fsdp_reshard_after_forward=False model gathered
        ok = _all(ok, device)
    model.sapo_shared_prefix = ok
    return ok


def reshard(model: nn.Module) -> None:
    """Back to shards (a no-op where they already are): with fsdp_reshard_after_forward False a forward leaves
    the gathered weights as the module's parameters until a backward reshards them."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def preference_logps(model, batch: list[dict], pad_id: int, device):
    """(sum+, sum-, n+, n-), each (B,): the packed shared-prefix layout where check_shared_prefix passed for this
    model, else two rows per tuple."""
    if getattr(model, "sapo_shared_prefix", False):
        return shared_prefix_logps(model, batch, pad_id, device)
    return two_row_logps(model, batch, pad_id, device)


# ---------------------------------------------------------------------------------------------------
# 4. Segment generation on torchtune's KV cache, sharded or not
# ---------------------------------------------------------------------------------------------------

def row_seed(seed: int, step: int, micro: int, row: int) -> int:
    """Sampling noise for one row of one micro-batch: independent of the number of processes and of resumes."""
    return random.Random(f"{seed}-{step}-{micro}-{row}").getrandbits(63)


def sampling_probs(logits, temperature: float, top_k: int, top_p: float):
    """Probabilities to sample from (B, V), zero outside the kept set: temperature, then top-k, then top-p,
    in transformers' order and with its ties (tests compare the kept sets with its logits warpers)."""
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:   # keep the most likely tokens until their mass reaches top_p; the top token always stays
        sorted_p, order = probs.sort(-1, descending=True)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return probs


def sample_next(logits, noise, temperature: float, top_k: int, top_p: float):
    """Next tokens (B,) from logits (B, V) by the exponential race argmax(p / E), E ~ Exp(1) (noise), which
    draws from p (gpt-fast, torchtune's sampler). top_k = 1 is greedy."""
    if top_k == 1:
        return logits.argmax(-1)
    return (sampling_probs(logits, temperature, top_k, top_p) / noise).argmax(-1)


def _all(flag: bool, device) -> bool:
    """True when flag is True on every process (the processes of a sharded model must run the same forwards)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())
    return flag


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


@torch.no_grad()
def generate_segments(model, contexts: list[list[int]], max_new_tokens: list[int], n_steps: int, pad_id: int,
                      stop_ids, seeds: list[int], temperature=0.7, top_p=0.95, top_k=50, cache_dtype=torch.float32,
                      device=None):
    """The torchtune twin of sapo.generate_segments: continue each context by up to max_new_tokens[i] tokens,
    one batched KV-cached decode over left-padded contexts. n_steps (>= every max_new_tokens) must be the same
    on every process of a sharded model; decoding stops early only when every row on every process is done.
    device: where the model computes (with CPU offload its parameters live in CPU RAM: pass the GPU)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    B, L = len(contexts), max(len(c) for c in contexts)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    real = torch.ones((B, L + n_steps), dtype=torch.bool)
    for i, c in enumerate(contexts):               # left padding: every row's next token is at position L
        tokens[i, L - len(c):] = torch.tensor(c)
        real[i, : L - len(c)] = False
    tokens, real = tokens.to(device), real.to(device)
    mask = get_causal_mask_from_padding_mask(real, target_seq_len=L + n_steps)   # (B, L+n, L+n), pads unseen
    pos = get_position_ids_from_padding_mask(real)                               # (B, L+n), each row from 0
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    stop = torch.tensor(sorted(stop_ids), device=device)
    limit = torch.tensor(max_new_tokens, device=device)
    out = torch.full((B, n_steps), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    last = torch.zeros((B, L), dtype=torch.bool, device=device)
    last[:, -1] = True
    was_training = model.training
    model.eval()
    with local_kv_cache(model, batch_size=B, device=device, dtype=cache_dtype, decoder_max_seq_len=L + n_steps):
        with logits_at(model, last):
            logits = model(tokens, input_pos=pos[:, :L], mask=mask[:, :L])          # (B, V): prefill
        for k in range(n_steps):
            noise = torch.stack([torch.empty(logits.shape[-1], device=device).exponential_(1, generator=g) for g in gens])
            out[:, k] = sample_next(logits.float(), noise, temperature, top_k, top_p)
            done |= torch.isin(out[:, k], stop) | (k + 1 >= limit)
            if k + 1 == n_steps or _all(bool(done.all()), device):
                break
            logits = model(out[:, k, None], input_pos=pos[:, L + k, None], mask=mask[:, L + k, None])[:, -1]
    model.train(was_training)
    return [row[:n].tolist() for row, n in zip(out.cpu(), max_new_tokens)]


# ---------------------------------------------------------------------------------------------------
# 5. LoRA: adapter weight sets that can be swapped into the policy
# ---------------------------------------------------------------------------------------------------

class AdapterSet(nn.Module):
    """A list of adapter tensors in the policy's adapter order, as an nn.Module, so sapo.ema_update and
    sapo.copy_weights (which zip .parameters()) apply to LoRA unchanged. `AdapterSet(params)` wraps the
    policy's own parameters; `.copy()` makes a frozen copy (the EMA, the reference)."""

    def __init__(self, named: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(named)
        self.weights = nn.ParameterList([p if isinstance(p, nn.Parameter) else nn.Parameter(p, requires_grad=False)
                                         for p in named.values()])

    def copy(self) -> "AdapterSet":
        return AdapterSet({n: nn.Parameter(p.detach().clone(), requires_grad=False) for n, p in zip(self.names, self.weights)})

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.weights))


@contextlib.contextmanager
def swapped_in(live: AdapterSet, weights: AdapterSet):
    """Run the policy with other adapter weights (EMA or reference), then put its own back, bit for bit.
    Only outside autograd: used before the policy's forward, never between its forward and backward."""
    stash = live.copy()
    copy_weights(live, weights)
    try:
        yield
    finally:
        copy_weights(live, stash)


# ---------------------------------------------------------------------------------------------------
# 6. The recipe
# ---------------------------------------------------------------------------------------------------

class StopSignal:
    """SIGTERM (a scheduler's pre-emption; torchrun forwards its own to the workers) and SIGINT (Ctrl-C) set a flag
    instead of killing the process: the current optimizer step finishes, all processes agree on stopping after
    it (an all-reduce of the flag once per step), process 0 writes the checkpoint atomically, and the recipe exits
    with 128 + the signal (143 / 130). A second signal changes nothing. torchrun SIGKILLs its workers
    --shutdown_timeout seconds (default 30) after forwarding a signal: at 8B give it the checkpoint's write time."""

    def __init__(self):
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Preempted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _proc_status_gib(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now; VmHWM: the peak since start or reset_peak_rss), in GiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def peak_rss_gib() -> float:
    return _proc_status_gib("VmHWM")


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


try:                                    # glibc's malloc_trim, where there is one
    import ctypes
    _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


def release_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps freed blocks for
    reuse, so without it a process's RSS stays near the high-water mark of its largest phase so far (a checkpoint
    gathered into host memory, a loaded state dict) through every later phase. Called after loading or saving a
    checkpoint, and on CPU runs (where activations are host memory) between the phases of a step (scale/README.md:
    the peaks with and without it)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _full(t):
    """A plain tensor from a DTensor (sharded) or a tensor (one process)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_piece(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
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
            (target.to_local() if isinstance(target, DTensor) else target).copy_(_local_piece(full, target))
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
                local.copy_(_local_piece(v, p))
                mine[k] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                             stride=p.stride())
            elif isinstance(v, torch.Tensor):   # 'step'; an unsharded process's state
                mine[k] = v.to(device=p.device if v.dim() else v.device, copy=True)
            else:
                mine[k] = v
        state[pid] = mine
    optimizer.load_state_dict({"state": state, "param_groups": saved_groups})


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


def check_shapes(model: nn.Module, full_sd: dict, cfg: DictConfig) -> None:
    """Every checkpoint tensor must have the shape the builder made (a DTensor's .shape is the global one).
    torchtune's HF checkpointer reads only head counts and the width from config.json, so a checkpoint of
    another size (e.g. Mistral v0.3's 32768-token vocabulary into mistral_7b's 32000) would otherwise fail deep
    inside the sharded load, or, unsharded, load wrongly. Raises ConfigError naming model and checkpointer."""
    own = {k.replace("._checkpoint_wrapped_module", ""): v.shape for k, v in model.state_dict().items()}
    for key, tensor in full_sd.items():
        if key in own and tuple(own[key]) != tuple(tensor.shape):
            hint = " (the vocabulary size differs: set model.vocab_size or pick the matching builder)" \
                if "tok_embeddings" in key or key == "output.weight" else ""
            raise ConfigError(f"model: {cfg.model._component_} builds {key} with shape {tuple(own[key])}, but the "
                              f"checkpoint in checkpointer.checkpoint_dir ({cfg.checkpointer.checkpoint_dir}) has "
                              f"{tuple(tensor.shape)}{hint}")


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


def shard_model(model: nn.Module, cfg: DictConfig, trainable: bool) -> None:
    """torchtune.training.shard_model with fsdp_kwargs: each transformer layer, then custom_sharded_layers, then the
    root, bottom-up."""
    kw = fsdp_kwargs(cfg, trainable)
    match = partial(training.get_shard_conditions, names_to_match=cfg.get("custom_sharded_layers"))
    for name, m in reversed(list(model.named_modules())):
        if match(name, m):
            fully_shard(m, **kw)
    fully_shard(model, **kw)


def disable_dropout(model: nn.Module) -> None:
    """No dropout anywhere, as TRL's disable_dropout and the authors' trainer: with dropout the policy and the
    reference would disagree at step 1 (DPO's loss would not start at log 2) and log-probs would be noisy.
    torchtune.training.disable_dropout zeroes nn.Dropout modules (LoRA's lora_dropout among them, as TRL does for
    PEFT); attention dropout is a float on each MultiHeadAttention (a builder's attn_dropout), zeroed here."""
    training.disable_dropout(model)
    for m in model.modules():
        if isinstance(m, modules.MultiHeadAttention):
            m.attn_dropout = 0.0


class SAPORecipe(FTRecipeInterface):
    """SAPO-DPO / SAPO-ORPO with torchtune models on 1..N processes (see the module docstring)."""

    def __init__(self, cfg: DictConfig) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.device = utils.get_device(device=cfg.device)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.mixed = cfg.dtype == "bf16-mixed"
        # trained weights: fp32 unless pure bf16; frozen copies (EMA, reference, LoRA base): bf16 unless fp32
        self.train_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.frozen_dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
        self.compute_dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
        self.lora = is_lora(cfg.model)
        self.shard = self.world_size > 1
        self.out = Path(cfg.output_dir)
        self.B = int(cfg.batch_size)                       # prompts per process per micro-batch
        self.global_batch = self.B * self.world_size
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        self.seed = int(cfg.seed)
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.rng = random.Random(self.seed)               # truncation points and buffer sampling, same on every process
        self.step = 0
        self.skipped = 0                                  # optimizer steps skipped for a NaN/inf
        self.max_shape = (0, 0)                           # the longest loss row so far (scale/memory.py's T, R)
        self._saved_at = -1                               # the step of the last checkpoint this run wrote
        self.setup_memory = {}

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        self.metric_logger = config.instantiate(cfg.metric_logger) if self.is_rank_zero and cfg.get("metric_logger") else None
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.pad_id = self.tokenizer.pad_id
        self.stop_ids = list(self.tokenizer.stop_tokens)   # Llama-3: end_of_text, eot, eom; Mistral: </s>
        self.examples, skipped = load_examples(cfg.dataset.source, cfg.dataset.get("split", "train"), self.tokenizer,
                                               cfg.max_length, cfg.max_prompt_length)
        utils.log_rank_zero(log, f"{len(self.examples)} examples, {skipped} skipped as too long")
        prompts_per_step = self.global_batch * self.grad_accum
        self.max_steps = int(cfg.max_steps) if cfg.get("max_steps") else math.ceil(cfg.epochs * len(self.examples) / prompts_per_step)
        self.ref_every = math.ceil(len(self.examples) / prompts_per_step) if cfg.ref_update_steps == -1 else int(cfg.ref_update_steps)

        state = self._find_checkpoint() if cfg.get("resume_from_checkpoint", False) else None
        if state is None and list((self.out / "recipe_state").glob("step_*.pt")):
            raise ConfigError(f"output_dir: {self.out} holds checkpoints of an earlier run: pass resume_from_checkpoint=True "
                              "to continue it, or choose another output_dir")
        runtime_gib = _proc_status_gib("VmRSS")   # the process before any model: python, torch, tokenizer, data
        self._setup_models(cfg, state)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, trainable)
        warmup = cfg.get("num_warmup_steps")          # sapo.lr_lambda floors warmup_ratio * max_steps; +0.5 lands on it
        ratio = (warmup + 0.5) / self.max_steps if warmup is not None else cfg.get("warmup_ratio", 0.0)
        schedule = SimpleNamespace(warmup_ratio=ratio, max_steps=self.max_steps, schedule=cfg.lr_schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(schedule))
        self.buffer = ReplayBuffer(int(cfg.buffer_capacity), cfg.buffer_sampling)
        self.stream = PromptStream(len(self.examples), self.seed)
        resumed = state is not None
        if resumed:
            self._load_recipe_state(state)
        del state   # (mmapped: unmapped here, the optimizer holds copies of its own pieces)
        release_host_memory()
        self.metrics_path, self.samples_path = self.out / "metrics.jsonl", self.out / "samples.jsonl"
        if self.is_rank_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            if not resumed:     # a fresh run starts fresh logs
                for p in (self.metrics_path, self.samples_path):
                    p.unlink(missing_ok=True)
            else:               # steps after the checkpoint were not kept: drop their lines
                self._truncate_metrics(self.step)
        # one packed segment per tuple (x and the shared prefix once) where the model honours the mask / input_pos
        tol = 1e-4 if self.compute_dtype == torch.float32 else 5e-2
        for model in [self.policy] + ([self.ref] if cfg.method == "sapo-dpo" and not self.lora else []):
            with self._autocast():
                check_shared_prefix(model, self.device, tol, enabled=cfg.get("shared_prefix", True))
        layout = "one packed segment per tuple (shared prefix)" if self.policy.sapo_shared_prefix else "two rows per tuple"
        utils.log_rank_zero(log, f"log-probs: {layout}")
        self.setup_memory = {"memory/runtime_rss_gib": runtime_gib, "memory/setup_peak_rss_gib": peak_rss_gib()}
        utils.log_rank_zero(log, f"{self.max_steps} steps of {prompts_per_step} prompts on {self.world_size} processes; "
                                 f"reference refresh every {self.ref_every} steps; starting at step {self.step}")

    def _build(self, cfg_model: DictConfig, dtype, trainable: bool, full_sd: dict, lora_sd: dict | None = None,
               consume: bool = False) -> nn.Module:
        """A torchtune model, built on the meta device (no memory), sharded when there are several processes, given
        storage for its shards only, then filled from a full state dict one tensor at a time (each process copies
        its own rows: load_full_model_state_dict; consume: drop each tensor from full_sd once copied). LoRA:
        adapters trainable, base frozen."""
        with training.set_default_dtype(dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)
        prepare_model(model, self.cfg, trainable, shard=self.shard)
        cpu_offload = self.cfg.get("fsdp_cpu_offload", False)
        # offloaded shards live in CPU RAM (as torchtune's lora_dpo_distributed does); FSDP2 re-points its sharded
        # parameters at the new storage
        model.to_empty(device="cpu" if cpu_offload and self.shard else self.device)
        with training.set_default_dtype(dtype), self.device:
            for m in model.modules():
                if self.lora and isinstance(m, LoRALinear) and lora_sd is None:
                    m.initialize_parameters()
                if hasattr(m, "rope_init"):     # RoPE caches are not in the state dict
                    m.rope_init()
        check_shapes(model, full_sd, self.cfg)
        missing, unexpected = load_full_model_state_dict(model, full_sd, consume=consume)
        if self.lora:
            lora_missing = lora_unexpected = None
            if lora_sd is not None:
                lora_missing, lora_unexpected = load_full_model_state_dict(model, lora_sd)
            c = self.cfg.model
            validate_missing_and_unexpected_for_lora(
                lora_attn_modules=list(c.lora_attn_modules), apply_lora_to_mlp=c.get("apply_lora_to_mlp", False),
                apply_lora_to_output=c.get("apply_lora_to_output", False), base_missing=missing,
                base_unexpected=unexpected, lora_missing=lora_missing, lora_unexpected=lora_unexpected)
        elif missing or unexpected:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__}: missing keys {missing}, "
                               f"unexpected keys {unexpected} (checkpointer.checkpoint_dir: "
                               f"{self.cfg.checkpointer.checkpoint_dir})")
        training.validate_no_params_on_meta_device(model)
        disable_dropout(model)
        enable_position_selection(model)
        model.train(trainable)
        return model

    def _checkpointer(self, name: str, source: Path | None = None):
        """torchtune's HF checkpointer writing output_dir/<name>/epoch_<step>/; reads `source` (a folder it
        wrote) instead of the configured checkpoint when resuming."""
        overrides = {"output_dir": str(self.out / name)}
        if source is not None:
            files = sorted(p.name for p in source.glob("*.safetensors") if not p.name.startswith("adapter_"))
            overrides.update(checkpoint_dir=str(source), checkpoint_files=files)
        return config.instantiate(self.cfg.checkpointer, **overrides)

    def _setup_models(self, cfg: DictConfig, state: dict | None) -> None:
        """policy pi_theta, the EMA generator, and (DPO) the reference pi_ref; restored from a checkpoint if given."""
        dpo = cfg.method == "sapo-dpo"
        step_dir = lambda name: self.out / name / f"epoch_{state['step']}"  # noqa: E731
        self.ckpt = {}
        if self.lora:   # one model (base + policy adapters); EMA and reference are adapter sets
            self.ckpt["policy"] = self._checkpointer("policy")
            base = self.ckpt["policy"].load_checkpoint()[training.MODEL_KEY]
            lora_sd = safe_torch_load(step_dir("policy") / "adapter_model.pt") if state else None
            self.policy = self._build(cfg.model, self.frozen_dtype if self.mixed else self.train_dtype, True, base, lora_sd,
                                      consume=True)
            del base
            self.live = AdapterSet({n.replace("._checkpoint_wrapped_module", ""): p
                                    for n, p in self.policy.named_parameters() if p.requires_grad})
            self.ema = self.live.copy()
            self.ref = None        # None: the base model, adapters disabled
            self.ckpt["ema"], self.ckpt["ref"] = self._checkpointer("ema"), self._checkpointer("ref")
            if state:
                self._load_adapters(self.ema, step_dir("ema") / "adapter_model.pt")
                if state["ref_has_adapters"]:
                    self.ref = self.live.copy()
                    self._load_adapters(self.ref, step_dir("ref") / "adapter_model.pt")
            return
        # One model at a time: each process opens one checkpoint (mmapped; torchtune's HF checkpointer converts
        # Llama's q/k into memory of its own), copies its own rows into the model's shards, and releases it before
        # reading the next (a resume reads three).
        models, sd = {}, None
        names = ["policy", "ema"] + (["ref"] if dpo else [])
        for name in names:
            if state or name == "policy":
                self.ckpt[name] = self._checkpointer(name, step_dir(name) if state else None)
                sd = self.ckpt[name].load_checkpoint()[training.MODEL_KEY]
            else:   # a fresh run: EMA and reference start from the policy's checkpoint, `sd` still in hand
                self.ckpt[name] = self._checkpointer(name)
                self.ckpt[name]._weight_map = self.ckpt["policy"]._weight_map   # key -> shard file; torchtune fills it on load
            models[name] = self._build(cfg.model, self.train_dtype if name == "policy" else self.frozen_dtype,
                                       name == "policy", sd, consume=bool(state) or name == names[-1])
            if state:
                sd = None
        del sd
        self.policy, self.ema, self.ref = models["policy"], models["ema"], models.get("ref")

    def _load_adapters(self, target: AdapterSet, path: Path) -> None:
        sd = safe_torch_load(path)
        with torch.no_grad():
            for name, p in target.named().items():
                full = sd[name].to(p.dtype)
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full.to(p.device))

    # -- resume -----------------------------------------------------------------------------------------

    def _find_checkpoint(self) -> dict | None:
        """The newest recipe_state/step_N.pt (written last, atomically, so N's weights are complete)."""
        states = sorted((self.out / "recipe_state").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        if not states:
            utils.log_rank_zero(log, f"resume_from_checkpoint: nothing in {self.out / 'recipe_state'}; starting fresh")
            return None
        utils.log_rank_zero(log, f"resuming from {states[-1]}")
        # mmap: the optimizer state (4-8 bytes per parameter, 32-64 GB at 8B) stays in the file (page cache, shared
        # by the processes of a node); each process copies the slices of its own shards when the optimizer is
        # filled, after the models are built (load_full_optimizer_state_dict), and the mapping goes with `state`
        # at the end of setup. weights_only: never unpickles arbitrary objects.
        return torch.load(states[-1], map_location="cpu", weights_only=True, mmap=True)

    def _load_recipe_state(self, state: dict) -> None:
        if state["seed"] != self.seed:
            utils.log_rank_zero(log, f"seed {self.seed} in the config, {state['seed']} in the checkpoint: using the checkpoint's")
            self.seed = state["seed"]
        self.step, self.skipped = state["step"], state["skipped"]
        load_full_optimizer_state_dict(self.optimizer, state["optimizer"])   # nothing refers to the mmapped file after
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.buffer.load_state_dict(state["buffer"])
        self.stream = PromptStream(len(self.examples), self.seed, *state["stream"])
        version, internal, gauss = state["python_rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    def _truncate_metrics(self, step: int) -> None:
        if self.metrics_path.exists():
            keep = [ln for ln in self.metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in keep))

    # -- the pieces of a step -----------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.mixed else contextlib.nullcontext()

    def _ema_update(self) -> None:
        """theta_ema <- b*theta_ema + (1-b)*theta (LoRA: adapter weights only), shard by shard."""
        reshard(self.policy)
        ema_update(self.ema, self.live if self.lora else self.policy, self.cfg.ema_decay)

    def _refresh_reference(self) -> None:
        """pi_ref <- EMA (LoRA: a frozen copy of the EMA adapters on the shared base)."""
        if self.lora:
            self.ref = self.ema.copy()
        else:
            copy_weights(self.ref, self.ema)

    @contextlib.contextmanager
    def _generator(self):
        """The EMA model (LoRA: the policy module with the EMA adapters swapped in)."""
        if self.lora:
            with swapped_in(self.live, self.ema):
                yield self.policy
        else:
            yield self.ema

    @torch.no_grad()
    def _reference_logps(self, batch):
        if not self.lora:
            return preference_logps(self.ref, batch, self.pad_id, self.device)[:2]
        ctx = disable_adapter(self.policy) if self.ref is None else swapped_in(self.live, self.ref)
        with ctx:
            return preference_logps(self.policy, batch, self.pad_id, self.device)[:2]

    def _make_negatives(self, fresh: list[Example], micro: int) -> list[dict]:
        """sapo.make_negatives across processes: the plan (t, G) for all B*W rows is drawn on every process from
        the same rng; each process writes the segments of its own B rows; all processes get all segments."""
        cfg, B, r = self.cfg, self.B, self.rank
        plan = [truncation_point(len(e.chosen_ids), len(e.prompt_ids), cfg.segment_len, cfg.max_length, self.rng) for e in fresh]
        mine = range(r * B, (r + 1) * B)
        contexts = [fresh[i].prompt_ids + fresh[i].chosen_ids[: plan[i][0]] for i in mine]
        n_steps = max(G for _, G in plan)
        with self._generator() as generator, self._autocast(), \
                gathered(generator, self.shard and cfg.get("gather_generator_weights", True),
                         cfg.get("fsdp_reshard_after_forward", True)):
            segments = generate_segments(
                generator, contexts, [plan[i][1] for i in mine], n_steps, self.pad_id, self.stop_ids,
                [row_seed(self.seed, self.step, micro, i) for i in mine], cfg.temperature, cfg.top_p, cfg.top_k,
                cache_dtype=self.compute_dtype if self.mixed else next(generator.parameters()).dtype, device=self.device)
        if self.world_size > 1:   # every process gets every segment, in row order
            padded = torch.full((B, n_steps), -1, dtype=torch.long, device=self.device)
            for i, s in enumerate(segments):
                padded[i, : len(s)] = torch.tensor(s)
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            segments = [[t for t in row if t >= 0] for row in torch.cat(parts).tolist()]
        tuples = []
        for e, (t, G), seg in zip(fresh, plan, segments):
            y_neg, kept = splice_negative(e.chosen_ids, t, G, seg, self.stop_ids)
            tuples.append({"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": y_neg,
                           "t": t, "segment_len": kept, "times_sampled": 0})
        return tuples

    def _loss(self, batch: list[dict]) -> tuple[torch.Tensor, dict]:
        """sapo.batch_loss on this process's rows: the method's loss and TRL/torchtune-named metrics (means over
        these rows; averaged over processes by the caller, which equals the mean over the global batch)."""
        cfg = self.cfg
        # Reference first: LoRA swaps adapter values in place, which must not happen inside autograd. And in its
        # own autocast region: autocast caches the bf16 casts of fp32 weights until the region ends, so a shared
        # region would hand the policy forward the reference's adapter values.
        if cfg.method == "sapo-dpo":
            with self._autocast():
                ref_pos, ref_neg = self._reference_logps(batch)
        with self._autocast():
            pi_pos, pi_neg, n_pos, n_neg = preference_logps(self.policy, batch, self.pad_id, self.device)
        if cfg.method == "sapo-dpo":
            loss, r_pos, r_neg = dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, cfg.beta)
            extra = {}
        else:
            # NLL(y+) as a token mean over the *global* batch: scaled by W here, averaged over W by FSDP
            n_all = n_pos.sum().float()
            if self.world_size > 1:
                dist.all_reduce(n_all)
            nll = -pi_pos.sum() * self.world_size / n_all
            loss, log_odds, r_pos, r_neg = orpo_loss(pi_pos / n_pos, pi_neg / n_neg, nll, cfg.orpo_lambda)
            extra = {"nll_loss": nll.item(), "log_odds_ratio": F.logsigmoid(log_odds).mean().item(),
                     "log_odds_chosen": log_odds.mean().item()}
        return loss, preference_metrics(loss, r_pos, r_neg, pi_pos, pi_neg, extra)

    def _mean_over_processes(self, metrics: dict) -> dict:
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    # -- the loop -----------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        if self.device.type == "cuda":
            training.cleanup_before_training()   # (it calls torch.cpu.empty_cache, which does not exist)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = float(cfg.get("clip_grad_norm") or float("inf"))
        save_every = int(cfg.get("save_every_n_steps") or 0)
        self.n_samples = sum(1 for _ in open(self.samples_path)) if self.samples_path.exists() else 0
        mine = slice(self.rank * self.B, (self.rank + 1) * self.B)
        stop = StopSignal()        # SIGTERM / SIGINT: finish this optimizer step, checkpoint, exit 143 / 130
        release_host_memory()      # what loading (a resumed checkpoint) freed
        reset_peak_rss()           # memory/peak_rss_gib: the training peak, setup excluded
        try:
            while self.step < self.max_steps:
                self._step(trainable, max_norm, save_every, mine)
                signum = int(self._agreed(stop.signum, dist.ReduceOp.MAX))   # every process stops after the same step
                if signum:
                    if not self._saved_at == self.step:
                        self.save_checkpoint(self.step)
                    if self.is_rank_zero:
                        print(f"stopped by {signal.Signals(signum).name} after step {self.step}: checkpoint "
                              f"{self.out / 'recipe_state' / f'step_{self.step}.pt'}; resume with the same command plus "
                              f"resume_from_checkpoint=True; exit status {128 + signum}", flush=True)
                    raise Preempted(signum)
        finally:
            stop.restore()

    def _step(self, trainable, max_norm: float, save_every: int, mine: slice) -> None:
        """One optimizer step: EMA update, reference refresh, negatives, loss, backward, optimizer, log, checkpoint."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # (1) EMA update, before this step's gradient update
        self._ema_update()
        # (1b) SAPO-DPO: every ref_every completed optimizer steps, reference <- EMA, right after this step's EMA
        # update and before its loss (the authors' moving_average; step 0's copy would be a no-op)
        if cfg.method == "sapo-dpo" and self.ref_every > 0 and self.step > 0 and self.step % self.ref_every == 0:
            self._refresh_reference()
        self.optimizer.zero_grad(set_to_none=True)
        accum, gen_tokens, gen_time = [], 0, 0.0
        for micro in range(self.grad_accum):
            # (2) self-augmented negatives for the fresh prompts, written by the EMA model
            fresh = [self.examples[i] for i in self.stream.next(self.global_batch)]
            tg = time.perf_counter()
            tuples = self._make_negatives(fresh, micro)
            if self.device.type == "cpu":
                release_host_memory()
            gen_time += time.perf_counter() - tg
            gen_tokens += sum(t["segment_len"] for t in tuples)
            # (3) into the replay buffer; (4) the loss on a batch sampled from it (this process's rows)
            self.buffer.push(tuples)
            batch = self.buffer.sample(self.global_batch, self.rng)
            shape = (max(len(b["prompt_ids"]) + len(b["chosen_ids"]) for b in batch),
                     max(max(len(b["chosen_ids"]), len(b["rejected_ids"])) for b in batch))
            self.max_shape = tuple(max(a, b) for a, b in zip(self.max_shape, shape))
            batch = batch[mine]
            loss, m = self._loss(batch)
            (loss / self.grad_accum).backward()
            if self.device.type == "cpu":
                release_host_memory()
            accum.append(m)
            if self.is_rank_zero and self.n_samples < cfg.get("num_samples", 8):
                with open(self.samples_path, "a") as fh:
                    for tpl in tuples[: cfg.get("num_samples", 8) - self.n_samples]:
                        fh.write(json.dumps(describe_tuple(_Decoder(self.tokenizer), tpl, self.step + 1), ensure_ascii=False) + "\n")
                        self.n_samples += 1
        # (5) the optimizer step; a NaN/inf loss or gradient skips it (sapo.py's --on-nonfinite), on every
        # process alike: the gradient norm and the averaged loss are the same everywhere
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
        metrics = self._mean_over_processes({k: sum(m[k] for m in accum) / len(accum) for k in accum[0]})
        if math.isfinite(grad_norm.item()) and math.isfinite(metrics["loss"]):
            self.optimizer.step()
        elif cfg.get("on_nonfinite", "skip") == "stop":
            raise RuntimeError(f"non-finite loss or gradient at step {self.step + 1} (loss {metrics['loss']}); "
                               "lower the lr, or set on_nonfinite=skip; the last checkpoint is intact")
        else:   # skip: the weights stay as they were, the step still counts
            self.skipped += 1
        self.scheduler.step()
        self.step += 1
        metrics.update({"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(),
                        "nonfinite/skipped": self.skipped,
                        "buffer/size": len(self.buffer), "gen/tokens_per_s": gen_tokens / max(gen_time, 1e-9),
                        "time/step_s": time.perf_counter() - t0})
        if self.device.type == "cuda":   # to check scale/README.md's memory plan on real hardware
            metrics["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        # host memory, the largest over processes: peak since setup ended, and (first step) setup's peak and the
        # runtime before any model (what scale/memory.py checks itself against on CPU)
        metrics["memory/peak_rss_gib"] = self._agreed(peak_rss_gib(), dist.ReduceOp.MAX)
        metrics["shape/max_tokens"], metrics["shape/max_response"] = self.max_shape   # |x| + |y+|, max(|y+|, |y-|) so far
        if self.setup_memory:
            metrics.update({k: self._agreed(v, dist.ReduceOp.MAX) for k, v in self.setup_memory.items()})
            self.setup_memory = {}
        if self.is_rank_zero:
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(metrics) + "\n")
            if self.metric_logger is not None:
                self.metric_logger.log_dict({k: v for k, v in metrics.items() if k != "step"}, step=self.step)
            if self.step % cfg.get("log_every_n_steps", 1) == 0:
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if (save_every and self.step % save_every == 0) or self.step == self.max_steps:
            self.save_checkpoint(self.step)
            self._saved_at = self.step

    def _agreed(self, value: float, op) -> float:
        """value all-reduced with op (MAX, SUM) over processes."""
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.item()

    # -- checkpoints --------------------------------------------------------------------------------------

    def _adapter_config(self) -> dict:
        c = self.cfg.model
        return {"r": c.lora_rank, "lora_alpha": c.lora_alpha, "peft_type": "LORA",
                "target_modules": get_lora_module_names(list(c.lora_attn_modules), c.get("apply_lora_to_mlp", False),
                                                        c.get("apply_lora_to_output", False))}

    def save_checkpoint(self, step: int) -> None:
        """output_dir/{policy,ema,ref}/epoch_<step>/ (transformers folders; LoRA: merged policy + PEFT adapters),
        then output_dir/recipe_state/step_<step>.pt, atomically. Every process takes part in the gathers;
        process 0 writes."""
        rank0 = self.is_rank_zero
        if self.lora:
            full = training.gather_cpu_state_dict(self.policy, rank0, device=self.device)
            if rank0 and not self.shard and self.device.type == "cpu":
                # unsharded on CPU, .cpu() returns the live tensors, and get_merged_lora_ckpt adds in place
                full = {k: v.clone() for k, v in full.items()}
            if rank0:
                adapters = get_adapter_state_dict(full)
                merged = get_merged_lora_ckpt(full, rank=self.cfg.model.lora_rank, alpha=self.cfg.model.lora_alpha)
                self.ckpt["policy"].save_checkpoint({training.MODEL_KEY: merged, training.ADAPTER_KEY: adapters,
                                                     training.ADAPTER_CONFIG: self._adapter_config()}, epoch=step)
            del full
            for name, weights in (("ema", self.ema), ("ref", self.ref)):
                if weights is None:
                    continue
                sd = {n: _full(p).detach().cpu() for n, p in weights.named().items()}
                if rank0:
                    self.ckpt[name].save_checkpoint({training.ADAPTER_KEY: sd, training.ADAPTER_CONFIG: self._adapter_config()},
                                                    epoch=step, adapter_only=True)
        else:
            for name, model in (("policy", self.policy), ("ema", self.ema), ("ref", self.ref)):
                if model is None:
                    continue
                sd = training.gather_cpu_state_dict(model, rank0, device=self.device)
                if rank0:
                    self.ckpt[name].save_checkpoint({training.MODEL_KEY: sd}, epoch=step)
                del sd
                release_host_memory()     # one model's full state dict at a time, not all of them retained
        opt = training.get_full_optimizer_state_dict(self.policy, self.optimizer, rank0, device=self.device)
        if rank0:
            version, internal, gauss = self.rng.getstate()
            state = {"step": step, "skipped": self.skipped, "seed": self.seed, "optimizer": opt, "lr_scheduler": self.scheduler.state_dict(),
                     "buffer": self.buffer.state_dict(), "stream": [self.stream.epoch, self.stream.pos],
                     "python_rng": [version, list(internal), gauss], "ref_has_adapters": self.ref is not None}
            folder = self.out / "recipe_state"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".step_{step}.pt.tmp"
            torch.save(state, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"step_{step}.pt")
            self._prune(int(self.cfg.get("keep_last_n_checkpoints", 1)))
            log.info(f"checkpoint: step {step} in {self.out}")
        opt = state = None
        release_host_memory()
        dist.barrier()

    def _prune(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints (recipe state first, so a half-pruned one is incomplete)."""
        steps = sorted(int(p.stem.split("_")[1]) for p in (self.out / "recipe_state").glob("step_*.pt"))
        for old in steps[: -keep or None]:
            (self.out / "recipe_state" / f"step_{old}.pt").unlink()
            for name in ("policy", "ema", "ref"):
                shutil.rmtree(self.out / name / f"epoch_{old}", ignore_errors=True)

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()
        dist.destroy_process_group()


def init_distributed(cfg: DictConfig) -> None:
    """gloo on CPU, NCCL on GPU (plus gloo for CPU offload). A single process not launched by torchrun gets a
    one-process group, so that the same code (barriers, state-dict gathers) runs everywhere."""
    device_type = torch.device(cfg.device).type
    backend = training.get_distributed_backend(device_type, offload_ops_to_cpu=cfg.get("fsdp_cpu_offload", False))
    # every collective (and the barrier while process 0 writes a checkpoint: about 100 GB at 8B) may take this long
    timeout = datetime.timedelta(minutes=int(cfg.get("dist_timeout_minutes", 60)))
    if training.is_distributed():
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """SAPO (Self-Augmented Preference Optimization) with torchtune. See scale/configs/*.yaml."""
    try:
        check_config(cfg)
    except ConfigError as e:   # before any process group: one line, no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    init_distributed(cfg)
    if cfg.get("fsdp_cpu_offload", False):
        training.set_torch_num_threads()
    config.log_config(recipe_name="SAPORecipe", cfg=cfg)
    recipe = None
    try:
        recipe = SAPORecipe(cfg)
        recipe.setup(cfg)
        recipe.train()
    except ConfigError as e:   # found while loading (data, checkpoint shapes): one line, no traceback
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        sys.exit(2)
    except Preempted as e:
        recipe.cleanup()
        sys.exit(128 + e.signum)
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
