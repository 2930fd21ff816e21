"""Shared fixtures: tiny random models saved as real transformers folders, built offline.

tiny_llama_dir: a 2-layer Llama with a ChatML chat template (like SmolLM2 / most instruct models).
tiny_gpt2_dir:  a 2-layer GPT-2 with no chat template and no pad token (like `gpt2`).
Both use a byte-level BPE tokenizer trained here on a few sentences, so nothing is downloaded.
"""
import json
import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property-based tests draw the same examples on every run, so a red CI run is reproducible (hypothesis's default
# is a new random seed per run). SAPO_HYPOTHESIS=dev explores new examples locally.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", derandomize=False)
settings.load_profile(os.environ.get("SAPO_HYPOTHESIS", "ci"))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "The water cycle moves water between the sea, the air and the land.",
    "Tea is brewed by pouring hot water over leaves and waiting a few minutes.",
    "A magnet has a north pole and a south pole. Answer in lowercase letters only.",
    "Write a short explanation with exactly three bullet points and no commas.",
    "User: what is the capital of France? Assistant: The capital of France is Paris.",
    "JSON output: {\"topic\": \"tea\", \"answer\": \"brew it hot\"} 0123456789 - * ? ! .",
]


def _tokenizer(special, chat_template=None, pad=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=special[-1], pad_token=pad,
                                  bos_token=special[0] if len(special) > 1 else None)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def make_tiny_llama(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = _tokenizer(["<|im_start|>", "<|im_end|>"], CHATML, pad="<|im_end|>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    tok = _tokenizer(["<|endoftext|>"])
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def small_jsonl(tmp_path):
    """24 plain {prompt, chosen} rows."""
    rows = [{"prompt": f"Explain tea number {i}.", "chosen": f"Tea {i} is brewed by pouring hot water over leaves. "
             "Wait a few minutes and drink it."} for i in range(24)]
    return write_jsonl(tmp_path / "small.jsonl", rows)


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory):
    """arch_dirs(arch, chat) -> a tiny model folder of that architecture, built once per session."""
    from tiny_models import make_tiny
    made = {}

    def get(arch, chat):
        if (arch, chat) not in made:
            folder = tmp_path_factory.mktemp(f"{arch}_{'chat' if chat else 'plain'}")
            made[arch, chat] = make_tiny(arch, folder, chat)
        return made[arch, chat]
    return get
