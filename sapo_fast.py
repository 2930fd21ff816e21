"""Speed-ups for sapo.py: each computes what a plain function there computes, in less time or memory.

sapo.py holds the reference path a reader follows: one ordinary forward per sequence, full logits,
`generate(do_sample=True, ...)`. This module holds the faster equals that train uses by default;
`python sapo.py --plain` turns them all off. tests/test_speedups.py proves each equal to its plain
function on every architecture in the test matrix (log-probs, losses and gradients to float
rounding; for the sampler and the bf16 copy, the distribution tokens are drawn from).

  head_logps       = sapo.full_logps_at     the output layer only where a token is scored, in
                                            chunks (chunked_token_logps): less time and memory
  packed_logps     = sapo.preference_logps  one packed segment per (x, y+, y-) tuple: x and the
                                            shared prefix run once, short tuples share rows
  fast_sampling    = generate's sampling    the same distribution, computed over the top-k only
  generator_copy   = the model itself       a bf16 copy of the weights where bf16 is native
  weight_cache     = (nothing)              autocast keeps its bf16 weight copies for a frozen
                                            generator, instead of re-casting them every token
  speedups(plain)  = sapo.Ops()             all of the above, as sapo.ops_for builds them

Every check here reads the model; none writes to its parameters or buffers, so a caller may hold
an autograd graph on the same model across a call. This module never imports sapo.py.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# --- Head-only logits ------------------------------------------------------------------------

# Config fields that put something between the output layer and the logits (soft-capping in
# Gemma 2/3, a logit scale in Cohere and Granite): head(hidden) would not be the logits there.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@torch.no_grad()
def head_only_ok(model) -> bool:
    """Are logits exactly lm_head(base_model(x))? True for GPT-2, Llama, Mistral, Qwen...

    Read from the config where it says so; otherwise tried once per model with the output layer
    swapped for a copy whose weights are 2^10 larger (the model's own weights are never touched):
    large logits make a soft-cap or a scale show. The answer is cached on the model."""
    if hasattr(model, "_sapo_head_only"):
        return model._sapo_head_only
    ok = not any(getattr(model.config, name, None) for name in LOGIT_TRANSFORMS)
    head = model.get_output_embeddings()
    if ok and head is not None and hasattr(model, "set_output_embeddings"):
        scaled = copy.deepcopy(head)
        scaled.weight.mul_(2.0 ** 10)
        device = scaled.weight.device
        ids = torch.arange(1, 9, device=device)[None] % model.config.vocab_size
        was_training = model.training
        model.eval()
        model.set_output_embeddings(scaled)
        try:
            full = model(input_ids=ids).logits.float()
            hidden = model.base_model(input_ids=ids).last_hidden_state
            mine = scaled(hidden).float()
            ok = torch.allclose(full, mine, atol=1e-2, rtol=1e-3)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            ok = False
        finally:
            model.set_output_embeddings(head)
            model.train(was_training)
    else:
        ok = False
    model._sapo_head_only = bool(ok)
    return model._sapo_head_only


# positions whose logits exist at once: at V = 128k a chunk's fp32 logits are 1 GiB
CHUNK_POSITIONS = 2048


def _chunk_logps(project, hidden, targets):
    return -F.cross_entropy(project(hidden).float(), targets, reduction="none")


def chunked_token_logps(project, hidden, targets, chunk_size: int | None = None):
    """= sapo.token_logps(project(hidden), targets): hidden (N, H) -> (N,), chunk_size
    positions at a time, each chunk's logits recomputed in backward (activation
    checkpointing). Less memory: no (N, V) logits for the whole batch are ever alive (at
    V = 128k and 8 responses of 2k tokens, 4 GiB of bf16 logits and twice that in fp32)."""
    chunk_size = chunk_size or CHUNK_POSITIONS
    parts = []
    for i in range(0, len(targets), chunk_size):
        h, t = hidden[i: i + chunk_size], targets[i: i + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_chunk_logps, project, h, t, use_reentrant=False))
        else:
            parts.append(_chunk_logps(project, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0)


def head_logps(model, input_ids, attention_mask, at, targets):
    """= sapo.full_logps_at: token log-probs at the N positions `at` (B, T) marks.

    Faster because the output layer runs on N positions instead of B*T (at V = 49k-128k the
    (B, T, V) logits are most of a forward's memory and much of its time), in chunks."""
    if not head_only_ok(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[at]
        return chunked_token_logps(lambda x: x, logits, targets)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state[at]                               # (N, H)
    return chunked_token_logps(model.get_output_embeddings(), hidden, targets)


# --- Packed shared-prefix log-probs ----------------------------------------------------------

def shared_prefix_len(y_pos: list[int], y_neg: list[int]) -> int:
    """k: how many leading tokens y+ and y- share, capped so each keeps >= 1 token of its own."""
    k = 0
    while k < min(len(y_pos), len(y_neg)) - 1 and y_pos[k] == y_neg[k]:
        k += 1
    return k


def _place(lengths: list[int], pack: bool) -> tuple[list[tuple[int, int]], int, int]:
    """First-fit, longest first: (row, offset) for each segment, the row count, the row length."""
    width = max(lengths)
    places = [None] * len(lengths)
    used = []                                       # used[row] = tokens already in that row
    order = range(len(lengths))
    if pack:
        order = sorted(order, key=lambda i: -lengths[i])
    for i in order:
        row = None
        if pack:
            row = next((r for r, u in enumerate(used) if u + lengths[i] <= width), None)
        if row is None:                             # no row has room: open one
            row = len(used)
            used.append(0)
        places[i] = (row, used[row])
        used[row] += lengths[i]
    return places, len(used), width


def shared_prefix_layout(batch: list[dict], pad_id: int, pack: bool = True) -> dict:
    """The rows a packed forward reads, as CPU tensors.

    Each tuple becomes one segment [x, y+[:k], y+[k:], y-[k:]]: y-'s own tokens sit after y+
    but attend only to the shared part and to themselves, and their positions continue from
    the shared part, so each token sees exactly what it would in its own row. Segments are
    packed first-fit, longest first, into rows as long as the longest (a block-diagonal mask,
    positions restarting per segment).

    Returns ids, pos (rows, T); allow (rows, T, T) bool, True where a token may attend; and per
    scored token (N,): tuple_of, row_of, h_at (the position whose logits predict it), targets,
    is_pos / is_neg (whether it counts for y+ / y-); n_pos, n_neg (B,) token counts."""
    segments = []
    for b in batch:
        x, y_pos, y_neg = b["prompt_ids"], b["chosen_ids"], b["rejected_ids"]
        if not x:
            raise ValueError("an empty prompt: y's first token has no position to be predicted from")
        k = shared_prefix_len(y_pos, y_neg)
        segments.append({"tokens": x + y_pos + y_neg[k:], "prompt": len(x), "shared": len(x) + k,
                         "own_pos": len(y_pos) - k, "own_neg": len(y_neg) - k})
    places, n_rows, width = _place([len(s["tokens"]) for s in segments], pack)
    ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, width), dtype=torch.long)
    allow = torch.eye(width, dtype=torch.bool).repeat(n_rows, 1, 1)  # pads see themselves only
    scored = {"tuple_of": [], "row_of": [], "h_at": [], "targets": [], "is_pos": [], "is_neg": []}
    for i, (seg, (row, start)) in enumerate(zip(segments, places)):
        # offsets within the segment: x and y+[:k] end at `shared`, y+ at `end_pos`, y- at `end`
        prompt, shared, own = seg["prompt"], seg["shared"], seg["own_neg"]
        end_pos = shared + seg["own_pos"]
        end = end_pos + own
        ids[row, start: start + end] = torch.tensor(seg["tokens"])
        pos[row, start: start + end_pos] = torch.arange(end_pos)
        pos[row, start + end_pos: start + end] = torch.arange(shared, shared + own)
        block = torch.zeros(end, end, dtype=torch.bool)
        block[:end_pos, :end_pos] = torch.ones(end_pos, end_pos, dtype=torch.bool).tril()
        block[end_pos:, :shared] = True            # y-'s own tokens see x and the shared prefix
        block[end_pos:, end_pos:] = torch.ones(own, own, dtype=torch.bool).tril()
        allow[row, start: start + end, start: start + end] = block
        # which position's logits predict each scored token: y+ as usual; y-'s first own token
        # is predicted from the last shared position, the rest from their own predecessors
        h_pos = list(range(prompt - 1, end_pos - 1))
        h_neg = [shared - 1] + list(range(end_pos, end - 1))
        tokens = seg["tokens"]
        n_scored = len(h_pos) + len(h_neg)
        scored["h_at"] += [start + h for h in h_pos + h_neg]
        scored["targets"] += tokens[prompt:end_pos] + tokens[end_pos:end]
        scored["tuple_of"] += [i] * n_scored
        scored["row_of"] += [row] * n_scored
        n_shared = shared - prompt                  # y+[:k] counts for both sums
        scored["is_pos"] += [True] * len(h_pos) + [False] * own
        scored["is_neg"] += [True] * n_shared + [False] * seg["own_pos"] + [True] * own
    layout = {name: torch.tensor(values) for name, values in scored.items()}
    layout["is_pos"] = layout["is_pos"].bool()
    layout["is_neg"] = layout["is_neg"].bool()
    layout.update(ids=ids, pos=pos, allow=allow,
                  n_pos=torch.tensor([len(b["chosen_ids"]) for b in batch]),
                  n_neg=torch.tensor([len(b["rejected_ids"]) for b in batch]))
    return layout


