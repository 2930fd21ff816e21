"""SAPO: Self-Augmented Preference Optimization (Yin et al., ICLR 2025 submission), in one file.

Preference optimization from SFT data alone. The dataset holds prompts x and good responses y+.
An EMA copy of the policy rewrites one segment of each y+ into a negative

    y- = y+[:t] + segment + y+[t+G:]

the (x, y+, y-) tuples go through a replay buffer, and a DPO loss (reference refreshed from the
EMA) or an ORPO loss trains the policy on batches sampled from it. `train` numbers the steps of
the paper's Algorithm 1. The file reads top to bottom: config, data, log-probs, losses, EMA,
segment regeneration, replay buffer, the loss on a batch, evaluation, the loop, the command line.
SAPO's pairs differ in one segment, and on pairs this alike DPO can lower log pi(y+) too: the
literature's repairs are options (--rpo-alpha, --dpop-lambda, --suffix-free; docs/evidence.md).

This is the plain path. sapo_fast.py holds faster equals of the heavy functions (packed rows,
head-only logits, a faster sampler, a bf16 generator copy), used by default and proven equal by
tests; --plain runs this file alone. Plumbing (loading, rows, checkpoints, the output folder,
the CLI) lives in sapo_utils/; tasks and their scorers in tasks/.

Departures from the paper and the authors' code (github.com/yinyueqin/SAPO @ 5d7a210):
 1. Replay sampling is weighted 1/(times_sampled+1) as in their code (the paper: "randomly
    sampled"; --buffer-sampling uniform). The counts live in the tuples, so a resume keeps them
    (theirs are saved keyed by object id, so lost on resume). One buffer for the whole run
    (theirs: one of 2000 per GPU, each GPU sampling only its own).
 2. The reference is refreshed from the EMA every --ref-update-steps (theirs: a hard-coded 108)
    at their moment: a step's start, right after its EMA update; -1 means once per epoch.
 3. x ends with the template's assistant header and y+ is the bare answer + EOS; theirs put the
    header and the template's trailer in y+ (so they are scored, and regenerated at t = 0).
 4. Examples longer than --max-length are skipped and counted; theirs cut y+ to
    max_length - |x| (losing its EOS). Prompts are kept when |x| <= --max-prompt-length, counted
    with the template's special tokens; theirs keep |x| < max_prompt_length.
 5. Their collator sets the attention mask to 0 at every EOS inside x and y+ (utils.py), so
    later tokens never see a template's turn-closing EOS; here every real token is attended.
 6. A segment stops, and is spliced, at any of the model's stop tokens (tokenizer EOS and the
    generation config's, e.g. Llama-3's <|eot_id|>); theirs splices only at
    tokenizer.eos_token_id (generation itself stops at the generation config's).
 7. ORPO's NLL is the token mean over y+ only, padding masked (theirs, old TRL: prompt and
    padding too).
 8. Small-scale defaults: AdamW, lr 1e-6, batch 4 (theirs: 8 per GPU x 8 GPUs = 64), max length
    512, G = 32, fp32 (theirs: bf16 under DeepSpeed ZeRO-3). Their values are flags (--help names them; their
    ORPO warmup: --warmup-steps 100), with one exception: their ORPO optimizer is 8-bit AdamW
    (adamw_bnb_8bit); bitsandbytes is not a dependency here, --optimizer adamw is its
    full-precision form.
 9. A step with a NaN/inf loss or gradient is skipped and counted (--on-nonfinite stop stops).
10. The baselines (sft, dpo, orpo, spin) are configurations of the same loop; SPIN's
    iterations run in one job.

Run:  python sapo.py                  # SAPO-DPO on the bundled SmolLM2-135M-Instruct and data
      python sapo.py --model gpt2 --method sapo-orpo --dataset my.jsonl --output-dir runs/x
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
import sys
from collections import deque
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn.functional as F

import sapo_fast
from sapo_utils import cli, evaluation
from sapo_utils.cli import RunOptions, option
from sapo_utils.data import (BUNDLED_TRAIN, Example, PromptStream, load_data,  # noqa: F401
                             encode_example, encode_prompt, encode_response, load_examples)
from sapo_utils.evaluation import HeldOut
from sapo_utils.models import (BUNDLED_MODEL, disable_dropout, eval_mode, load_model,
                               load_tokenizer, pick_device, stop_token_ids)
from sapo_utils.optim import guarded_step, optimization
from sapo_utils.report import (held_out_metrics, identical, preference_metrics,
                               step_metrics)
from sapo_utils.run import Run, seed_everything

# --- 1. Config: one dataclass; each field's help is its --help text ----------------------------

METHODS = ("sapo-dpo", "sapo-orpo", "sft", "dpo", "orpo", "spin")


@dataclass
class Config(RunOptions):
    """The algorithm's options; RunOptions (sapo_utils/cli.py) adds what any trainer has
    (TRL's TrainingArguments): the optimizer and its schedule, the output folder,
    evaluation, logging, checkpoints."""
    # what to train, on what
    model: str = option(BUNDLED_MODEL, "a hub name (gpt2), a local folder, a .gguf file, a "
                        f"run's checkpoints/step-N folder, or {BUNDLED_MODEL} (bundled)")
    dataset: str = option(str(BUNDLED_TRAIN), "a .jsonl/.json/.parquet/.csv file, a local "
                          "dataset folder or a hub dataset; rows {prompt, chosen[, rejected]}, "
                          "{prompt, completion}, {messages}, {conversations} (ShareGPT) or "
                          "{instruction[, input], output} (Alpaca), in that precedence")
    method: str = option("sapo-dpo", "sapo-dpo | sapo-orpo, or a baseline run by the same "
                         "loop: sft (NLL on y+), dpo / orpo (offline, the dataset's "
                         "`rejected`), spin (whole responses from a frozen copy, once per "
                         "iteration)", choices=METHODS)
    seed: int = option(0, "seed for data order, truncation points, buffer sampling, generation")
    # the algorithm
    beta: float = option(0.1, "DPO beta: strength of the tie to the reference (authors: 0.1)")
    orpo_lambda: float = option(0.05, "ORPO lambda: weight of the odds-ratio term "
                                "(authors: 0.05)")
    # repairs for small-edit pairs (docs/evidence.md): DPO can lower log pi(y+) with log pi(y-)
    rpo_alpha: float = option(0.0, "DPO + alpha * NLL(y+), NLL a token mean (RPO, Pang et "
                              "al. 2024: 1.0; TRL's rpo_alpha); 0: off")
    dpop_lambda: float = option(0.0, "DPOP: -log s(beta*(r(y+) - r(y-) - lambda*max(0, "
                                "log pi_ref(y+) - log pi(y+)))) (Pal et al. 2024: 50); 0: off")
    suffix_free: bool = option(False, "Step-DPO's pair (Lai et al. 2024): y+[:t+G] vs "
                               "y+[:t] + segment, both ending where the segment ends")
    ema_decay: float = option(0.5, "b in theta_ema <- b*theta_ema + (1-b)*theta (authors: 0.5)")
    segment_len: int = option(32, "G: tokens the EMA regenerates per negative (authors: 256)")
    buffer_capacity: int = option(2000, "replay buffer size in tuples, FIFO (authors: 2000)")
    buffer_sampling: str = option("weighted", "weighted: p ~ 1/(times_sampled+1) (authors' "
                                  "code); uniform; both with replacement",
                                  choices=("weighted", "uniform"))
    generator: str = option("ema", "who writes SAPO's negatives: ema, or policy (ablation: no "
                            "EMA; the reference is then refreshed from the policy)",
                            choices=("ema", "policy"))
    use_buffer: bool = option(True, "sample the loss batch from the replay buffer; "
                              "--no-use-buffer trains on the fresh batch (ablation)")
    whole_response: bool = option(False, "regenerate the whole response (t = 0, no suffix) "
                                  "instead of a segment (ablation; SPIN does this)")
    skip_identical_negatives: bool = option(False, "drop fresh negatives equal to y+ token "
                                            "for token (loss log 2, no gradient) before the "
                                            "buffer; off, as the authors")
    spin_iterations: int = option(2, "spin: iterations; each regenerates every negative")
    ref_update_steps: int = option(-1, "copy the EMA into the DPO reference every N steps; "
                                   "-1: once per epoch of prompts (authors: 108); 0: never")
    temperature: float = option(0.7, "sampling temperature for segments (authors: 0.7)")
    top_p: float = option(0.95, "nucleus sampling for segments (authors: 0.95)")
    top_k: int = option(50, "top-k sampling for segments (authors: 50)")
    # batches and lengths
    batch_size: int = option(4, "prompts per micro-batch: fresh negatives, and tuples "
                             "sampled (authors: 8 per GPU x 8 GPUs = 64 per step)")
    grad_accum: int = option(1, "micro-batches per optimizer step (their negatives: one "
                             "generate call)")
    max_steps: int = option(20, "optimizer steps to run")
    max_length: int = option(512, "longest prompt + response in tokens; longer examples are "
                             "skipped (authors: 2048)")
    max_prompt_length: int = option(384, "longest prompt in tokens; longer ones are skipped "
                                    "(authors: 1792)")


# --- 2. Data: rows -> token ids (x in the chat format, y+ ending with EOS) -----------------------
# sapo_utils.data reads rows into Examples (load_examples; load_data adds the held-out split):
# x = the chat template up to the assistant header, y+ = the answer and EOS (encode_example); a
# base model without a template gets 'User: ...\n\nAssistant:'. Here: the batch layout.

def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Right-pad (prompt, response) pairs. loss_mask marks response tokens: the prompt and the
    padding never count."""
    T = max(len(x) + len(y) for x, y in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)          # (B, T)
    attn = torch.zeros((len(pairs), T), dtype=torch.long)
    loss_mask = torch.zeros((len(pairs), T), dtype=torch.bool)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x) + len(y)] = torch.tensor(x + y)
        attn[i, : len(x) + len(y)] = 1
        loss_mask[i, len(x): len(x) + len(y)] = True
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device),
            "loss_mask": loss_mask.to(device)}


