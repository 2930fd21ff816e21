"""SAPO at scale: a torchtune recipe. FSDP2, activation checkpointing, KV-cached segment generation under sharding,
torchtune's HF checkpointer; full fine-tuning or LoRA; one process to many nodes.

The algorithm is sapo.py's, called, not copied: the recipe hands sapo.py's functions its torchtune forward and
decode where a transformers model would go. sapo.sequence_logps / sapo.preference_logps get
`logps_at=torchtune_logps_at`; sapo.make_negatives gets `generate=` a KV-cached torchtune decode split across
processes; the packed layout is sapo_fast.shared_prefix_layout and sapo_fast.sums_by_tuple; the losses, EMA update,
reference refresh rule (sapo.refresh_due), replay buffer and tuples, prompt stream, row formats, LR schedule,
metrics and samples files are the core's. What lives here is what torchtune and many processes need: building
torchtune models, their forward and decode, the split of each step across processes, checkpoints in transformers
format, LoRA adapter sets. Sharding and state-dict loading are in scale/fsdp.py, host memory in
scale/host_memory.py.

Run it (from the repository root: `tune run` wants the recipe path relative)
    tune run --nproc_per_node 8 scale/sapo_recipe.py --config scale/configs/llama3_8b_sapo_dpo.yaml
    tune run --nproc_per_node 8 scale/sapo_recipe.py --config scale/configs/mistral_7b_sapo_orpo.yaml
    tune run scale/sapo_recipe.py --config scale/configs/llama3_8b_sapo_dpo_lora.yaml           # one GPU, LoRA
    python -m scale.tiny /tmp/sapo_tiny && \
    tune run --nproc_per_node 2 scale/sapo_recipe.py --config scale/configs/tiny_cpu.yaml model_dir=/tmp/sapo_tiny
    ... resume_from_checkpoint=True     continues from the newest complete checkpoint in output_dir
    multi-node: see scale/README.md (torchrun rendezvous).

One optimizer step on W processes, each with a micro-batch of B prompts (every process runs the same code):
  1. EMA update  theta_ema <- b*theta_ema + (1-b)*theta   (sapo.ema_update's lerp, on each process's shards in
     one foreach call: scale.fsdp.local_ema_update); then, SAPO-DPO,
     reference <- EMA (sapo.copy_weights) when sapo.refresh_due says so: at the start of every ref_update_steps-th
     step, right after its EMA update, before its loss (the authors' moving_average)
  2. negatives for all gradient_accumulation_steps micro-batches at once, as in sapo.py:
     a. all processes draw the same B*W fresh prompts per micro-batch (sapo_utils.data.PromptStream) and, inside
        sapo.make_negatives, the same truncation points (one seeded random.Random replicated on every process);
     b. in one generate call, process r generates the segments of rows r*B .. r*B+B-1 of every micro-batch with
        the sharded EMA model (torchtune KV cache); segments are all-gathered, and sapo.make_negatives splices
        them into replay tuples;
  3. for each micro-batch:
     c. every process pushes its B*W tuples into its copy of the replay buffer (sapo.ReplayBuffer) and samples
        the same B*W tuples from it; process r keeps rows r*B .. r*B+B-1;
     d. loss on those B tuples (sapo.preference_loss: DPO / ORPO), each one segment [x, y+, y-'s own tokens], short
        segments packed into shared rows (sapo_fast.shared_prefix_layout), with torchtune's mask and input_pos;
        two rows per tuple (sapo.preference_logps) where the model fails the check; backward; FSDP averages
        gradients over processes.
  4. clip, optimizer step unless the loss or gradient is NaN/inf (sapo_utils.optim.guarded_step), LR schedule
     (sapo_utils.optim.lr_lambda); all processes agree (one all-reduce) whether a SIGTERM / SIGINT arrived: if
     so, checkpoint and exit 143 / 130 after this step.
So W processes with batch_size B compute what sapo.py computes with --batch-size B*W (tests/test_scale.py
checks per-step losses against a sapo.py run).

Where this recipe departs from sapo.py, and why
  - The replay buffer is global: replicated on every process, so buffer_capacity counts tuples over all
    processes. The authors kept 2000 per process (16000 over 8 GPUs); the 8-GPU configs set 16000.
  - Segments are sampled by our own loop on torchtune's KV cache (torchtune's `generate` has no top-p and
    runs the output layer over the whole prompt). Its noise is seeded per (seed, step, micro-batch, row), so a
    negative does not depend on the number of processes, and a resumed run draws the same negatives. The
    distribution is transformers' temperature, top-k, top-p (sapo_fast.TopKTopPSampler.kept). Greedy when top_k = 1 (the tests
    use that to compare with transformers' generate in sapo.py).
  - Prompts are encoded with torchtune's tokenizers (`tokenize_messages`): y+ is the assistant's text plus its
    end-of-turn token (Llama-3 <|eot_id|>, Qwen2.5 <|im_end|>, Mistral </s>); torchtune's extra <|end_of_text|>
    after the last turn is not part of y+; dataset.system_prompt gives rows without a system message one. Contents are stripped (torchtune's Llama-3 tokenizer strips them). Rows are read and
    validated by sapo_utils.data (the same formats as sapo.py; `dataset.columns` is sapo.py's --columns).
  - ORPO's NLL is a token mean over the whole global batch: the chosen-token count is all-reduced, so W
    processes give the same loss as one process with W times the batch.
  - dtype bf16-mixed keeps fp32 master weights (and fp32 optimizer state) for what is trained, stores the EMA,
    the reference and LoRA's frozen base in bf16, and computes in bf16: at the authors' lr 5e-7 a pure-bf16
    weight (torchtune's dtype bf16) would not move (bf16 resolves 1 part in 256). Sharded, the policy has FSDP2's
    MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) (torchtune 0.6.1's shard_model passes none): layers
    are gathered in bf16, and no autocast cache keeps a bf16 copy of every gathered weight (scale/fsdp.py).
  - Dropout is off in every model (policy, EMA, reference), attention dropout included
    (disable_torchtune_dropout).
  - The embedding's padding_idx is transformers' (config.json's pad_token_id: hf_padding_idx), so the pad
    token's row gets no gradient wherever it occurs, as in sapo.py; torchtune's embedding has none.
  - Collectives time out after max(step_timeout_minutes, 4 x the longest step) once training runs
    (dist_timeout_minutes during setup and checkpoint writes): a dead or hung process ends the job in minutes.
  - Memory: scale/memory.py estimates each process's peak by component for any config and world size.
  - Bad input (config values, dataset rows, a checkpoint whose shapes differ from the builder's) stops with one
    line naming the field and exit status 2 (ConfigError, sapo_utils.errors.UserError).
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
    checkpoint is 90 GiB (scale/README.md). A resume reads one model at a time and mmaps the checkpoint files:
    each process copies only its own rows of each tensor into its shards (scale/fsdp.py).
    checkpoint_format: sharded (the 70B config) writes output_dir/checkpoints/step_<step>/ instead, each process
    its own shards of every model and of the optimizer state, with a manifest of hashes
    (scale/sharded_checkpoint.py): nothing is gathered, and any process count resumes from it.
  - A tied output layer (TiedLinear: Llama-3.2, small Qwen2 / Qwen2.5, Gemma) keeps the embeddings in the root
    FSDP unit whatever custom_sharded_layers names (scale.fsdp.custom_units).
  - Stop signals are sapo.py's (sapo_utils.run.StopSignals): the first SIGTERM / SIGINT finishes the step and
    checkpoints; a second one stops at once (the last complete checkpoint stays intact).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from types import MethodType

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from torchtune import config, modules, training, utils
from torchtune.data import Message
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import KVCache, MultiHeadAttention, local_kv_cache
from torchtune.modules.peft import (LoRALinear, disable_adapter, get_adapter_state_dict, get_lora_module_names,
                                    get_merged_lora_ckpt, validate_missing_and_unexpected_for_lora)
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.training.checkpointing._utils import safe_torch_load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import sapo` also when launched from elsewhere
import sapo  # noqa: E402
import sapo_fast  # noqa: E402
from sapo_utils.data import PromptStream, parse_columns  # noqa: E402
from sapo_utils.errors import Stopped, UserError  # noqa: E402
from sapo_utils.optim import guarded_step, make_scheduler  # noqa: E402
from sapo_utils.report import MetricsLog, append_samples, trim_jsonl  # noqa: E402
from sapo_utils.run import StopSignals, seed_everything  # noqa: E402

from scale.fsdp import (all_processes, full_tensor, gathered, init_distributed, is_lora,  # noqa: E402
                        local_ema_update, set_collective_timeout, step_timeout_minutes,
                        load_full_model_state_dict, load_full_optimizer_state_dict, prepare_model, reshard)
from scale import sharded_checkpoint  # noqa: E402
from scale.host_memory import peak_rss_gib, proc_status_gib, release_host_memory, reset_peak_rss  # noqa: E402

log = utils.get_logger("INFO")
DTYPES = ("fp32", "bf16", "bf16-mixed")
METHODS = ("sapo-dpo", "sapo-orpo")   # sapo.py also runs the baselines (sft, dpo, orpo, spin); this recipe runs SAPO


# ---------------------------------------------------------------------------------------------------
# 1. Config check: every key the recipe reads, with its constraint (tests run it on every YAML)
# ---------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """Bad input (a config value, a checkpoint that does not fit the builder): recipe_main prints its one line,
    naming the field, and exits with status 2, without a traceback."""


def check_recipe_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad key of the recipe's YAML (sapo.py's own flags are checked by
    sapo_utils.cli.check_config). Values are resolved (${...} interpolations included)."""
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
    for key in ("rpo_alpha", "dpop_lambda"):
        value = cfg.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"config: {key} must be a number >= 0 (0: off), got {value!r}")
    if not isinstance(cfg.get("suffix_free", False), bool):
        raise ConfigError(f"config: suffix_free must be True or False, got {cfg.get('suffix_free')!r}")
    if cfg.get("on_nonfinite", "skip") not in ("skip", "stop"):
        raise ConfigError(f"config: on_nonfinite must be skip or stop, got {cfg.on_nonfinite!r}")
    if cfg.get("max_steps") is None and cfg.get("epochs") is None:
        raise ConfigError("config: set max_steps or epochs")
    if "source" not in cfg.dataset:
        raise ConfigError("config: dataset.source is missing (a .jsonl file or a hub dataset name)")
    try:
        parse_columns(cfg.dataset.get("columns") or "")
    except UserError as e:   # its message names --columns, sapo.py's flag: this is the key
        raise ConfigError(f"config: dataset.columns: {str(e).removeprefix('--columns: ')}") from None
    system_prompt = cfg.dataset.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ConfigError(f"config: dataset.system_prompt must be a string or null, got {system_prompt!r}")
    if cfg.get("checkpoint_format", "full") not in ("full", "sharded"):
        raise ConfigError(f"config: checkpoint_format must be full (transformers folders, process 0 writes) or sharded "
                          f"(each process its own part), got {cfg.checkpoint_format!r}")
    if cfg.checkpointer.get("_component_") != "torchtune.training.FullModelHFCheckpointer":
        raise ConfigError("config: checkpointer must be torchtune.training.FullModelHFCheckpointer (transformers in and out)")
    max_seq_len, window = _model_limits(cfg.model)
    if cfg.get("max_length") > max_seq_len:
        raise ConfigError(f"config: max_length {cfg.max_length} exceeds the model's max_seq_len")
    if window is not None and cfg.max_length > window:
        # torchtune's Gemma2Attention applies its window by row index, not by position: rows past it would be cut
        # where the recipe's packed rows and left-padded decoding put tokens that are in fact within it
        raise ConfigError(f"config: max_length {cfg.max_length} exceeds {cfg.model._component_}'s sliding attention "
                          f"window of {window} tokens (applied by row index in torchtune, which the recipe's packed "
                          f"rows and decoding do not follow): set max_length <= {window}")
    if cfg.get("fsdp_cpu_offload", False) and torch.device(cfg.device).type != "cuda":
        raise ConfigError(f"config: fsdp_cpu_offload: True needs device: cuda (it moves sharded state from the GPU to "
                          f"CPU RAM), got device: {cfg.device}")
    if not cfg.get("fsdp_reshard_after_forward", True) and is_lora(cfg.model):
        # LoRA swaps EMA / reference adapter values into the policy's own (sharded) parameters; with the policy left
        # unsharded after a forward, the module would compute with the unsharded copies and ignore the swap
        raise ConfigError("config: fsdp_reshard_after_forward: False is not supported with LoRA (the EMA and reference "
                          "adapters are swapped into the sharded policy); set it to True")
    rows = cfg.get("generate_rows_per_call")
    if rows is not None and int(rows) < int(cfg.batch_size):
        raise ConfigError(f"config: generate_rows_per_call must be null or >= batch_size ({cfg.batch_size}: one "
                          f"micro-batch), got {rows}")
    for key, default in (("dist_timeout_minutes", 60), ("step_timeout_minutes", 5)):
        if not float(cfg.get(key, default)) > 0:
            raise ConfigError(f"config: {key} must be > 0, got {cfg.get(key)}")
    if not isinstance(cfg.get("compile_decode", False), bool):
        raise ConfigError(f"config: compile_decode must be True or False, got {cfg.get('compile_decode')!r}")
    backend = str(cfg.get("compile_backend", "inductor"))
    if cfg.get("compile_decode", False) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"config: compile_backend {backend!r} is not one of torch.compile's backends "
                          f"({', '.join(torch._dynamo.list_backends())})")