def sums_by_tuple(token_logps, layout: dict, batch_size: int):
    """Per-tuple sums of the scored tokens' log-probs: (sum+, sum-), each (B,)."""
    zeros = torch.zeros(batch_size, device=token_logps.device)
    tuple_of = layout["tuple_of"]
    is_pos, is_neg = layout["is_pos"], layout["is_neg"]
    sum_pos = zeros.index_add(0, tuple_of[is_pos], token_logps[is_pos])
    sum_neg = zeros.index_add(0, tuple_of[is_neg], token_logps[is_neg])
    return sum_pos, sum_neg


def packed_logps(model, batch: list[dict], pad_id: int, device, pack: bool = True):
    """= sapo.preference_logps: (sum+, sum-, n+, n-), each (B,), on a transformers model.

    Faster because x and the shared prefix y+[:k] (SAPO: k >= t) go through the model once per
    tuple instead of twice, and short tuples share rows: 0.6-0.7x the tokens of two rows."""
    layout = {k: v.to(device) for k, v in shared_prefix_layout(batch, pad_id, pack).items()}
    kind = torch.device(device).type             # the mask in the dtype attention computes in
    if torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
    else:
        dtype = next(model.parameters()).dtype
    mask = torch.zeros(layout["allow"].shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~layout["allow"], torch.finfo(dtype).min)
    out = model.base_model(input_ids=layout["ids"], attention_mask=mask[:, None],
                           position_ids=layout["pos"])
    hidden = out.last_hidden_state[layout["row_of"], layout["h_at"]]           # (N, H)
    head = model.get_output_embeddings()
    token_logps = chunked_token_logps(head, hidden, layout["targets"])         # (N,)
    sum_pos, sum_neg = sums_by_tuple(token_logps, layout, len(batch))
    return sum_pos, sum_neg, layout["n_pos"], layout["n_neg"]