# --- 3. Per-sequence log-probabilities -----------------------------------------------------------

def response_targets(input_ids, loss_mask):
    """Position t predicts token t+1, and only response tokens count. Returns target_mask
    (B, T-1), the N target tokens (N,), and the row each belongs to (N,)."""
    target_mask = loss_mask[:, 1:]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    rows = rows[:, None].expand_as(target_mask)[target_mask]
    return target_mask, input_ids[:, 1:][target_mask], rows


def token_logps(logits, targets):
    """log pi(target | context) at N positions: logits (N, V), targets (N,) -> (N,).
    cross_entropy is log_softmax + gather in one op, so no second (N, V) tensor is kept."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def full_logps_at(model, input_ids, attention_mask, at, targets):
    """Token log-probs at the N positions `at` (B, T) marks: one ordinary forward, then the
    (N, V) logits there. (sapo_fast.head_logps: the output layer at those positions only.)"""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[at]   # (N, V)
    return token_logps(logits, targets)


def sequence_logps(model, input_ids, attention_mask, loss_mask, logps_at=full_logps_at):
    """Sum of log pi(y_t | x, y_<t) over response tokens, and their count: (B,), (B,).
    Sum vs mean is the caller's choice: DPO sums (a shared prefix cancels), ORPO averages.
    logps_at is the seam for other forwards (sapo_fast's, scale/'s torchtune models)."""
    target_mask, targets, rows = response_targets(input_ids, loss_mask)
    at = F.pad(target_mask, (0, 1), value=False)        # (B, T): positions that predict a token
    logps = logps_at(model, input_ids, attention_mask, at, targets)              # (N,)
    sums = torch.zeros(input_ids.shape[0], device=logps.device).index_add(0, rows, logps)
    return sums, target_mask.sum(-1)


def preference_logps(model, batch: list[dict], pad_id: int, device, logps_at=full_logps_at):
    """(sum+, sum-, n+, n-), each (B,), for a batch of (x, y+, y-) tuples: two rows per
    tuple, [x, y+] and [x, y-], in one forward over [y+ rows; y- rows]."""
    if any(not b["prompt_ids"] for b in batch):
        raise ValueError("an empty prompt: y's first token has no position to be predicted from")
    pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch]
    pairs += [(b["prompt_ids"], b["rejected_ids"]) for b in batch]
    logps, counts = sequence_logps(model, **collate(pairs, pad_id, device), logps_at=logps_at)
    B = len(batch)
    return logps[:B], logps[B:], counts[:B], counts[B:]


# --- 4. Losses: pure functions of per-sequence log-probs -----------------------------------------

def dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, beta: float, dpop_lambda: float = 0.0):
    """DPO (Rafailov et al. 2023) on *summed* log-probs; returns (loss, r+, r-).

        r(y)  = beta * (log pi(y|x) - log pi_ref(y|x))        the implicit reward
        loss  = -log sigmoid(r(y+) - r(y-)),  averaged over the batch

    With sums, the shared prefix y+[:t] of a SAPO negative cancels exactly in
    log pi(y+) - log pi(y-): the loss sees the segment and the re-conditioned suffix.
    Nothing in it keeps log pi(y+) up: on pairs this alike, both can fall while the
    margin grows (Pal et al. 2024). DPOP (same paper) takes a penalty off the margin,

        loss  = -log sigmoid(r(y+) - r(y-) - beta * lambda * max(0, log pi_ref(y+) - log pi(y+)))

    which acts only once the policy's y+ has fallen below the reference's."""
    rewards_pos = beta * (pi_pos - ref_pos)
    rewards_neg = beta * (pi_neg - ref_neg)
    fallen = (ref_pos - pi_pos).clamp(min=0)      # 0 while log pi(y+) >= log pi_ref(y+)
    margin = rewards_pos - rewards_neg - beta * dpop_lambda * fallen
    loss = -F.logsigmoid(margin).mean()
    return loss, rewards_pos.detach(), rewards_neg.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0,
    log1p(-e^x) far from it. Each branch gets a safe input where it is not selected, since
    torch.where back-propagates through both and an inf there would make the gradient NaN."""
    far = x < -math.log(2)
    near_value = torch.log(-torch.expm1(torch.where(far, -1.0, x)))
    far_value = torch.log1p(-torch.exp(torch.where(far, x, -1.0)))
    return torch.where(far, far_value, near_value)


