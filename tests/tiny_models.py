"""Tiny random causal LMs of many architectures, saved as real transformers folders, built offline.

Each is hidden 32, 2 layers, with the conftest byte-level BPE tokenizer (vocab ~400), and every dropout-like rate
the architecture's config has set > 0, so that sapo's dropout switch-off is exercised. With chat=True the tokenizer
carries the ChatML template (like instruct models); without, it has no template and no pad token (like base models).
"""
import random
from pathlib import Path

import torch

from conftest import CHATML, _tokenizer

DROP = 0.1


def _configs(V, bos, eos, pad):
    """name -> (config class name, model class name, config kwargs). Only rates the config actually has are set."""
    ids = dict(vocab_size=V, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attention_dropout=DROP, **ids)
    return {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=DROP,
                                                        embd_pdrop=DROP, attn_pdrop=DROP, **ids)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                                intermediate_size=64, max_position_embeddings=256,
                                                                attention_dropout=DROP, hidden_dropout=DROP, **ids)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                                                    max_position_embeddings=256, word_embed_proj_dim=32, dropout=DROP,
                                                    attention_dropout=DROP, activation_dropout=DROP, layerdrop=DROP, **ids)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(llama_like, tie_word_embeddings=False)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(llama_like, sliding_window=None)),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(llama_like)),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(llama_like, head_dim=8)),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(llama_like, head_dim=8)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(llama_like, head_dim=8, final_logit_softcapping=30.0,
                                                              attn_logit_softcapping=50.0, sliding_window=16)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(llama_like, resid_pdrop=DROP, embd_pdrop=DROP,
                                                       original_max_position_embeddings=256)),
        "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(llama_like)),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(llama_like, hidden_dropout=DROP)),
        "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                             hidden_dropout=DROP, attention_dropout=DROP,
                                                             new_decoder_architecture=False, multi_query=True, **ids)),
        "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256, rotary_dim=4,
                                                       resid_pdrop=DROP, embd_pdrop=DROP, attn_pdrop=DROP, **ids)),
        "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4, hidden_dropout=DROP,
                                                          attention_dropout=DROP, **ids)),
        "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=256, resid_pdrop=DROP,
                                                    embd_pdrop=DROP, attention_dropout=DROP, **ids)),
    }


ARCHITECTURES = ("gpt2", "gpt_neox", "opt", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo",
                 "stablelm", "falcon", "gptj", "bloom", "phi")


def make_tiny(arch: str, path: Path, chat: bool = False, seed: int = 0, **overrides) -> Path:
    """save_pretrained a tiny random `arch` model and its tokenizer into path; overrides go into its config."""
    import torch
    import transformers
    if chat:
        tok = _tokenizer(["<|im_start|>", "<|im_end|>"], CHATML, pad="<|im_end|>")
    else:
        tok = _tokenizer(["<|endoftext|>"])
    cfg_name, model_name, kw = _configs(len(tok), tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
                                        tok.eos_token_id, tok.pad_token_id)[arch]
    config = getattr(transformers, cfg_name)(**{**kw, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# (architecture, chat template?): instruct-style families with ChatML, base-style ones without; a few both ways
CASES = [("gpt2", False), ("gpt2", True), ("gpt_neox", False), ("opt", False), ("llama", True), ("llama", False),
         ("mistral", True), ("qwen2", True), ("qwen2", False), ("qwen3", True), ("gemma", True), ("gemma2", True),
         ("phi3", True), ("olmo", False), ("stablelm", False), ("falcon", False), ("gptj", False), ("bloom", False),
         ("phi", False)]
IDS = [f"{a}-{'chat' if c else 'plain'}" for a, c in CASES]
SOFT_CAPPED = {"gemma2"}       # final_logit_softcapping set: lm_head(body(x)) is not the model's logits
assert {a for a, _ in CASES} == set(ARCHITECTURES)


def load(path):
    """The model as train() holds it (loaded, dropout switched off: sapo_utils.models.disable_dropout), and its
    tokenizer."""
    import sapo_utils.models
    model = sapo_utils.models.load_model(str(path))
    sapo_utils.models.disable_dropout(model)
    return model, sapo_utils.models.load_tokenizer(str(path))


def hand_tuples(V, eos, seed=0):
    """(x, y+, y-) tuples: a SAPO splice with suffix, an EOS-ended negative, y- = y+, no shared response token, and a
    short one that shares a packed row with the y- = y+ tuple."""
    rng = random.Random(seed)
    r = lambda n: [rng.randrange(3, V) for _ in range(n)]  # noqa: E731
    y = r(8) + [eos]
    return [{"prompt_ids": r(5), "chosen_ids": y, "rejected_ids": y[:3] + r(3) + y[6:]},
            {"prompt_ids": r(3), "chosen_ids": y, "rejected_ids": y[:2] + r(2) + [eos]},
            {"prompt_ids": r(4), "chosen_ids": y, "rejected_ids": list(y)},
            {"prompt_ids": r(2), "chosen_ids": r(4) + [eos], "rejected_ids": r(7) + [eos]},
            {"prompt_ids": r(2), "chosen_ids": [3, eos], "rejected_ids": [4, 5]}]


def full_logits_logp(model, x, y):
    """The plain computation: one unpadded row, the model's own logits, log_softmax, sum over y."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([x + y])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[len(x) - 1 + j, y[j]].item() for j in range(len(y)))




def paths(model) -> tuple[bool, bool]:
    """(head-only logits?, packed shared-prefix rows?): the speed-ups this model passes the checks for."""
    import sapo
    import sapo_fast
    return sapo_fast.head_only_ok(model), sapo_fast.packing_ok(model, sapo.preference_logps)