# The check's tuples: the first y- keeps 3 tokens of its own, so its own positions are scored
# (they must not see y+[k:]); the two short tuples share a packed row (they must not see each
# other, and their positions restart at 0).
PACKING_PROBE = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6, 7], "rejected_ids": [4, 8, 9, 10]},
    {"prompt_ids": [11, 12], "chosen_ids": [13, 14], "rejected_ids": [13, 15]},
    {"prompt_ids": [11, 12], "chosen_ids": [13, 14], "rejected_ids": [13, 15]},
]


def probe_batch(vocab_size: int) -> list[dict]:
    return [{k: [i % vocab_size for i in ids] for k, ids in t.items()} for t in PACKING_PROBE]


# where PACKING_PROBE's first y- keeps its own tokens in the packed layout: row 0 holds the first
# tuple, x (3 tokens) and y+ (4) from position 0, then y-'s 3 own tokens from 7
PROBE_OWN_NEGATIVE = (0, slice(7, 10))


def with_shifted_positions(forward):
    """forward, but with y-'s own positions moved by +3: a model that honours position_ids must
    give other numbers (one that ignores them gives the same numbers, bit for bit)."""
    def shifted(*args, **kwargs):
        kwargs["position_ids"] = kwargs["position_ids"].clone()
        kwargs["position_ids"][PROBE_OWN_NEGATIVE] += 3
        return forward(*args, **kwargs)
    return shifted