def orpo_loss(avg_pos, avg_neg, nll_pos, lam: float):
    """ORPO (Hong et al. 2024) on *length-averaged* log-probs lp; returns
    (loss, log_odds, r+, r-).

        log odds(y) = lp - log(1 - e^lp)             odds = p / (1 - p), p = e^lp
        log_odds    = log odds(y+) - log odds(y-)
        loss        = NLL(y+) - lambda * mean(log sigmoid(log_odds))

    nll_pos is the token-mean NLL of the chosen responses (prompt and padding masked)."""
    log_odds = (avg_pos - avg_neg) - (log1mexp(avg_pos) - log1mexp(avg_neg))
    loss = nll_pos - lam * F.logsigmoid(log_odds).mean()
    return loss, log_odds.detach(), lam * avg_pos.detach(), lam * avg_neg.detach()


def preference_loss(loss_kind: str, pi_pos, pi_neg, n_pos, n_neg, ref_pos=None, ref_neg=None,
                    *, beta: float, orpo_lambda: float, rpo_alpha: float = 0.0,
                    dpop_lambda: float = 0.0, nll=None):
    """The loss ('dpo' | 'orpo') of a batch from its log-prob sums and token counts (each
    (B,)), and its metrics. nll: NLL(y+) as a token mean, the NLL term of ORPO and of
    RPO (Pang et al. 2024):  loss = DPO + rpo_alpha * NLL(y+).  None: over this batch
    (scale/ passes the mean over every process's batch)."""
    if nll is None:
        nll = -pi_pos.sum() / n_pos.sum()
    extra = {}
    if loss_kind == "dpo":
        loss, r_pos, r_neg = dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, beta, dpop_lambda)
        if rpo_alpha:
            loss = loss + rpo_alpha * nll
            extra["nll_loss"] = nll.item()
    else:
        loss, log_odds, r_pos, r_neg = orpo_loss(pi_pos / n_pos, pi_neg / n_neg, nll,
                                                 orpo_lambda)
        extra = {"nll_loss": nll.item(),
                 "log_odds_ratio": F.logsigmoid(log_odds).mean().item(),
                 "log_odds_chosen": log_odds.mean().item()}
    return loss, preference_metrics(loss, r_pos, r_neg, pi_pos, pi_neg, extra)


