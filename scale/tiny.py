"""A tiny random Llama-3 written as a transformers folder, for scale/configs/tiny_cpu.yaml and the tests.

    python -m scale.tiny /tmp/sapo_tiny        # writes the folder below, offline, in about a second

The folder looks like a Meta-Llama-3 download, shrunk:
    config.json, model.safetensors, generation_config.json   a 2-layer LlamaForCausalLM (transformers)
    tokenizer.json, tokenizer_config.json                     the same tokenizer for transformers, with the
                                                              Llama-3 chat template (so sapo.py reads the folder)
    original/tokenizer.model                                  a tiktoken BPE file (what torchtune's llama3_tokenizer reads)

The tiktoken file holds the 256 single bytes plus BPE merges learned here from a few sentences
(TINY_BASE_VOCAB ranks); the Llama-3 special tokens follow at TINY_BASE_VOCAB... (the real ones sit at
128000+, which would make a tiny model's embedding 128k rows). torchtune learns their ids from tokenizer.json
(`special_tokens_path`). Every shape below is repeated by hand in tiny_cpu.yaml: torchtune's HF checkpointer
reads only head counts and the hidden size from config.json, and a mismatch loads silently (see environment.md).
"""
from __future__ import annotations

import base64
import json
import sys
from collections import Counter
from pathlib import Path

# torchtune's Llama-3 pre-tokenizer pattern (torchtune.models.llama3._tokenizer.CL100K_PATTERN)
PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

TINY_BASE_VOCAB = 310            # 256 bytes + 54 merges
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"]
TINY_VOCAB = TINY_BASE_VOCAB + len(SPECIAL_TOKENS)   # 322: tiny_cpu.yaml's model.vocab_size
TINY_MODEL = dict(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
                  max_seq_len=512, rope_base=500_000, norm_eps=1e-5)   # = tiny_cpu.yaml's model section
# A mid-size random Llama-3 (231 M parameters: 12 layers of 13.6 M, a 32768 x 1024 embedding and output layer)
# for host-memory measurements (scale/measure_memory.py): the same tokenizer; token ids >= 322 are never used
MID_VOCAB = 32768
MID_MODEL = dict(num_layers=12, num_heads=16, num_kv_heads=4, embed_dim=1024, intermediate_dim=3584,
                 max_seq_len=512, rope_base=500_000, norm_eps=1e-5)
# 4 of those layers and the tiny vocabulary: 55 M parameters, what the tests measure in a few minutes
SMALL_MODEL = {**MID_MODEL, "num_layers": 4}
SHAPES = {"tiny": (TINY_MODEL, TINY_VOCAB), "small": (SMALL_MODEL, TINY_VOCAB), "mid": (MID_MODEL, MID_VOCAB)}

# Meta's Llama-3 chat format, as transformers' template (what tokenize_messages of torchtune's Llama3Tokenizer writes)
LLAMA3_CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CORPUS = [
    "The water cycle moves water between the sea, the air and the land.",
    "Tea is brewed by pouring hot water over leaves and waiting a few minutes.",
    "Write a short explanation with exactly three bullet points and no commas.",
    "Answer in lowercase letters only. Never write the word that the user forbids.",
    "User: what is the capital of France? Assistant: The capital of France is Paris.",
    "Briefly explain how thunderstorms form, and end your answer with a question.",
]


def train_bpe(texts: list[str], n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE ranks (tiktoken's format): the 256 bytes, then the most frequent adjacent pair,
    merged, n_merges times. Ties break on the pair's bytes, so the result is deterministic."""
    import regex
    words = Counter(tuple(bytes([b]) for b in w.encode()) for t in texts for w in regex.findall(PATTERN, t))
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    """tiktoken's file format: one 'base64(token bytes) rank' line per token."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])))
    return path


def make_tiny_llama3(out, seed: int = 0, initializer_range: float = 0.1, model: dict | None = None,
                     vocab_size: int = TINY_VOCAB, tied: bool = False) -> Path:
    """Write the tiny model folder (see the module docstring) and return its path. model / vocab_size: other
    shapes (MID_MODEL, MID_VOCAB) with the same tokenizer. tied: the output layer is the embeddings' weight
    (tie_word_embeddings, as Llama-3.2 1B / 3B; torchtune's llama3_2 builder, model_type LLAMA3_2).

    initializer_range 0.1 (transformers' default is 0.02) gives logits a spread of about one nat, so greedy
    decoding is far from ties and two implementations of the same model pick the same tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe_file = write_tiktoken(out / "original" / "tokenizer.model", train_bpe(CORPUS, TINY_BASE_VOCAB - 256))
    backend = TikTokenConverter(vocab_file=str(bpe_file), pattern=PATTERN, extra_special_tokens=SPECIAL_TOKENS).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    assert len(tok) == TINY_VOCAB and tok.convert_tokens_to_ids("<|begin_of_text|>") == TINY_BASE_VOCAB
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}

    m = model or TINY_MODEL
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=m["embed_dim"], intermediate_size=m["intermediate_dim"],
                      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                      num_key_value_heads=m["num_kv_heads"], max_position_embeddings=m["max_seq_len"],
                      rope_theta=float(m["rope_base"]), rms_norm_eps=m["norm_eps"], tie_word_embeddings=tied,
                      initializer_range=initializer_range, bos_token_id=ids["<|begin_of_text|>"],
                      # Llama-3-Instruct stops on any of these; torchtune's Llama3Tokenizer.stop_tokens are the same three
                      eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
                      pad_token_id=ids["<|finetune_right_pad_id|>"])
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] != "--mid"):
        sys.exit("usage: python -m scale.tiny OUTPUT_FOLDER [--mid]")
    mid = len(sys.argv) == 3
    folder = make_tiny_llama3(sys.argv[1], model=MID_MODEL if mid else None, vocab_size=MID_VOCAB if mid else TINY_VOCAB,
                              initializer_range=0.02 if mid else 0.1)
    print(json.dumps({"model_dir": str(folder), "vocab_size": MID_VOCAB if mid else TINY_VOCAB}))