def attention_window(model: nn.Module) -> int | None:
    """The smallest sliding attention window of a model's layers (Gemma 2: 4096 tokens on every other layer); None
    where every layer attends globally."""
    return min((m.sliding_window_size for m in model.modules() if getattr(m, "sliding_window_size", None)), default=None)


def _model_limits(cfg_model: DictConfig) -> tuple[int, int | None]:
    """(max_seq_len, attention_window) of the configured builder, built on the meta device (a tenth of a second at
    27B: no memory, no weights)."""
    with torch.device("meta"):
        model = config.instantiate(cfg_model)
    return int(cfg_model.get("max_seq_len", model.max_seq_len)), attention_window(model)


def packed_row_limit(model: nn.Module) -> int:
    """The longest packed row the model takes: torchtune refuses a row longer than max_seq_len whatever its
    positions, and a sliding window (Gemma 2) counts row indices, so a packed row must stay within it too."""
    return min(model.max_seq_len, attention_window(model) or model.max_seq_len)


# ---------------------------------------------------------------------------------------------------
# 2. Data: sapo.py's row formats (sapo_utils.data), torchtune's tokenizers
# ---------------------------------------------------------------------------------------------------

def encode_torchtune_example(tokenizer, prompt: list[dict], response: str,
                             system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """(x, y) as token ids with a torchtune tokenizer: sapo.encode_example's counterpart, passed to
    sapo.load_examples (which reads rows through sapo_utils.data, so every row format and dataset.columns behave
    as in sapo.py). x ends where the assistant's text starts, its header included (Llama-3's
    <|start_header_id|>assistant<|end_header_id|>, Qwen's <|im_start|>assistant); y is that text plus the turn's end
    token. tokenize_messages marks the whole assistant turn with mask False, header included: the header is the
    tokens the turn starts with whatever its text, i.e. those it shares with an empty turn (every torchtune
    tokenizer; Llama-3's tokenize_message, which gives it directly, is not on Qwen's). system_prompt: a system
    message for rows that have none (dataset.system_prompt: what a chat template adds by default, e.g. Qwen2.5's)."""
    messages = [Message(role=m["role"], content=m["content"], masked=True) for m in prompt]
    if system_prompt and not any(m.role == "system" for m in messages):
        messages.insert(0, Message(role="system", content=system_prompt, masked=True))

    def assistant_turn(text: str) -> tuple[list[int], int, int]:
        tokens, mask = tokenizer.tokenize_messages(messages + [Message(role="assistant", content=text, masked=False)])
        # one past the turn's last token: drops Llama-3's trailing <|end_of_text|> (masked)
        return tokens, mask.index(False), len(mask) - mask[::-1].index(False)
    tokens, start, end = assistant_turn(response)
    empty, empty_start, empty_end = assistant_turn("")
    header = 0
    while header < min(end - start, empty_end - empty_start) - 1 and \
            tokens[start + header] == empty[empty_start + header]:
        header += 1
    return tokens[:start + header], tokens[start + header:end]


class _Decoder:
    """sapo_utils.report.describe_tuple calls tok.decode(ids, skip_special_tokens=...); torchtune's tokenizers differ in
    keywords (Llama-3 truncates at EOS by default, SentencePiece has no skip_special_tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        try:
            return self.tokenizer.decode(ids, truncate_at_eos=False, skip_special_tokens=skip_special_tokens)
        except TypeError:
            return self.tokenizer.decode(ids)



# ---------------------------------------------------------------------------------------------------
# 3. Log-probs on torchtune models: sapo.py's functions, with a torchtune forward as their logps_at
# ---------------------------------------------------------------------------------------------------

def _unembed_at_positions(self, h):
    """Replaces TransformerDecoder.unembed on our models. With `self.sapo_positions` set (a (B, T) bool mask or
    (rows, positions) index tensors), the output layer runs at those N positions only: logits (N, V), or, with
    `self.sapo_targets` (N,) set too, the targets' token log-probs (N,) through sapo_fast.chunked_token_logps, a few
    thousand positions at a time, recomputed in backward: no (N, V) logits for a whole batch are ever alive (at
    V = 128k they would dominate memory). Inside the model's forward, so FSDP has the weights gathered."""
    h = self.norm(h)
    if self.sapo_positions is None:
        return self.output(h)
    h = h[self.sapo_positions]                                           # (N, D)
    if self.sapo_targets is None:
        return self.output(h)                                            # (N, V)
    return sapo_fast.chunked_token_logps(self.output, h, self.sapo_targets)  # (N,)


def enable_position_selection(model: nn.Module) -> None:
    model.sapo_positions = model.sapo_targets = None
    model.sapo_row_limit = packed_row_limit(model)
    model.unembed = MethodType(_unembed_at_positions, model)


@contextlib.contextmanager
def selected_positions(model, positions, targets=None):
    """Within this block, model(tokens) returns logits at `positions` only, (N, V), or with targets (N,) their
    token log-probs (N,). positions: a (B, T) bool mask, or a pair of (N,) index tensors (rows, positions), which
    may repeat a position."""
    model.sapo_positions, model.sapo_targets = positions, targets
    try:
        yield
    finally:
        model.sapo_positions = model.sapo_targets = None


def torchtune_logps_at(model, input_ids, attention_mask, at, targets):
    """sapo.full_logps_at for a torchtune decoder, the `logps_at` of sapo.sequence_logps / sapo.preference_logps:
    token log-probs (N,) at the N positions `at` (B, T) marks, the output layer run at those positions only, in
    chunks. Right padding needs no attention mask: under the causal mask no real token sees a pad."""
    with selected_positions(model, at, targets):
        return model(input_ids)


def two_row_torchtune_logps(model, batch: list[dict], pad_id: int, device):
    """sapo.preference_logps on a torchtune decoder: two rows per tuple, (sum+, sum-, n+, n-), each (B,)."""
    return sapo.preference_logps(model, batch, pad_id, device, logps_at=torchtune_logps_at)


def _packed_forward(model, layout: dict, batch_size: int):
    """(sum+, sum-, n+, n-) from a sapo_fast.shared_prefix_layout already on the device: one forward with the
    layout's mask (bool, True: may attend) and positions as torchtune's `mask` and `input_pos`, the output layer at
    the N scored positions only, in chunks."""
    with selected_positions(model, (layout["row_of"], layout["h_at"]), layout["targets"]):
        token_logps = model(layout["ids"], mask=layout["allow"], input_pos=layout["pos"])   # (N,)
    sum_pos, sum_neg = sapo_fast.sums_by_tuple(token_logps, layout, batch_size)
    return sum_pos, sum_neg, layout["n_pos"], layout["n_neg"]


def packed_torchtune_logps(model, batch: list[dict], pad_id: int, device):
    """= sapo.preference_logps, as sapo_fast.packed_logps, on a torchtune decoder: one segment per tuple in
    sapo_fast.shared_prefix_layout's packed rows (x and the shared prefix go through the model once)."""
    layout = {k: v.to(device) for k, v in sapo_fast.shared_prefix_layout(batch, pad_id).items()}
    return _packed_forward(model, layout, len(batch))


@torch.no_grad()
def torchtune_packing_ok(model, device, tol: float = 1e-4, enabled: bool = True) -> bool:
    """sapo_fast.packing_ok for a torchtune decoder (which has no transformers config or base_model): may
    packed_torchtune_logps stand in for two_row_torchtune_logps on this model? sapo_fast's probe and its rule
    (sapo_fast.packing_verdict): on sapo_fast.probe_batch (a y- with tokens of its own, two short tuples packed into
    one row) the two agree to tol, and moving y-'s own positions by +3 changes the packed numbers (a model that
    ignored input_pos would pass at random initialisation). Only the forward differs: torchtune's input_pos where
    transformers' takes position_ids.
    Every process of a sharded model runs it at the same time and they agree (all-reduced). tol: 1e-4 in fp32;
    the recipe passes 5e-2 where bf16 computes (a kernel that ignored the mask moves y-'s log-probs by whole
    nats). The answer is kept in model.sapo_shared_prefix."""
    ok = False
    if enabled:
        batch = sapo_fast.probe_batch(model.tok_embeddings.num_embeddings)
        was_training = model.training
        model.eval()
        try:
            layout = {k: v.to(device) for k, v in sapo_fast.shared_prefix_layout(batch, 0).items()}
            packed = _packed_forward(model, layout, len(batch))[:2]
            plain = two_row_torchtune_logps(model, batch, 0, device)[:2]
            # y-'s own positions moved by +3, where sapo_fast's probe moves them (sapo_fast.with_shifted_positions)
            layout["pos"] = layout["pos"].clone()
            layout["pos"][sapo_fast.PROBE_OWN_NEGATIVE] += 3
            moved = _packed_forward(model, layout, len(batch))[:2]
            ok = sapo_fast.packing_verdict(packed, plain, moved, tol)
        except (TypeError, ValueError, RuntimeError) as e:   # the model rejects the arguments
            log.info(f"shared-prefix layout unavailable ({type(e).__name__}: {e}); two rows per tuple")
        model.train(was_training)
        reshard(model)   # a forward without backward leaves a fsdp_reshard_after_forward=False model gathered
        ok = all_processes(ok, device)
    model.sapo_shared_prefix = ok
    return ok


def longest_segment(batch: list[dict]) -> int:
    """The longest packed segment [x, y+, y-'s own tokens] of a batch (sapo_fast.shared_prefix_layout's row width)."""
    return max(len(b["prompt_ids"]) + len(b["chosen_ids"]) + len(b["rejected_ids"])
               - sapo_fast.shared_prefix_len(b["chosen_ids"], b["rejected_ids"]) for b in batch)


def torchtune_preference_logps(model, batch: list[dict], pad_id: int, device):
    """(sum+, sum-, n+, n-), each (B,): packed where torchtune_packing_ok passed for this model and every segment
    fits its max_seq_len, else two rows per tuple (sapo_fast.preference_logps's choice, for torchtune decoders).
    A segment's positions never pass max_length, but torchtune refuses a row longer than max_seq_len whatever
    its positions (and Gemma 2 windows by row index: packed_row_limit): x + y+ + y-'s own tokens can be, when y-
    parts from y+ early."""
    if getattr(model, "sapo_shared_prefix", False) and longest_segment(batch) <= model.sapo_row_limit:
        return packed_torchtune_logps(model, batch, pad_id, device)
    return two_row_torchtune_logps(model, batch, pad_id, device)


# ---------------------------------------------------------------------------------------------------
# 4. Segment generation on torchtune's KV cache, sharded or not: the `generate` of sapo.make_negatives
# ---------------------------------------------------------------------------------------------------

def row_seed(seed: int, step: int, micro: int, row: int) -> int:
    """Sampling noise for one row of one micro-batch: independent of the number of processes and of resumes."""
    return random.Random(f"{seed}-{step}-{micro}-{row}").getrandbits(63)


def sample_next(logits, noise, temperature: float, top_k: int, top_p: float):
    """Next tokens (B,) from logits (B, V): the distribution sapo_fast.TopKTopPSampler keeps (transformers'
    temperature, then top-k, then top-p), drawn by the exponential race argmax(p / E) over the kept tokens, with
    E ~ Exp(1) the row's own seeded noise (B, V) (gpt-fast, torchtune's sampler): a negative then depends neither on
    the number of processes nor on a resume, which a multinomial draw on the global generator would. top_k = 1 is
    greedy."""
    if top_k == 1:
        return logits.argmax(-1)
    # ties with the k-th token looked up to top_k further without a host sync (exact unless more tie)
    p, idx = sapo_fast.TopKTopPSampler(temperature, top_k, top_p).kept(logits, max_ties=max(top_k, 1))
    pick = (p / noise.gather(-1, idx)).argmax(-1, keepdim=True)
    return idx.gather(-1, pick).squeeze(-1)


def _update_without_sync(cache, k_val, v_val):
    """torchtune's KVCache.update without its bound check, `assert cache_pos[0] + seq_len <= max_seq_len`: reading
    a device tensor on the host, it stalls the GPU in every layer at every token. The bound holds by
    construction here: the cache is made for the prompt plus n_steps tokens."""
    seq_len = k_val.shape[2]
    cache.k_cache[:, :, cache.cache_pos[:seq_len]] = k_val
    cache.v_cache[:, :, cache.cache_pos[:seq_len]] = v_val
    cache.cache_pos.add_(seq_len)
    return cache.k_cache, cache.v_cache


def _cached_attention(self, x, y=None, *, mask=None, input_pos=None):
    """torchtune's MultiHeadAttention.forward for self-attention with a KV cache, with the grouped k/v given to SDPA
    as they are (enable_gqa): torchtune expands them to every query head first, a copy of the whole cache in every
    layer at every token (4x the cache's bytes for Llama-3-8B's 32 query and 8 kv heads)."""
    b, s_x, _ = x.shape
    q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
    k = self.k_proj(x).view(b, s_x, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).view(b, s_x, self.num_kv_heads, self.head_dim)
    if self.pos_embeddings is not None:
        q = self.pos_embeddings(q, input_pos=input_pos)
        k = self.pos_embeddings(k, input_pos=input_pos)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # (b, heads, s, head_dim)
    if self.q_norm is not None:
        q = self.q_norm(q)
    if self.k_norm is not None:
        k = self.k_norm(k)
    k, v = self.kv_cache.update(k, v)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    return self.output_proj(out.transpose(1, 2).contiguous().view(b, s_x, -1))


@contextlib.contextmanager
def sync_free_kv_cache(model, **kw):
    """torchtune.modules.local_kv_cache, whose caches update without a host sync (_update_without_sync) and whose
    self-attention layers read them without expanding k/v to every head (_cached_attention)."""
    with local_kv_cache(model, **kw):
        caches = [m for m in model.modules() if isinstance(m, KVCache)]
        layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and m.kv_cache is not None]
        for c in caches:
            c.update = functools.partial(_update_without_sync, c)
        for m in layers:
            m.forward = functools.partial(_cached_attention, m)
        try:
            yield
        finally:
            for c in caches:
                del c.update
            for m in layers:
                del m.forward