def loss_weights(cfg) -> dict:
    """preference_loss's weights, from a Config."""
    return {"beta": cfg.beta, "orpo_lambda": cfg.orpo_lambda, "rpo_alpha": cfg.rpo_alpha,
            "dpop_lambda": cfg.dpop_lambda}


# --- 5. The EMA generator ---------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema_model, policy, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, once per step, before its update."""
    for p_ema, p in zip(ema_model.parameters(), policy.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)   # a + w*(b - a)


@torch.no_grad()
def copy_weights(dst, src) -> None:
    """dst <- src: the reference refresh."""
    for p_dst, p_src in zip(dst.parameters(), src.parameters()):
        p_dst.copy_(p_src)


def frozen_copy(model):
    """A copy that never trains: the EMA, the reference, SPIN's generator."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# --- 6. Truncation and segment regeneration ------------------------------------------------------

class PreferenceTuple(TypedDict):
    """One (x, y+, y-) tuple, as the replay buffer holds it (plain JSON in checkpoints)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    t: int               # where y+ was cut
    segment_len: int     # tokens of y- written by the generator
    times_sampled: int   # how often the buffer handed it out


def preference_tuple(x, y_pos, y_neg, t=0, segment_len=None) -> PreferenceTuple:
    if segment_len is None:
        segment_len = len(y_neg)
    return PreferenceTuple(prompt_ids=x, chosen_ids=y_pos, rejected_ids=y_neg, t=t,
                           segment_len=segment_len, times_sampled=0)


TAIL = 3   # a segment ends at least TAIL tokens before y+ does (the authors' code; unexplained)


def truncation_point(len_pos: int, len_prompt: int, segment_len: int, max_length: int,
                     rng: random.Random):
    """(t, G) for one y+: G = min(segment_len, |y+|), t ~ U{0 .. min(|y+| - TAIL - G, room)},
    where room keeps |x| + t + G <= max_length. In the authors' layout y+ ends with the chat
    template's trailer and EOS, which TAIL keeps out of the segment. When the bound is <= 0,
    t = 0: y+ is rewritten whole if |y+| <= G (as in SPIN); if G < |y+| <= G + TAIL, its
    first G tokens are, before a suffix of 1 to TAIL tokens."""
    G = min(segment_len, len_pos)
    hi = min(len_pos - TAIL - G, max_length - len_prompt - G)
    t = 0
    if hi > 0:
        t = rng.randint(0, hi)
    return t, G


def splice_negative(y_pos: list[int], t: int, G: int, segment: list[int], stop_ids,
                    suffix_free: bool = False):
    """y- = y+[:t] + segment + y+[t+G:], or y+[:t] + segment up to its first stop token (no
    suffix). Returns (y-, the number of segment tokens kept). suffix_free (Step-DPO's
    form): no suffix ever; the caller then cuts y+ at t+G as well."""
    for i, token in enumerate(segment[:G]):
        if token in stop_ids:
            return y_pos[:t] + segment[: i + 1], i + 1
    segment = segment[:G]
    if suffix_free:
        return y_pos[:t] + segment, len(segment)
    return y_pos[:t] + segment + y_pos[t + G:], len(segment)


def segment_sampling(temperature: float, top_k: int, top_p: float) -> dict:
    """generate's arguments for a segment (authors: temperature 0.7, top_k 50, top_p 0.95)."""
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}


