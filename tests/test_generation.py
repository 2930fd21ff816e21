"""Segment generation, the plain path: seeded runs repeat, greedy decoding is transformers' own generate, and
make_negatives splices segments in. (The faster sampler and the bf16 generator copy: test_speedups.py.)"""
import random

import pytest
import torch

import sapo
from sapo_utils.evaluation import GREEDY
import sapo_utils.models
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_tiny("llama", tmp_path_factory.mktemp("llama_gen"), chat=True)
    model = sapo_utils.models.load_model(str(path)).eval()
    return model, sapo_utils.models.load_tokenizer(str(path))


def contexts(V, n=3, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, V) for _ in range(rng.randrange(3, 9))] for _ in range(n)]


@pytest.mark.parametrize("fast", [False, True])
def test_sampling_is_seeded(llama, fast):
    model, tok = llama
    ctx, stop = contexts(model.config.vocab_size), sapo_utils.models.stop_token_ids(model, tok)
    ops = sapo.ops_for(sapo.Config(plain=not fast, generator_dtype="bf16"), torch.device("cpu"))

    def run(seed):
        torch.manual_seed(seed)
        return ops.generate(model, ctx, [8, 8, 8], tok.pad_token_id, stop, sapo.segment_sampling(1.5, 50, 0.95))
    assert run(0) == run(0) and run(0) != run(1)


@pytest.mark.parametrize("fast", [False, True])
def test_greedy_is_transformers_generate(llama, fast):
    model, tok = llama
    ctx, stop = contexts(model.config.vocab_size, seed=3), sapo_utils.models.stop_token_ids(model, tok)
    ops = sapo.ops_for(sapo.Config(plain=not fast, generator_dtype="fp32"), torch.device("cpu"))
    ours = ops.generate(model, ctx, [6, 6, 6], tok.pad_token_id, stop, GREEDY)
    for c, o in zip(ctx, ours):      # one unpadded row at a time: no padding involved on their side
        out = model.generate(torch.tensor([c]), do_sample=False, max_new_tokens=6, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)[0, len(c):].tolist()
        cut = next((i + 1 for i, t in enumerate(out) if t in stop), len(out))
        assert o[:cut] == out[:cut]