DONE_CHECK_EVERY = 16   # decoding steps between the checks whether every row on every process has stopped


def compiled_decode_step(model, backend: str = "inductor"):
    """The model's one-token decoding step under torch.compile, for torchtune_generate's decode_step: static shapes
    (rows, one token, a fixed cache_len), and on CUDA with inductor CUDA graphs ("reduce-overhead"): a step is then
    a few graph launches instead of a few hundred kernel launches from Python. An unsharded model is one graph
    (fullgraph: the sync-free KV cache update and the grouped-query attention above trace without a break); a
    sharded one breaks at each FSDP unit's hooks (no-ops while gather_generator_weights holds the weights) into
    several graphs. A call that fails to compile falls back to the eager model for the rest of the run, with one
    warning."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    mode = "reduce-overhead" if on_cuda and backend == "inductor" else None
    sharded = any(isinstance(m, FSDPModule) for m in model.modules())
    compiled = torch.compile(model, backend=backend, mode=mode, fullgraph=not sharded, dynamic=False)
    state = {"eager": False}

    def step(*args, **kwargs):
        if not state["eager"]:
            try:
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  (dynamo / inductor errors have no common base class)
                state["eager"] = True
                log.warning(f"compile_decode: the decoding step did not compile ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); decoding eagerly")
        return model(*args, **kwargs)
    return step


@torch.no_grad()
def torchtune_generate(model, contexts: list[list[int]], max_new_tokens: list[int], pad_id: int, stop_ids,
                       sampling: dict, seeds: list[int], n_steps: int | None = None, cache_dtype=torch.float32,
                       device=None, decode_step=None, cache_len: int | None = None) -> list[list[int]]:
    """sapo.generate_segments on a torchtune decoder: continue each context by up to max_new_tokens[i] tokens,
    one batched KV-cached decode over left-padded contexts. sampling: sapo.segment_sampling(...) or sapo_utils.evaluation.GREEDY;
    row i's noise comes from seeds[i]. n_steps (>= every max_new_tokens; default their max) must be the same on
    every process of a sharded model; decoding stops early only when every row on every process is done.
    device: where the model computes (with CPU offload its parameters live in CPU RAM: pass the GPU).
    decode_step: what runs each one-token step (default: the model), e.g. compiled_decode_step(model); cache_len:
    the KV cache's length (default: the longest context plus n_steps), fixed so that a compiled step sees the same
    shapes at every call."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n_steps = n_steps or max(max_new_tokens)
    greedy = not sampling.get("do_sample") or sampling.get("top_k") == 1
    B, L = len(contexts), max(len(c) for c in contexts)
    cache_len = max(cache_len or 0, L + n_steps)
    decode_step = decode_step or model
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    real = torch.ones((B, L + n_steps), dtype=torch.bool)
    for i, c in enumerate(contexts):               # left padding: every row's next token is at position L
        tokens[i, L - len(c):] = torch.tensor(c)
        real[i, : L - len(c)] = False
    tokens, real = tokens.to(device), real.to(device)
    mask = get_causal_mask_from_padding_mask(real, target_seq_len=cache_len)     # (B, L+n, cache), pads unseen
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
    with sync_free_kv_cache(model, batch_size=B, device=device, dtype=cache_dtype, decoder_max_seq_len=cache_len):
        with selected_positions(model, last):
            logits = model(tokens, input_pos=pos[:, :L], mask=mask[:, :L])          # (B, V): prefill
        for k in range(n_steps):
            if greedy:
                out[:, k] = logits.argmax(-1)
            else:
                V = logits.shape[-1]
                noise = torch.stack([torch.empty(V, device=device).exponential_(1, generator=g) for g in gens])
                out[:, k] = sample_next(logits.float(), noise, sampling["temperature"], sampling["top_k"],
                                        sampling["top_p"])
            done |= torch.isin(out[:, k], stop) | (k + 1 >= limit)
            # reading `done` is a host sync (and an all-reduce): every DONE_CHECK_EVERY steps only. The extra
            # tokens a finished row draws meanwhile come after its stop token (or its limit) and are cut off;
            # each row's noise is its own, so they change none of the tokens kept
            if k + 1 == n_steps:
                break
            if (k + 1) % DONE_CHECK_EVERY == 0 and all_processes(done.all(), device):   # one host read
                break
            logits = decode_step(out[:, k, None], input_pos=pos[:, L + k, None], mask=mask[:, L + k, None])[:, -1]
    model.train(was_training)
    segments = []
    for row, n in zip(out.cpu().tolist(), max_new_tokens):    # each row up to its first stop token or its limit
        end = next((i + 1 for i, token in enumerate(row[:n]) if token in stop_ids), n)
        segments.append(row[:end])
    return segments


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
    sapo.copy_weights(live, weights)
    try:
        yield
    finally:
        sapo.copy_weights(live, stash)