@torch.no_grad()
def generate_segments(model, contexts: list[list[int]], max_new_tokens: list[int], pad_id: int,
                      stop_ids, sampling: dict) -> list[list[int]]:
    """Continue each context by up to max_new_tokens[i] tokens: one batched, KV-cached
    generate call. Rows stop at a stop token; the caller trims."""
    device = next(model.parameters()).device
    B, L = len(contexts), max(len(c) for c in contexts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, c in enumerate(contexts):      # left padding: each row's next token is at position L
        ids[i, L - len(c):] = torch.tensor(c)
        attn[i, L - len(c):] = 1
    with eval_mode(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                             max_new_tokens=max(max_new_tokens), pad_token_id=pad_id,
                             eos_token_id=list(stop_ids), use_cache=True, **sampling)
    return [row[L: L + n].tolist() for row, n in zip(out, max_new_tokens)]


def make_negatives(generator, examples: list[Example], segment_len: int, max_length: int,
                   rng: random.Random, pad_id: int, stop_ids, sampling: dict,
                   batch_size: int | None = None, generate=generate_segments,
                   suffix_free: bool = False) -> list[PreferenceTuple]:
    """SAPO's self-augmented negatives: pick t, let the generator write G tokens after
    x + y+[:t], splice. batch_size rows per generate call (default: all). suffix_free:
    the pair is y+[:t+G] against y+[:t] + segment, one step on a shared prefix."""
    tuples, per_call = [], batch_size or max(1, len(examples))
    for start in range(0, len(examples), per_call):
        chunk = examples[start: start + per_call]
        cuts = [truncation_point(len(e.chosen_ids), len(e.prompt_ids), segment_len,
                                 max_length, rng) for e in chunk]
        contexts = [e.prompt_ids + e.chosen_ids[:t] for e, (t, _) in zip(chunk, cuts)]
        lengths = [G for _, G in cuts]
        segments = generate(generator, contexts, lengths, pad_id, stop_ids, sampling)
        for e, (t, G), segment in zip(chunk, cuts, segments):
            y_neg, kept = splice_negative(e.chosen_ids, t, G, segment, stop_ids, suffix_free)
            y_pos = e.chosen_ids[: t + G] if suffix_free else e.chosen_ids
            tuples.append(preference_tuple(e.prompt_ids, y_pos, y_neg, t, kept))
    return tuples


# --- 7. The replay buffer ------------------------------------------------------------------------

class ReplayBuffer:
    """FIFO buffer of (x, y+, y-) tuples; the oldest is evicted past `capacity`. Sampling is
    with replacement, uniform or weighted 1/(times_sampled + 1), which favours fresh and rarely
    used tuples (the authors' code). Counts live in the tuples, so they survive a resume."""

    def __init__(self, capacity: int, sampling: str = "weighted"):
        self.capacity = capacity
        self.sampling = sampling
        self.items: deque[PreferenceTuple] = deque(maxlen=capacity)  # drops from the left

    def __len__(self):
        return len(self.items)

    def push(self, tuples: list[PreferenceTuple]) -> None:
        self.items.extend(tuples)

    def weights(self) -> list[float]:
        if self.sampling == "uniform":
            return [1.0] * len(self.items)
        return [1.0 / (item["times_sampled"] + 1) for item in self.items]

    def sample(self, n: int, rng: random.Random) -> list[PreferenceTuple]:
        picked = rng.choices(range(len(self.items)), weights=self.weights(), k=n)
        for i in picked:
            self.items[i]["times_sampled"] += 1
        return [self.items[i] for i in picked]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "sampling": self.sampling, "items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.items = deque(state["items"], maxlen=self.capacity)


def replay(tuples: list[PreferenceTuple], buffer: ReplayBuffer | None, n: int,
           rng: random.Random) -> list[PreferenceTuple]:
    """Steps (4)-(5): push the fresh tuples, sample n for the loss. Without a buffer (an
    ablation; the offline methods) the fresh tuples are the loss batch."""
    if buffer is None:
        return tuples
    buffer.push(tuples)
    if not len(buffer):       # every negative so far was skipped as identical to y+
        return []
    return buffer.sample(n, rng)


# --- 8. The loss on a sampled batch --------------------------------------------------------------

@dataclass(frozen=True)
class Ops:
    """The heavy functions the loop calls: this file's plain ones, or sapo_fast's equals.
    generate writes segments; answer writes the greedy answers a task scores (always with the
    policy's own weights: they are its answers)."""
    sequence_logps: object = sequence_logps
    preference_logps: object = preference_logps
    generate: object = generate_segments
    answer: object = generate_segments


def ops_for(cfg: Config, device) -> Ops:
    """The plain functions with --plain; else sapo_fast.py's speed-ups (same numbers)."""
    if cfg.plain:
        return Ops()
    device = torch.device(device)
    dtype = sapo_fast.generation_dtype(cfg.generator_dtype, cfg.precision, device)
    return sapo_fast.speedups(Ops(), dtype)


def autocast(cfg: Config, device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=cfg.precision == "bf16-mixed")


def batch_loss(loss_kind: str, cfg: Config, policy, ref_model, batch: list[dict], pad_id: int,
               device, ops: Ops):
    """The loss ('dpo' | 'orpo' | 'sft') on a batch of (x, y+, y-) tuples, and its metrics.
    ops: Ops() for this file's plain functions, or ops_for(cfg, device)."""
    if loss_kind == "sft":                     # NLL of y+ only, token mean
        pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch]
        logps, counts = ops.sequence_logps(policy, **collate(pairs, pad_id, device))
        loss = -logps.sum() / counts.sum()
        return loss, {"loss": loss.item(), "logps/chosen": logps.detach().mean().item()}
    pi_pos, pi_neg, n_pos, n_neg = ops.preference_logps(policy, batch, pad_id, device)
    ref_pos = ref_neg = None
    if loss_kind == "dpo":
        with torch.no_grad():
            ref_pos, ref_neg, _, _ = ops.preference_logps(ref_model, batch, pad_id, device)
    return preference_loss(loss_kind, pi_pos, pi_neg, n_pos, n_neg, ref_pos, ref_neg,
                           **loss_weights(cfg))


