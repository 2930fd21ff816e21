"""Segment generation: the sampler draws from transformers' distribution (temperature, top-k, top-p, ties), seeded
runs repeat, greedy decoding is transformers' own, and the generator's bf16 copy follows the weights it copies,
on every architecture of the matrix."""
import copy
import random

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import sapo
import sapo_io
from tiny_models import ARCHITECTURES, make_tiny

SETTINGS = [(0.7, 50, 0.95), (1.0, 0, 0.9), (0.5, 5, 1.0), (1.3, 10, 0.5), (0.7, 1, 0.95), (2.0, 3, 0.3)]


def transformers_probs(scores, temperature, top_k, top_p):
    """What generate(do_sample=True) draws from: its warpers in its order, then softmax."""
    x = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.softmax(-1)


def empirical(scores, n, temperature, top_k, top_p, seed=0):
    """Token frequencies of n draws by TopKTopPSampler from each row of scores (B, V)."""
    sampler = sapo_io.TopKTopPSampler(temperature, top_k, top_p)
    torch.manual_seed(seed)
    rows = scores.repeat_interleave(n, 0)
    out = sampler(None, rows.clone())
    assert ((out == 0).sum(-1) == 1).all() and ((out == 0) | (out == float("-inf"))).all()   # one pick per row
    picks = out.argmax(-1).view(scores.shape[0], n)
    return torch.stack([torch.bincount(p, minlength=scores.shape[1]) for p in picks]).double() / n


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_sampler_draws_from_transformers_distribution(temperature, top_k, top_p):
    """Draws land only where transformers' warpers keep mass, and their frequencies match its probabilities. Which
    of several tied tokens top-p drops is its sort's choice, so rows with ties compare the sorted probabilities."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 40, generator=g) * 2
    scores[1, [4, 9, 17]] = scores[1].max() + 1.0          # a three-way tie at the top
    scores[2, :12] = 0.5                                   # a wide tie, straddling the k-th value for small k
    want = transformers_probs(scores, temperature, top_k, top_p)
    got = empirical(scores, 20000, temperature, top_k, top_p)
    assert ((got[0] > 0) <= (want[0] > 0)).all(), "a draw outside transformers' kept set"
    assert ((got > 0).sum(-1) <= (want > 0).sum(-1)).all()
    assert (got[0] - want[0]).abs().max() < 0.015
    assert (got.sort(-1).values - want.sort(-1).values).abs().max() < 0.015
    # the total-variation distance is what a wrong top-p boundary or temperature would move
    assert 0.5 * (got[0] - want[0]).abs().sum() < 0.03


def test_sampler_keeps_ties_at_the_kth_value():
    """transformers' top-k keeps every token equal to the k-th value: with 6 equal top logits and k = 2, all 6
    get drawn."""
    scores = torch.full((1, 30), -3.0)
    scores[0, 10:16] = 2.0
    got = empirical(scores, 6000, 1.0, 2, 1.0)
    assert (got[0, 10:16] > 0.12).all() and got[0, :10].sum() == 0 and got[0, 16:].sum() == 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = make_tiny("llama", tmp_path_factory.mktemp("llama_gen"), chat=True)
    model = sapo.load_model(str(path)).eval()
    return model, sapo.load_tokenizer(str(path))


def contexts(V, n=3, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, V) for _ in range(rng.randrange(3, 9))] for _ in range(n)]


def test_sampling_is_seeded(llama):
    model, tok = llama
    ctx, stop = contexts(model.config.vocab_size), sapo.stop_token_ids(model, tok)

    def run(seed, **kw):
        torch.manual_seed(seed)
        return sapo.generate_segments(model, ctx, [8, 8, 8], tok.pad_token_id, stop, temperature=1.5, **kw)
    assert run(0) == run(0) and run(0) != run(1)
    assert run(0, dtype=torch.bfloat16) == run(0, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_greedy_is_transformers_generate(llama, dtype):
    model, tok = llama
    ctx, stop = contexts(model.config.vocab_size, seed=3), sapo.stop_token_ids(model, tok)
    ours = sapo.generate_segments(model, ctx, [6, 6, 6], tok.pad_token_id, stop, do_sample=False, dtype=dtype)
    for c, o in zip(ctx, ours):      # one unpadded row at a time: no padding involved on their side
        out = model.generate(torch.tensor([c]), do_sample=False, max_new_tokens=6, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)[0, len(c):].tolist()
        cut = next((i + 1 for i, t in enumerate(out) if t in stop), len(out))
        assert o[:cut] == out[:cut]


def test_generation_copy_follows_the_weights(llama):
    """A bf16 copy of the parameters (buffers untouched), made once per model and refreshed at every call; the
    original stays fp32 and untouched; asking for its own dtype returns the model itself."""
    model, _ = llama
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = sapo_io.generation_copy(model, torch.bfloat16)
    assert twin is not model and sapo_io.generation_copy(model, torch.float32) is model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in twin.parameters())
    assert all(b.dtype == b0.dtype for b, b0 in zip(twin.buffers(), model.buffers()))
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(q, p.to(torch.bfloat16)), n
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    again = sapo_io.generation_copy(model, torch.bfloat16)
    assert again is twin                                                         # kept, not rebuilt
    assert all(torch.equal(q, p.to(torch.bfloat16)) for p, q in zip(model.parameters(), again.parameters()))
    assert all(v.dtype == before[k].dtype for k, v in model.state_dict().items())
    other = copy.deepcopy(model)
    assert sapo_io.generation_copy(other, torch.bfloat16) is not twin          # one copy, for the last model asked


def test_generation_dtype_choice():
    cpu = torch.device("cpu")
    assert sapo_io.generation_dtype("fp32", "bf16-mixed", cpu) is torch.float32
    assert sapo_io.generation_dtype("bf16", "fp32", cpu) is torch.bfloat16
    assert sapo_io.generation_dtype("auto", "bf16-mixed", cpu) is torch.bfloat16
    native = sapo_io.native_bf16(cpu)
    assert sapo_io.generation_dtype("auto", "fp32", cpu) is (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_bf16_copy_generates_on_every_architecture(arch, tmp_path):
    """Sampled segments from each architecture's bf16 copy: valid token ids, stopped at EOS, the fp32 model
    untouched; and the copy's greedy tokens are those of the fp32 model's own bf16 twin built by hand."""
    path = make_tiny(arch, tmp_path / arch, chat=False)
    model, tok = sapo.load_model(str(path)).eval(), sapo.load_tokenizer(str(path))
    V, stop = model.config.vocab_size, sapo.stop_token_ids(model, tok)
    ctx = contexts(V, seed=5)
    torch.manual_seed(0)
    segs = sapo.generate_segments(model, ctx, [5, 7, 3], tok.pad_token_id, stop, dtype=torch.bfloat16)
    assert all(len(s) <= n for s, n in zip(segs, [5, 7, 3])) and all(0 <= t < V for s in segs for t in s)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    hand = copy.deepcopy(model)
    for p in hand.parameters():
        p.data = p.data.to(torch.bfloat16)
    greedy = sapo.generate_segments(model, ctx, [5, 5, 5], tok.pad_token_id, stop, do_sample=False,
                                    dtype=torch.bfloat16)
    assert greedy == sapo.generate_segments(hand, ctx, [5, 5, 5], tok.pad_token_id, stop, do_sample=False)