# ---------------------------------------------------------------------------------------------------
# 6. The recipe
# ---------------------------------------------------------------------------------------------------

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


def hf_padding_idx(checkpoint_dir) -> int | None:
    """The padding_idx transformers gives the model's embedding: config.json's pad_token_id (Llama, Mistral, Qwen2
    ...; None where it has none). That row's gradient stays 0 wherever the token occurs, in training as sapo.py runs
    it; torchtune's embedding has none. Set on the recipe's embedding, both train the same weights: it matters
    where the pad id occurs as a token (an untrained model writes it into a negative; the tiny test model does)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.exists():
        return None
    pad = json.loads(path.read_text()).get("pad_token_id")
    return pad if isinstance(pad, int) else None


def disable_torchtune_dropout(model: nn.Module) -> None:
    """sapo_utils.models.disable_dropout for torchtune modules (which have no transformers config): no dropout
    anywhere, as TRL's disable_dropout and the authors' trainer: with dropout the policy and the reference would
    disagree at step 1 (DPO's loss would not start at log 2) and log-probs would be noisy.
    torchtune.training.disable_dropout zeroes nn.Dropout modules (LoRA's lora_dropout among them, as TRL does for
    PEFT); attention dropout is a float on each MultiHeadAttention (a builder's attn_dropout), zeroed here."""
    training.disable_dropout(model)
    for m in model.modules():
        if isinstance(m, modules.MultiHeadAttention):
            m.attn_dropout = 0.0


class SAPORecipe(FTRecipeInterface):
    """SAPO-DPO / SAPO-ORPO with torchtune models on 1..N processes (see the module docstring)."""

    def __init__(self, cfg: DictConfig) -> None:
        check_recipe_config(cfg)
        self.cfg = cfg
        self.device = utils.get_device(device=cfg.device)
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self.is_rank_zero = self.rank == 0
        self.mixed = cfg.dtype == "bf16-mixed"
        # trained weights: fp32 unless pure bf16; frozen copies (EMA, reference, LoRA base): bf16 unless fp32
        self.train_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        self.frozen_dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
        self.compute_dtype = torch.float32 if cfg.dtype == "fp32" else torch.bfloat16
        self.decode_steps = {}   # compile_decode: the compiled decoding step of each generator model
        self.lora = is_lora(cfg.model)
        self.sharded = cfg.get("checkpoint_format", "full") == "sharded"   # resume state: scale/sharded_checkpoint.py
        self.shard = self.world_size > 1
        self.out = Path(cfg.output_dir)
        self.B = int(cfg.batch_size)                       # prompts per process per micro-batch
        self.global_batch = self.B * self.world_size
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        self.seed = int(cfg.seed)
        seed_everything(self.seed)
        # the settings sapo.py's functions read, as its Config: the method's recipe (EMA generator, segments, buffer,
        # reference refreshed from the EMA for SAPO-DPO) and the global batch the reference period counts in
        self.sapo_cfg = sapo.Config(method=cfg.method, ref_update_steps=int(cfg.ref_update_steps),
                                    batch_size=self.global_batch, grad_accum=self.grad_accum)
        self.method = sapo.method_recipe(self.sapo_cfg)
        self.sampling = sapo.segment_sampling(float(cfg.temperature), int(cfg.top_k), float(cfg.top_p))
        self.rng = random.Random(self.seed)               # truncation points and buffer sampling, same on every process
        self.step = 0
        self.skipped = 0                                  # optimizer steps skipped for a NaN/inf
        self.longest_step_s = 0.0                         # sizes the collective timeout during training
        self.max_shape = (0, 0)                           # the longest loss row so far (scale/memory.py's T, R)
        self._saved_at = -1                               # the step of the last checkpoint this run wrote
        self.setup_memory = {}

    # -- setup ------------------------------------------------------------------------------------------

    def setup(self, cfg: DictConfig) -> None:
        self.metric_logger = config.instantiate(cfg.metric_logger) if self.is_rank_zero and cfg.get("metric_logger") else None
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.pad_id = self.tokenizer.pad_id
        self.stop_ids = list(self.tokenizer.stop_tokens)   # Llama-3: end_of_text, eot, eom; Mistral: </s>
        self.examples = sapo.load_examples(cfg.dataset.source, self.tokenizer, cfg.max_length, cfg.max_prompt_length,
                                           cfg.dataset.get("split", "train"), verbose=self.is_rank_zero,
                                           columns=cfg.dataset.get("columns") or "",
                                           encode=functools.partial(encode_torchtune_example,
                                                                    system_prompt=cfg.dataset.get("system_prompt")))
        utils.log_rank_zero(log, f"{len(self.examples)} examples")
        prompts_per_step = self.global_batch * self.grad_accum
        self.max_steps = int(cfg.max_steps) if cfg.get("max_steps") else math.ceil(cfg.epochs * len(self.examples) / prompts_per_step)
        self.ref_every = sapo.reference_period(self.sapo_cfg, len(self.examples))

        other = "full" if self.sharded else "sharded"
        if cfg.get("resume_from_checkpoint", False) and (
                list((self.out / "recipe_state").glob("step_*.pt")) if self.sharded
                else sharded_checkpoint.checkpoint_dirs(self.out / "checkpoints")):
            raise ConfigError(f"checkpoint_format: {self.out} holds {other} checkpoints, this config writes "
                              f"{cfg.get('checkpoint_format', 'full')} ones: pass checkpoint_format={other} to resume them")
        state = self._find_checkpoint() if cfg.get("resume_from_checkpoint", False) else None
        if state is None and (list((self.out / "recipe_state").glob("step_*.pt")) or
                              sharded_checkpoint.checkpoint_dirs(self.out / "checkpoints")):
            raise ConfigError(f"output_dir: {self.out} holds checkpoints of an earlier run: pass resume_from_checkpoint=True "
                              "to continue it, or choose another output_dir")
        runtime_gib = proc_status_gib("VmRSS")   # the process before any model: python, torch, tokenizer, data
        # a sharded checkpoint holds the weights too: the models are built as in a fresh run, then filled from it
        self._setup_models(cfg, None if self.sharded else state)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, trainable)
        warmup = cfg.get("num_warmup_steps")          # as sapo.py: --warmup-steps, else --warmup-ratio of the steps
        if warmup is None:
            warmup = int(cfg.get("warmup_ratio", 0.0) * self.max_steps)
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_schedule, int(warmup), self.max_steps)
        self.buffer = sapo.ReplayBuffer(int(cfg.buffer_capacity), cfg.buffer_sampling)
        self.stream = PromptStream(len(self.examples), self.seed)
        resumed = state is not None
        if resumed:
            self._load_recipe_state(state)
        del state   # (mmapped: unmapped here, the optimizer holds copies of its own pieces)
        release_host_memory()
        # metrics.jsonl and samples.jsonl as sapo.py writes them: lines after the step resumed from are dropped (all
        # of them in a fresh run)
        self.samples_path = self.out / "samples.jsonl"
        self.metrics_log, self.n_samples = None, 0
        if self.is_rank_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics_log = MetricsLog(self.out, self.step)
            self.n_samples = trim_jsonl(self.samples_path, self.step)
        # one packed segment per tuple (x and the shared prefix once) where the model honours the mask / input_pos
        tol = 1e-4 if self.compute_dtype == torch.float32 else 5e-2
        for model in [self.policy] + ([self.ref] if cfg.method == "sapo-dpo" and not self.lora else []):
            with self._autocast():
                torchtune_packing_ok(model, self.device, tol, enabled=cfg.get("shared_prefix", True))
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
        disable_torchtune_dropout(model)
        enable_position_selection(model)
        model.tok_embeddings.padding_idx = hf_padding_idx(self.cfg.checkpointer.checkpoint_dir)
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
        """The newest complete checkpoint: recipe_state/step_N.pt (written last, atomically, so N's weights are
        complete), or with checkpoint_format sharded the newest checkpoints/step_N/ that verifies against its
        manifest ({"sharded": its path}; scale/sharded_checkpoint.py)."""
        if self.sharded:
            path = sharded_checkpoint.latest(self.out / "checkpoints", self.device,
                                             say=lambda line: utils.log_rank_zero(log, line))
            if path is None:
                utils.log_rank_zero(log, f"resume_from_checkpoint: no complete checkpoint in {self.out / 'checkpoints'}; "
                                         "starting fresh")
                return None
            utils.log_rank_zero(log, f"resuming from {path}")
            return {"sharded": path}
        states = sorted((self.out / "recipe_state").glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        if not states:
            utils.log_rank_zero(log, f"resume_from_checkpoint: nothing in {self.out / 'recipe_state'}; starting fresh")
            return None
        utils.log_rank_zero(log, f"resuming from {states[-1]}")
        # mmap: the optimizer state (4-8 bytes per parameter, 30-60 GiB at 8B) stays in the file (page cache, shared
        # by the processes of a node); each process copies the slices of its own shards when the optimizer is
        # filled, after the models are built (load_full_optimizer_state_dict), and the mapping goes with `state`
        # at the end of setup. weights_only: never unpickles arbitrary objects.
        return torch.load(states[-1], map_location="cpu", weights_only=True, mmap=True)

    def _sharded_state(self) -> dict:
        """What a sharded checkpoint holds, as this run's live (sharded) state dicts: the policy (LoRA: its
        adapters; the base is the configured checkpoint), the EMA and the reference (LoRA: adapter sets), and the
        optimizer state by parameter name (torch.distributed.checkpoint.state_dict)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        policy = self.policy.state_dict()
        if self.lora:
            policy = {k: v for k, v in policy.items() if "lora" in k or "magnitude" in k}
        state = {"policy": policy, "optimizer": get_optimizer_state_dict(self.policy, self.optimizer)}
        for name, model in (("ema", self.ema), ("ref", self.ref)):
            if model is not None:
                state[name] = model.state_dict()
        return state

    def _load_recipe_state(self, state: dict) -> None:
        if "sharded" in state:
            from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
            path = state["sharded"]
            state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
            if self.lora and state["ref_has_adapters"] and self.ref is None:
                self.ref = self.live.copy()          # filled below
            live = self._sharded_state()
            sharded_checkpoint.load(path, live, self.device)   # each process reads the pieces of its own shards
            set_optimizer_state_dict(self.policy, self.optimizer, live["optimizer"])
        else:
            load_full_optimizer_state_dict(self.optimizer, state["optimizer"])   # nothing refers to the mmapped file after
        if state["seed"] != self.seed:
            utils.log_rank_zero(log, f"seed {self.seed} in the config, {state['seed']} in the checkpoint: using the checkpoint's")
            self.seed = state["seed"]
        self.step, self.skipped = state["step"], state["skipped"]
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.buffer.load_state_dict(state["buffer"])
        self.stream = PromptStream(len(self.examples), self.seed)
        self.stream.load_state_dict(state["stream"])
        version, internal, gauss = state["python_rng"]
        self.rng.setstate((version, tuple(internal), gauss))

    # -- the pieces of a step -----------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.mixed else contextlib.nullcontext()

    def _ema_update(self) -> None:
        """theta_ema <- b*theta_ema + (1-b)*theta (LoRA: adapter weights only): sapo.ema_update, on this
        process's shards in one foreach call (scale.fsdp.local_ema_update)."""
        reshard(self.policy)
        policy = self.live if self.lora else self.policy
        if not local_ema_update(self.ema, policy, self.cfg.ema_decay):
            sapo.ema_update(self.ema, policy, self.cfg.ema_decay)

    def _refresh_reference(self) -> None:
        """pi_ref <- EMA (LoRA: a frozen copy of the EMA adapters on the shared base)."""
        if self.lora:
            self.ref = self.ema.copy()
        else:
            sapo.copy_weights(self.ref, self.ema)

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
            return torchtune_preference_logps(self.ref, batch, self.pad_id, self.device)[:2]
        ctx = disable_adapter(self.policy) if self.ref is None else swapped_in(self.live, self.ref)
        with ctx:
            return torchtune_preference_logps(self.policy, batch, self.pad_id, self.device)[:2]

    def _make_negatives(self, fresh: list[sapo.Example]) -> list[sapo.PreferenceTuple]:
        """sapo.make_negatives across processes for a step's micro-batches (B*W rows each, in order): every process
        draws the truncation points of all rows from the same rng and splices all tuples; the generate it is given
        writes this process's rows of each micro-batch and all-gathers the others'. generate_rows_per_call (per
        process) splits the step into several calls, whole micro-batches each, to bound the KV cache."""
        cfg = self.cfg
        gather_weights = self.shard and cfg.get("gather_generator_weights", True)
        per_call = cfg.get("generate_rows_per_call") or self.B * self.grad_accum
        micro_per_call = max(1, int(per_call) // self.B)
        with self._generator() as generator, self._autocast(), \
                gathered(generator, gather_weights, cfg.get("fsdp_reshard_after_forward", True)):
            return sapo.make_negatives(generator, fresh, cfg.segment_len, cfg.max_length, self.rng, self.pad_id,
                                       self.stop_ids, self.sampling, batch_size=micro_per_call * self.global_batch,
                                       generate=self._generate_across_processes(),
                                       suffix_free=bool(cfg.get("suffix_free", False)))

    def _decode_options(self, model) -> dict:
        """compile_decode: the decoding step compiled once per generator model (compiled_decode_step, with the
        config's compile_backend), the KV cache max_length long at every call so that its shapes never change."""
        if not self.cfg.get("compile_decode", False):
            return {}
        if id(model) not in self.decode_steps:
            self.decode_steps[id(model)] = compiled_decode_step(model, str(self.cfg.get("compile_backend", "inductor")))
        return {"decode_step": self.decode_steps[id(model)], "cache_len": int(self.cfg.max_length)}

    def _generate_across_processes(self):
        """sapo.make_negatives' `generate` on W processes, called with whole micro-batches of B*W rows: process r
        decodes rows r*B .. r*B+B-1 of each (torchtune_generate, each row's noise seeded by row_seed from its
        micro-batch and row), then every process gets every segment, in row order."""
        per_micro, B, done = self.global_batch, self.B, [0]   # done: micro-batches written by earlier calls

        def generate(model, contexts, max_new_tokens, pad_id, stop_ids, sampling):
            n_micro = len(contexts) // per_micro
            mine = [m * per_micro + self.rank * B + j for m in range(n_micro) for j in range(B)]
            n_steps = max(max_new_tokens)            # the same on every process: all of them decode as long
            cache_dtype = self.compute_dtype if self.mixed else next(model.parameters()).dtype
            seeds = [row_seed(self.seed, self.step, done[0] + i // per_micro, i % per_micro) for i in mine]
            done[0] += n_micro
            segments = torchtune_generate(model, [contexts[i] for i in mine], [max_new_tokens[i] for i in mine],
                                          pad_id, stop_ids, sampling, seeds, n_steps, cache_dtype, self.device,
                                          **self._decode_options(model))
            if self.world_size == 1:
                return segments
            padded = torch.full((len(mine), n_steps), -1, dtype=torch.long, device=self.device)
            for i, s in enumerate(segments):
                padded[i, : len(s)] = torch.tensor(s)
            parts = [torch.empty_like(padded) for _ in range(self.world_size)]
            dist.all_gather(parts, padded)
            rows = [None] * len(contexts)
            for r, part in enumerate(parts):            # process r's k-th row: micro-batch k // B, row r*B + k % B
                for k, row in enumerate(part.tolist()):
                    rows[(k // B) * per_micro + r * B + k % B] = [t for t in row if t >= 0]
            return rows
        return generate

    def _loss(self, batch: list[dict]) -> tuple[torch.Tensor, dict]:
        """The method's loss on this process's rows through sapo.preference_loss (sapo.py's own: DPO with
        rpo_alpha's NLL term and dpop_lambda's DPOP penalty, or ORPO), and its TRL-named metrics (means over these
        rows; averaged over processes by the caller, which equals the mean over the global batch)."""
        cfg = self.cfg
        # Reference first: LoRA swaps adapter values in place, which must not happen inside autograd. And in its
        # own autocast region: autocast caches the bf16 casts of fp32 weights until the region ends, so a shared
        # region would hand the policy forward the reference's adapter values.
        if self.method.loss == "dpo":
            with self._autocast():
                ref_pos, ref_neg = self._reference_logps(batch)
        with self._autocast():
            pi_pos, pi_neg, n_pos, n_neg = torchtune_preference_logps(self.policy, batch, self.pad_id, self.device)
        nll = None
        if self.method.loss == "orpo" or float(cfg.get("rpo_alpha", 0.0)) > 0:
            # NLL(y+) as a token mean over the *global* batch: scaled by W here, averaged over W by FSDP
            n_all = n_pos.sum().float()
            if self.world_size > 1:
                dist.all_reduce(n_all)
            nll = -pi_pos.sum() * self.world_size / n_all
        refs = (ref_pos, ref_neg) if self.method.loss == "dpo" else (None, None)
        return sapo.preference_loss(self.method.loss, pi_pos, pi_neg, n_pos, n_neg, *refs, beta=float(cfg.beta),
                                    orpo_lambda=float(cfg.orpo_lambda), rpo_alpha=float(cfg.get("rpo_alpha", 0.0)),
                                    dpop_lambda=float(cfg.get("dpop_lambda", 0.0)), nll=nll)

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
        max_norm = float(cfg.get("clip_grad_norm") or 0)   # 0: no clipping
        save_every = int(cfg.get("save_every_n_steps") or 0)
        mine = slice(self.rank * self.B, (self.rank + 1) * self.B)
        release_host_memory()      # what loading (a resumed checkpoint) freed
        reset_peak_rss()           # memory/peak_rss_gib: the training peak, setup excluded
        # SIGTERM / SIGINT: finish this optimizer step, checkpoint, exit 143 / 130 (a second one: at once)
        with StopSignals(phase="training") as stop:
            while self.step < self.max_steps:
                self._step(trainable, max_norm, save_every, mine)
                signum = int(self._agreed(stop.signum or 0, dist.ReduceOp.MAX))   # all stop after the same step
                if signum:
                    if not self._saved_at == self.step:
                        self.save_checkpoint(self.step)
                    where = self.out / "checkpoints" / f"step_{self.step}" if self.sharded else \
                        self.out / "recipe_state" / f"step_{self.step}.pt"
                    message = (f"stopped by {signal.Signals(signum).name} after step {self.step}: checkpoint "
                               f"{where}; resume with the same command "
                               f"plus resume_from_checkpoint=True; exit status {128 + signum}")
                    if self.is_rank_zero:
                        print(message, flush=True)
                    raise Stopped(signum, message)

    def _step(self, trainable, max_norm: float, save_every: int, mine: slice) -> None:
        """One optimizer step: EMA update, reference refresh, negatives, loss, backward, optimizer, log, checkpoint."""
        cfg = self.cfg
        t0 = time.perf_counter()
        # (1) EMA update, before this step's gradient update
        self._ema_update()
        # (1b) SAPO-DPO: every ref_every completed optimizer steps, reference <- EMA, right after this step's EMA
        # update and before its loss (the authors' moving_average)
        if sapo.refresh_due(self.method, self.step, self.ref_every):
            self._refresh_reference()
        # (2) self-augmented negatives for the step's fresh prompts, written by the EMA model: all micro-batches
        # in one generate call (sapo.py's order: every truncation point, then the buffer samples)
        fresh = [self.examples[i] for _ in range(self.grad_accum) for i in self.stream.next(self.global_batch)]
        tg = time.perf_counter()
        fresh_tuples = self._make_negatives(fresh)
        if self.device.type == "cpu":
            release_host_memory()
        gen_time = time.perf_counter() - tg
        gen_tokens = sum(t["segment_len"] for t in fresh_tuples)
        accum = []
        for micro in range(self.grad_accum):
            tuples = fresh_tuples[micro * self.global_batch: (micro + 1) * self.global_batch]
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
            if self.is_rank_zero:
                room = cfg.get("num_samples", 8) - self.n_samples
                self.n_samples += append_samples(self.samples_path, _Decoder(self.tokenizer), tuples, self.step + 1,
                                                 room)
        # (5) the optimizer step; a NaN/inf loss or gradient skips it (sapo.py's --on-nonfinite), on every
        # process alike: the gradient norm and the averaged loss are the same everywhere
        metrics = self._mean_over_processes({k: sum(m[k] for m in accum) / len(accum) for k in accum[0]})
        grad_norm, skipped = guarded_step(self.optimizer, trainable, max_norm, [metrics["loss"]],
                                          cfg.get("on_nonfinite", "skip"), self.step)
        self.skipped += skipped   # a skipped step leaves the weights as they were, and still counts
        # freed now, not at the next step's start: no gradients are alive while the checkpoint is gathered, nor
        # during the next EMA update, generation and reference forward (scale/memory.py counts them only from
        # the first backward to the optimizer step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu":
            release_host_memory()
        self.scheduler.step()
        self.step += 1
        metrics.update({"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "nonfinite/skipped": self.skipped,
                        "buffer/size": len(self.buffer), "gen/tokens_per_s": gen_tokens / max(gen_time, 1e-9),
                        "time/step_s": time.perf_counter() - t0})
        if self.device.type == "cuda":   # to check scale/README.md's memory plan on real hardware
            metrics["memory/peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            # reserved - allocated: what the caching allocator holds besides (fragmentation, cached blocks)
            metrics["memory/peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        # host memory, the largest over processes: peak since setup ended, and (first step) setup's peak and the
        # runtime before any model (what scale/memory.py checks itself against on CPU)
        metrics["memory/peak_rss_gib"] = self._agreed(peak_rss_gib(), dist.ReduceOp.MAX)
        metrics["shape/max_tokens"], metrics["shape/max_response"] = self.max_shape   # |x| + |y+|, max(|y+|, |y-|) so far
        if self.setup_memory:
            metrics.update({k: self._agreed(v, dist.ReduceOp.MAX) for k, v in self.setup_memory.items()})
            self.setup_memory = {}
        if self.is_rank_zero:
            self.metrics_log.write(metrics, echo=log.info if self.step % cfg.get("log_every_n_steps", 1) == 0 else None)
            if self.metric_logger is not None:
                self.metric_logger.log_dict({k: v for k, v in metrics.items() if k != "step"}, step=self.step)
        if (save_every and self.step % save_every == 0) or self.step == self.max_steps:
            self.save_checkpoint(self.step)
            self._saved_at = self.step
        # from now on a dead or hung peer ends the job within a few steps' time, not dist_timeout_minutes
        self.longest_step_s = max(self.longest_step_s, metrics["time/step_s"])
        self._training_timeout()

    def _training_timeout(self) -> None:
        set_collective_timeout(step_timeout_minutes(float(self.cfg.get("step_timeout_minutes", 5)),
                                                    self.longest_step_s))

    def _agreed(self, value: float, op) -> float:
        """value all-reduced with op (MAX, SUM) over processes: scale.fsdp.all_processes."""
        return all_processes(float(value), self.device, op)

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
        # the others wait at the barrier below while process 0 writes: the setup's long timeout
        set_collective_timeout(float(self.cfg.get("dist_timeout_minutes", 60)))
        if self.sharded:
            self._save_sharded(step)
            return
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
                sd = {n: full_tensor(p).detach().cpu() for n, p in weights.named().items()}
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
            state = {**self._trainer_state(step), "optimizer": opt}
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
        if self.longest_step_s:
            self._training_timeout()

    def _trainer_state(self, step: int) -> dict:
        """What every process holds alike, for the checkpoint (the optimizer state aside)."""
        version, internal, gauss = self.rng.getstate()
        return {"step": step, "skipped": self.skipped, "seed": self.seed, "lr_scheduler": self.scheduler.state_dict(),
                "buffer": self.buffer.state_dict(), "stream": self.stream.state_dict(),
                "python_rng": [version, list(internal), gauss], "ref_has_adapters": self.ref is not None}

    def _save_sharded(self, step: int) -> None:
        """checkpoint_format sharded: output_dir/checkpoints/step_<step>/, each process writing its own shards of the
        policy, EMA, reference and optimizer state (scale/sharded_checkpoint.py: atomic, with a manifest of hashes;
        no full state dict is gathered anywhere). No transformers folders: export the policy from the last one."""
        path = sharded_checkpoint.save(self.out / "checkpoints", step, self._sharded_state(), self._trainer_state(step),
                                       self.device, int(self.cfg.get("keep_last_n_checkpoints", 1)))
        utils.log_rank_zero(log, f"checkpoint: step {step} in {path} (sharded: a part from each of "
                                 f"{self.world_size} process{'es' if self.world_size > 1 else ''})")
        release_host_memory()
        if self.longest_step_s:
            self._training_timeout()

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
        if self.metrics_log is not None:
            self.metrics_log.close()
        dist.destroy_process_group()



@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """SAPO (Self-Augmented Preference Optimization) with torchtune. See scale/configs/*.yaml."""
    try:
        check_recipe_config(cfg)
    except ConfigError as e:   # before any process group: one line, no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    # segments that grow instead of fixed blocks: the allocator's fragmentation stays small as the lengths of
    # rows and KV caches change from step to step (set before CUDA starts; a user's own setting wins)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    init_distributed(cfg)
    if cfg.get("fsdp_cpu_offload", False):
        training.set_torch_num_threads()
    config.log_config(recipe_name="SAPORecipe", cfg=cfg)
    recipe = None
    try:
        recipe = SAPORecipe(cfg)
        recipe.setup(cfg)
        recipe.train()
    except (ConfigError, UserError) as e:   # found while loading (data, checkpoint shapes): one line, no traceback
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        dist.destroy_process_group()
        sys.exit(2)
    except Stopped as e:
        recipe.cleanup()
        sys.exit(128 + e.signum)
    except RuntimeError as e:
        if not peer_lost(e):
            raise
        # another process died or hangs: say so in one line and leave at once (destroying the process group
        # would wait on the lost peer); the last checkpoint is intact, so the job resumes from it
        print(f"error: rank {dist.get_rank()}: a collective failed, another process of the job died or stopped "
              f"answering ({str(e).splitlines()[0][-160:]}); resume from the last checkpoint", file=sys.stderr,
              flush=True)
        os._exit(1)
    recipe.cleanup()


def peer_lost(error: BaseException) -> bool:
    """Is this the error a collective raises when a peer is gone: gloo's closed connection or timeout, NCCL's
    watchdog timeout or remote error?"""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Timed out waiting", "Connection reset by peer",
                            "NCCL communicator was aborted", "Watchdog caught collective operation timeout"))


if __name__ == "__main__":
    sys.exit(recipe_main())