# --- 9. Evaluation on held-out prompts -----------------------------------------------------------

@torch.no_grad()
def region_logps(model, tuples: list[dict], segment_len: int, pad_id: int, device,
                 logps_at=full_logps_at) -> dict:
    """Where the likelihood moves (docs/evidence.md): log pi summed over y+'s prefix y+[:t],
    span y+[t:t+G] and suffix y+[t+G:], and over y-'s span (its own segment) and suffix,
    each (B,). The prefix is shared: it is the same in y+ and y-."""
    B = len(tuples)
    pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in tuples]
    pairs += [(b["prompt_ids"], b["rejected_ids"]) for b in tuples]
    batch = collate(pairs, pad_id, device)
    target_mask, targets, rows = response_targets(batch["input_ids"], batch["loss_mask"])
    at = F.pad(target_mask, (0, 1), value=False)
    logps = logps_at(model, batch["input_ids"], batch["attention_mask"], at, targets)  # (N,)
    index = (target_mask.cumsum(-1) - 1)[target_mask]      # (N,) each token's place in y
    t = torch.tensor([b["t"] for b in tuples] * 2, device=logps.device)
    G_pos = [min(segment_len, len(b["chosen_ids"])) for b in tuples]   # y+'s span
    G = torch.tensor(G_pos + [b["segment_len"] for b in tuples], device=logps.device)
    region = (index >= t[rows]).long() + (index >= (t + G)[rows]).long()  # 0, 1, 2
    sums = torch.zeros(2 * B, 3, device=logps.device)
    sums.index_put_((rows, region), logps.float(), accumulate=True)
    sums = sums.cpu()
    return {"chosen_prefix": sums[:B, 0], "chosen_span": sums[:B, 1],
            "chosen_suffix": sums[:B, 2], "rejected_span": sums[B:, 1],
            "rejected_suffix": sums[B:, 2]}


@torch.no_grad()
def evaluate(policy, eval_tuples: list[dict], pad_id: int, device, beta: float, start=None,
             batch_size: int = 8, logps_fn=preference_logps, segment_len: int = 0) -> dict:
    """Held-out measures against fixed negatives, written once by the starting model pi_0:
      eval/rewards/*   DPO's implicit reward against pi_0, r(y) = beta*(log pi(y) - log pi_0(y)):
                       chosen, rejected, margins = r(y+) - r(y-), accuracies = share with
                       r(y+) > r(y-). All 0 at step 0: how far training moved y+ above y-,
                       not whether answers got better (a task's scorer measures that).
      eval/logps_*_per_token, eval/preference_accuracy (per-token log-prob of y+ above y-'s),
      eval/log_odds_chosen (ORPO's log odds ratio of y+ over y-).
      eval/logps/{chosen,rejected}_{prefix,span,suffix}: region_logps, means over prompts
                       (with segment_len G > 0).
    start: pi_0's (sum+, sum-) lists, None when the policy is pi_0. per_prompt: the values."""
    chunks = [eval_tuples[i: i + batch_size] for i in range(0, len(eval_tuples), batch_size)]
    regions = {}
    with eval_mode(policy):
        parts = [logps_fn(policy, chunk, pad_id, device) for chunk in chunks]
        if segment_len:
            region_parts = [region_logps(policy, c, segment_len, pad_id, device)
                            for c in chunks]
            regions = {k: torch.cat([r[k] for r in region_parts]) for k in region_parts[0]}
    pi_pos, pi_neg, n_pos, n_neg = (torch.cat(p).float().cpu() for p in zip(*parts))
    start = start or (pi_pos.tolist(), pi_neg.tolist())
    avg_pos, avg_neg = pi_pos / n_pos, pi_neg / n_neg
    # the losses' own formulas: DPO's rewards with pi_0 as the reference, ORPO's log odds
    _, r_pos, r_neg = dpo_loss(pi_pos, pi_neg, torch.tensor(start[0]), torch.tensor(start[1]),
                               beta)
    _, log_odds, _, _ = orpo_loss(avg_pos, avg_neg, 0.0, 1.0)
    return held_out_metrics(pi_pos, pi_neg, avg_pos, avg_neg, r_pos, r_neg, log_odds, regions)