def packing_verdict(packed, plain, moved, tol: float = 1e-4) -> bool:
    """packing_ok's rule on PACKING_PROBE's (sum+, sum-): the packed numbers agree with the plain
    two rows to tol, and moving y-'s own positions (moved) changed them."""
    agree = all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
                for a, b in zip(packed, plain))
    return agree and not torch.equal(packed[1], moved[1])


@torch.no_grad()
def packing_ok(model, two_rows, fast_logps=packed_logps) -> bool:
    """May fast_logps stand in for two_rows (the plain function) on this model? Checked once per
    model on PACKING_PROBE: the two agree to 1e-4, and moving y-'s positions changes the packed
    numbers (a model that ignores position_ids would otherwise pass at random initialisation,
    where positions barely matter). Fails for attention kernels that ignore a 4D mask."""
    if hasattr(model, "_sapo_packing"):
        return model._sapo_packing
    ok = head_only_ok(model)
    if ok:
        batch = probe_batch(model.config.vocab_size)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.autocast(device.type, enabled=False):
                packed = fast_logps(model, batch, 0, device)[:2]
                plain = two_rows(model, batch, 0, device)[:2]
                base = model.base_model
                own = vars(base).get("forward")                 # an instance's own forward, if any
                base.forward = with_shifted_positions(base.forward)
                try:
                    moved = fast_logps(model, batch, 0, device)[:2]
                finally:
                    if own is None:
                        del base.forward                        # back to the class's forward
                    else:
                        base.forward = own
            ok = packing_verdict(packed, plain, moved)
        except (TypeError, ValueError, RuntimeError):   # the model rejects the arguments
            ok = False
        finally:
            model.train(was_training)
    model._sapo_packing = bool(ok)
    return model._sapo_packing


def beyond_window(config, batch: list[dict]) -> bool:
    """Is a sequence longer than the model's sliding attention window? A 4D mask would lose the
    window there, so such batches take the plain path."""
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):
        window = None
    longest = max(len(b["prompt_ids"]) + max(len(b["chosen_ids"]), len(b["rejected_ids"]))
                  for b in batch)
    return bool(window) and longest > window


def preference_logps(plain, packed=packed_logps):
    """The fast sapo.preference_logps: packed where the model passes packing_ok and no sequence
    is beyond its window, else the plain function with head-only logits."""
    def fast(model, batch, pad_id, device, logps_at=None):
        if packing_ok(model, plain) and not beyond_window(model.config, batch):
            return packed(model, batch, pad_id, device)
        return plain(model, batch, pad_id, device, logps_at=head_logps)
    return fast


# --- Sampling: the same distribution, over the top-k only ------------------------------------

class TopKTopPSampler:
    """A logits processor that draws the next token itself, for generate's greedy path.

    = generate(do_sample=True, temperature, top_k, top_p): temperature, then top-k, then top-p,
    in transformers' order (ties at the k-th value kept, the top token always kept), so tokens
    come from the same distribution. Faster because transformers sorts, softmaxes and draws
    over the whole vocabulary at every step, and this over the k survivors only. Returns scores
    that are 0 at the drawn token and -inf elsewhere, so generate's argmax takes it."""

    def __init__(self, temperature: float, top_k: int, top_p: float):
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p

    @torch.no_grad()
    def kept(self, scores: torch.Tensor, max_ties: int | None = None):
        """(p, idx), each (B, k'): the kept tokens' probabilities (0 where top-p drops one), and
        their ids, in descending order of score. Tokens equal to the k-th stay: max_ties=None
        counts them (one host sync); max_ties=n looks n tokens further instead, with no sync
        (a GPU decoding loop), exact unless more than n tokens tie with the k-th."""
        vocab = scores.shape[-1]
        k = min(self.top_k, vocab) if self.top_k > 0 else vocab
        top, idx = scores.topk(k, dim=-1)                         # (B, k), descending
        if max_ties is None:
            ties = int((scores >= top[:, -1:]).sum(-1).max())
        else:
            ties = min(vocab, k + max_ties)
        if ties > k:
            kth = top[:, -1:]
            top, idx = scores.topk(ties, dim=-1)
            top = top.masked_fill(top < kth, float("-inf"))
        p = (top / self.temperature).softmax(-1)
        if self.top_p < 1.0:   # drop a token once the tokens ranked above it hold top_p
            p = p.masked_fill(p.cumsum(-1) - p >= self.top_p, 0.0)
        return p, idx

    @torch.no_grad()
    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        p, idx = self.kept(scores)
        drawn = idx.gather(-1, torch.multinomial(p, 1))
        return scores.fill_(float("-inf")).scatter_(-1, drawn, 0.0)


