"""Tiny random causal LMs of many architectures, saved as real transformers folders, built offline.

Each is hidden 32, 2 layers, with the conftest byte-level BPE tokenizer (vocab ~400), and every dropout-like rate
the architecture's config has set > 0, so that sapo's dropout switch-off is exercised. With chat=True the tokenizer
carries the ChatML template (like instruct models); without, it has no template and no pad token (like base models).
"""
from pathlib import Path

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