def held_out(cfg: Config, tok, policy, examples: list[Example], task, ops: Ops,
             segment_args: dict) -> HeldOut:
    """The held-out prompts' evaluation. Their negatives are written once, by the starting
    model with their own seed, so every evaluation compares the same tuples. They keep
    y+'s suffix whatever the run trains on, so region_logps measures every region."""
    tuples = []
    if cfg.eval_logps and examples:
        with autocast(cfg, policy.device):
            rng = random.Random(cfg.seed + 1)
            tuples = make_negatives(policy, examples, rng=rng, **segment_args)
    measures = functools.partial(evaluate, segment_len=segment_args["segment_len"])
    return HeldOut(cfg, tok, examples, tuples, task, segment_args["stop_ids"], ops,
                   policy.device, lambda: autocast(cfg, policy.device), measures)


# --- 10. The training loop -----------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """A method as a configuration of the one loop: which loss, where negatives come from,
    whether the loss batch is sampled from the buffer or is the fresh batch itself."""
    loss: str             # dpo | orpo | sft
    negatives: str        # ema | policy (online) | frozen (SPIN) | dataset (offline) | none
    whole_response: bool  # regenerate y+ from t = 0 with no suffix, instead of a segment
    use_buffer: bool
    ref_source: str       # the DPO reference is refreshed from: ema | policy | fixed | none


def method_recipe(cfg: Config) -> Recipe:
    online = dict(negatives=cfg.generator, whole_response=cfg.whole_response,
                  use_buffer=cfg.use_buffer)
    return {"sapo-dpo": Recipe("dpo", ref_source=cfg.generator, **online),
            "sapo-orpo": Recipe("orpo", ref_source="none", **online),
            "sft": Recipe("sft", "none", False, False, "none"),
            "dpo": Recipe("dpo", "dataset", False, False, "fixed"),
            "orpo": Recipe("orpo", "dataset", False, False, "none"),
            "spin": Recipe("dpo", "frozen", True, False, "policy")}[cfg.method]


def refresh_due(recipe: Recipe, step: int, ref_every: int, spin_every: int = 0) -> bool:
    """Is the DPO reference refreshed at the start of this step (step = steps done)? As the
    authors: at every multiple of ref_every, after the step's EMA update, before its loss.
    Step 0 is skipped: the EMA and the reference are both the starting model then."""
    refreshed = recipe.ref_source in ("ema", "policy") and not spin_every
    return refreshed and ref_every > 0 and step > 0 and step % ref_every == 0


def reference_period(cfg: Config, n_examples: int) -> int:
    """--ref-update-steps, with -1 meaning once per epoch of prompts."""
    if cfg.ref_update_steps == -1:
        return math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
    return cfg.ref_update_steps


def offline_tuples(examples: list[Example]) -> list[PreferenceTuple]:
    """(x, y+, y-) tuples from the dataset's own rejected responses (offline DPO / ORPO)."""
    return [preference_tuple(e.prompt_ids, e.chosen_ids, e.rejected_ids or [])
            for e in examples]


def build_models(cfg: Config, recipe: Recipe, device):
    """The policy pi_theta; the EMA generator (SAPO); the reference pi_ref (DPO; SPIN's
    frozen generator). Dropout is off in all of them, as in TRL and the authors' code."""
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    policy = load_model(cfg.model, dtype, device, cfg.trust_remote_code,
                        cfg.gradient_checkpointing).train()
    dropout_rates = disable_dropout(policy)       # the config's, for the saved model
    ema = frozen_copy(policy) if recipe.negatives == "ema" else None
    ref = frozen_copy(policy) if recipe.ref_source != "none" else None
    return policy, ema, ref, dropout_rates


def segment_settings(cfg: Config, recipe: Recipe, tok, policy, ops: Ops) -> dict:
    """make_negatives' arguments. Whole-response negatives: G = max_length, so t = 0."""
    G = cfg.max_length if recipe.whole_response else cfg.segment_len
    sampling = segment_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    return dict(segment_len=G, max_length=cfg.max_length, pad_id=tok.pad_token_id,
                stop_ids=stop_token_ids(policy, tok), sampling=sampling, generate=ops.generate)


def spin_period(cfg: Config, recipe: Recipe) -> int:
    """SPIN: steps per iteration (0 for every other method)."""
    if recipe.negatives != "frozen":
        return 0
    return math.ceil(cfg.max_steps / cfg.spin_iterations)