def fast_sampling(sampling: dict) -> dict:
    """generate's keyword arguments that draw from the same distribution as `sampling`
    (do_sample=True with temperature, top_k, top_p) through TopKTopPSampler."""
    if not sampling.get("do_sample"):
        return sampling
    sampler = TopKTopPSampler(sampling["temperature"], sampling["top_k"], sampling["top_p"])
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None,
            "logits_processor": [sampler]}


# --- The generator's weights: a bf16 copy, and autocast's weight cache -------------------------

def native_bf16(device: torch.device) -> bool:
    """Does this device multiply bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16
    or AMX?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def generation_dtype(choice: str, precision: str, device: torch.device):
    """--generator-dtype: auto is bf16 where bf16 is native here or training already runs in
    bf16, else fp32 (a bf16 copy generated 2.2x faster on a Zen 4 CPU with AVX512-BF16, and
    0.48x as fast on an AVX2-only one: docs/performance.md)."""
    if choice == "auto":
        native = precision != "fp32" or native_bf16(device)
        return torch.bfloat16 if native else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


_COPY: list = []    # [(weak reference to the model, its copy)]: one generator's copy at a time


@torch.no_grad()
def generator_copy(model, dtype):
    """The model whose weights generate: `model` itself when dtype is None or its own dtype,
    else a copy with parameters in dtype (buffers as they are: rotary frequencies stay fp32),
    refreshed from `model` at every call, so it always generates with the current weights.
    Faster where bf16 matmuls are native: half the bytes read per decoding step."""
    params = list(model.parameters())
    if dtype is None or params[0].dtype == dtype:
        return model
    if not _COPY or _COPY[0][0]() is not model:
        _COPY.clear()
        twin = copy.deepcopy(model).requires_grad_(False)
        for p in twin.parameters():
            p.grad = None
            p.data = p.data.to(dtype)
        _COPY.append((weakref.ref(model), twin))
    twin = _COPY[0][1]
    torch._foreach_copy_(list(twin.parameters()), params)
    return twin


@contextlib.contextmanager
def weight_cache(model):
    """Inside: autocast keeps its bf16 copy of each weight for the whole generate call.

    Autocast caches those copies only for leaves that require grad, so a frozen generator (the
    EMA, SPIN's copy) would re-cast every weight at every decoding step. No graph is built under
    no_grad: requiring grad only turns the cache on. Numbers are unchanged."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(False)


def generate_segments(plain, dtype=None):
    """The fast sapo.generate_segments: the plain function run on generator_copy(model, dtype),
    inside weight_cache, with fast_sampling."""
    def fast(model, contexts, max_new_tokens, pad_id, stop_ids, sampling):
        generator = generator_copy(model, dtype)
        with weight_cache(generator):
            return plain(generator, contexts, max_new_tokens, pad_id, stop_ids,
                         fast_sampling(sampling))
    return fast


# --- All of them at once ---------------------------------------------------------------------

def speedups(plain, generator_dtype=None):
    """sapo.Ops with each plain function replaced by its faster equal from this module."""
    def sequence_logps(model, input_ids, attention_mask, loss_mask):
        return plain.sequence_logps(model, input_ids, attention_mask, loss_mask,
                                    logps_at=head_logps)
    return dataclasses.replace(plain, sequence_logps=sequence_logps,
                               preference_logps=preference_logps(plain.preference_logps),
                               generate=generate_segments(plain.generate, generator_dtype),
                               answer=generate_segments(plain.answer, None))