def train(cfg: Config, task=None, on_step=None) -> dict:
    """Run a method as configured: the paper's Algorithm 1, steps (1)-(7). Returns the
    before/after evaluation and the last step's metrics. task: a scorer from tasks/, or None.
    on_step(step, policy, metrics) runs after each step; it must not touch weights or RNG."""
    recipe, device = method_recipe(cfg), pick_device(cfg.device)
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)              # truncation points and buffer sampling
    ops = ops_for(cfg, device)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, eval_examples = load_data(cfg, tok, recipe.negatives == "dataset")
    with Run(cfg, dataclasses.asdict(cfg), on_step) as run:
        run.say("loading the model")
        policy, ema, ref, dropout_rates = build_models(cfg, recipe, device)
        models = {"policy": policy, "ema": ema, "ref": ref}
        segment_args = segment_settings(cfg, recipe, tok, policy, ops)
        ref_every, spin_every = reference_period(cfg, len(examples)), spin_period(cfg, recipe)
        optimizer, scheduler = optimization(cfg, policy.parameters())
        buffer = ReplayBuffer(cfg.buffer_capacity, cfg.buffer_sampling)
        run.say("writing the held-out negatives")
        heldout = held_out(cfg, tok, policy, eval_examples, task, ops, segment_args)
        # the loop's state: what a checkpoint holds besides weights, optimizer and RNG
        loop = {"step": 0, "before": None, "spin_negatives": [], "skipped": 0,
                "stream": PromptStream(len(examples), cfg.seed), "buffer": buffer}
        # --resume: restore all of it from the newest checkpoint; else score pi_0 held out
        run.start(models, optimizer, scheduler, rng, device, loop, heldout)
        while loop["step"] < cfg.max_steps:
            step = loop["step"]
            run.step_started()
            if spin_every and step % spin_every == 0:   # a SPIN iteration: all y-, whole
                copy_weights(ref, policy)
                loop["spin_negatives"] = make_negatives(ref, examples, rng=rng,
                                                        batch_size=cfg.batch_size,
                                                        **segment_args)
            # (1) EMA update, before this step's gradient update
            if ema is not None:
                ema_update(ema, policy, cfg.ema_decay)
            # (2) SAPO-DPO: every ref_every steps, right after that EMA update, pi_ref <- EMA
            if refresh_due(recipe, step, ref_every, spin_every):
                copy_weights(ref, models[recipe.ref_source])
            optimizer.zero_grad(set_to_none=True)
            # (3) truncate y+ at t, the EMA writes G tokens, splice -> (x, y+, y-): one generate
            #     call for all of the step's micro-batches
            indices = loop["stream"].next(cfg.batch_size * cfg.grad_accum)
            fresh = [examples[i] for i in indices]
            with run.timing("generation"), autocast(cfg, device):
                if recipe.negatives in ("ema", "policy"):
                    fresh_tuples = make_negatives(ema or policy, fresh, rng=rng,
                                                  suffix_free=cfg.suffix_free, **segment_args)
                elif spin_every:                       # SPIN's frozen negatives
                    fresh_tuples = [loop["spin_negatives"][i] for i in indices]
                else:                                   # the dataset's own
                    fresh_tuples = offline_tuples(fresh)
            accum = []
            for micro in range(cfg.grad_accum):
                tuples = fresh_tuples[micro * cfg.batch_size: (micro + 1) * cfg.batch_size]
                if cfg.skip_identical_negatives:
                    tuples = [t for t, same in zip(tuples, identical(tuples)) if not same]
                # (4) push into the replay buffer; (5) sample the loss batch from it
                in_use = buffer if recipe.use_buffer else None
                batch = replay(tuples, in_use, cfg.batch_size, rng)
                if not batch:                           # every negative was skipped
                    continue
                # (6) the loss on the sampled batch: DPO against pi_ref, or ORPO; backward
                with autocast(cfg, device):
                    loss, m = batch_loss(recipe.loss, cfg, policy, ref, batch,
                                         tok.pad_token_id, device, ops)
                (loss / cfg.grad_accum).backward()
                accum.append(m)
            # (7) the optimizer step; a NaN/inf loss or gradient skips it (or stops the run)
            losses = [m["loss"] for m in accum]
            grad_norm, skipped = guarded_step(optimizer, policy.parameters(), cfg.max_grad_norm,
                                              losses, cfg.on_nonfinite, step)
            scheduler.step()
            loop["skipped"] += skipped
            loop["step"] = step = step + 1
            metrics = step_metrics(accum, step=step, lr=scheduler.get_last_lr()[0],
                                   grad_norm=grad_norm, skipped=loop["skipped"], buffer=buffer)
            run.end_step(step, policy, metrics, tok, fresh_tuples, recipe.negatives)
        run.finish(policy, tok, dropout_rates)
        return run.summary(tok, eval_examples, heldout.score(policy))


# --- 11. Command line ----------------------------------------------------------------------------

def evaluate_model(cfg: Config, task=None) -> dict:
    """--eval-only: score --model on the held-out prompts (sapo_utils.evaluation)."""
    ops = ops_for(cfg, pick_device(cfg.device))
    return evaluation.evaluate_model(cfg, task, load_examples, collate, ops)


def main(argv=None) -> int:
    """python sapo.py [flags]: sapo_utils.cli.main runs train (or --eval-only) on the flags."""
    return cli.main(Config, train, evaluate_model, argv,
                    "SAPO: Self-Augmented Preference Optimization.",
                    "held-out evaluation:\n" + evaluate.__doc__)


if __name__ == "__main__":
    sys.exit(main())
