"""SAPO: Self-Augmented Preference Optimization (Yin et al., ICLR 2025 submission), in one file.

Preference optimization from SFT data alone: the dataset holds prompts x and good responses y+; an EMA copy of
the policy rewrites one segment of each y+ into a negative y- = y+[:t] + segment + y+[t+G:], the (x, y+, y-)
tuples go through a replay buffer, and a DPO loss (reference refreshed from the EMA) or an ORPO loss trains
the policy on batches sampled from it. The loop in `train` numbers the steps of the paper's Algorithm 1.
Plumbing (loading, rows, checkpoints, CLI) lives in sapo_io.py; the bundled task in tasks/ifeval_lite.py.

Departures from the paper and the authors' code (github.com/yinyueqin/SAPO @ 5d7a210); details in README:
 1. Replay sampling weighted 1/(times_sampled+1) as their code (paper: "randomly sampled"; --buffer-sampling
    uniform); the counts are saved in checkpoints (theirs reset on resume).
 2. Reference <- EMA every --ref-update-steps (theirs: a hard-coded 108) at their moment: a step's start, right
    after its EMA update; -1: once per epoch. --generator policy (our ablation) refreshes from the policy.
 3. x ends with the template's assistant header, y+ is the bare answer + EOS; theirs put the header and the
    template's trailer in y+ (scored, and regenerated at t = 0).
 4. Examples longer than --max-length are skipped and counted; they cut y+ to max_length - |x| (losing EOS).
 5. ORPO's NLL is the token mean over y+ only, padding masked (theirs, old TRL: prompt and padding too).
 6. Small-scale defaults (AdamW, lr 1e-6, max length 512, G = 32, fp32 weights; theirs: bf16, which our segments
    use where bf16 is native, --generator-dtype); every authors' value is one flag away.
 7. One segment [x, y+, y-[k:]] per tuple, short ones packed into shared rows, with a 4D mask (theirs, TRL: two
    rows per tuple); two rows where a model rejects it.
 8. A step with a NaN/inf loss or gradient is skipped and counted (--on-nonfinite stop stops instead).
 9. Baselines (sft, dpo, orpo, spin) are configurations of the same loop; SPIN's iterations run in one job.

Run:  python sapo.py                              # SAPO-DPO, bundled SmolLM2-135M-Instruct and data, offline
      python sapo.py --model gpt2 --method sapo-orpo --dataset my.jsonl --output-dir runs/x [--resume]
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sapo_io import (BUNDLED_HELDOUT, BUNDLED_MODEL, BUNDLED_TRAIN, append_samples, beyond_window, check_config,
                     disable_dropout, generation_copy, generation_dtype, head_only_ok, latest_checkpoint,
                     load_checkpoint, load_model, load_tokenizer, lr_lambda, make_optimizer, MetricsLog, parse_args,
                     parse_rows, pick_device, prepare_output_dir, print_summary, PromptStream, read_rows, rng_state,
                     save_checkpoint, save_final, stop_token_ids, Stopped, StopSignals, TopKTopPSampler, trim_jsonl,
                     UserError, write_summary)

# transformers imports torchao when it is installed (torchtune needs it for scale/); its CPU-build notice is noise
logging.getLogger("torchao").setLevel(logging.ERROR)

# --- 1. Config: one dataclass; each field's `help` is its --help text. ---------------------------------------------

METHODS = ("sapo-dpo", "sapo-orpo", "sft", "dpo", "orpo", "spin")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to train, on what
    model: str = _f(BUNDLED_MODEL, "model: a hub name (gpt2, HuggingFaceTB/SmolLM2-135M-Instruct), a local folder, "
                    f"a .gguf file, or {BUNDLED_MODEL} (bundled, offline)")
    dataset: str = _f(str(BUNDLED_TRAIN), "training data: a .jsonl/.json/.parquet/.csv file, a local dataset folder "
                      "or a hub dataset name; rows {prompt, chosen[, rejected]}, {prompt, completion}, {messages}, "
                      "{conversations} (ShareGPT) or {instruction[, input], output} (Alpaca), in that precedence")
    columns: str = _f("", "other row layouts, as field=column pairs (prompt=question,chosen=answer; any field named "
                      "above); applies to --dataset and --eval-dataset")
    dataset_split: str = _f("train", "split to use when --dataset is a hub dataset")
    eval_dataset: str = _f("", "held-out prompts for the before/after summary (default: the bundled held-out "
                           "file with the bundled data, otherwise --eval-size prompts held out of --dataset)")
    eval_size: int = _f(16, "number of held-out prompts scored before and after training")
    eval_only: bool = _f(False, "only score --model on the held-out prompts (log-prob of y+, instruction accuracy "
                         "where rows carry constraints), print JSON, write nothing")
    eval_max_new_tokens: int = _f(96, "longest greedy answer when scoring instruction following")
    method: str = _f("sapo-dpo", "sapo-dpo | sapo-orpo, or a baseline as a special case of the same loop: sft "
                     "(NLL on y+), dpo / orpo (offline, the dataset's `rejected`), spin (whole responses from a "
                     "frozen copy, regenerated once per iteration)", choices=METHODS)
    output_dir: str = _f("runs/sapo", "where metrics.jsonl, samples.jsonl, checkpoints/ and final/ go")
    overwrite: bool = _f(False, "allow writing into a non-empty --output-dir (without --resume)")
    resume: bool = _f(False, "continue from the newest complete checkpoint in --output-dir")
    seed: int = _f(0, "seed for data order, truncation points, buffer sampling and generation")
    # the algorithm
    beta: float = _f(0.1, "DPO beta: strength of the KL tie to the reference (authors: 0.1)")
    orpo_lambda: float = _f(0.05, "ORPO lambda: weight of the odds-ratio term (authors: 0.05)")
    ema_decay: float = _f(0.5, "EMA decay b in theta_ema <- b*theta_ema + (1-b)*theta (authors: 0.5)")
    segment_len: int = _f(32, "G, tokens the EMA model regenerates per negative (authors: 256 at max length 2048)")
    buffer_capacity: int = _f(2000, "replay buffer size in (x, y+, y-) tuples, FIFO (authors: 2000)")
    buffer_sampling: str = _f("weighted", "weighted: with replacement, p ~ 1/(times_sampled+1) (authors' code); "
                              "uniform: with replacement, equal weights", choices=("weighted", "uniform"))
    generator: str = _f("ema", "who writes SAPO's negatives: ema (SAPO) or policy (ablation: on-policy, no EMA; "
                        "the reference is then refreshed from the policy)", choices=("ema", "policy"))
    use_buffer: bool = _f(True, "SAPO samples its loss batch from the replay buffer; --no-use-buffer trains on the "
                          "fresh batch (ablation)")
    whole_response: bool = _f(False, "regenerate the whole response (t = 0, no suffix) instead of a segment "
                              "(ablation; SPIN does this)")
    spin_iterations: int = _f(2, "spin: number of iterations; each regenerates all negatives with a frozen copy")
    ref_update_steps: int = _f(-1, "copy the EMA into the DPO reference every N optimizer steps; -1: once per "
                               "epoch of prompts (authors: 108, about one epoch); 0: never")
    temperature: float = _f(0.7, "sampling temperature for segments (authors: 0.7)")
    top_p: float = _f(0.95, "nucleus sampling for segments (authors: 0.95)")
    top_k: int = _f(50, "top-k sampling for segments (authors: 50)")
    generator_dtype: str = _f("auto", "weights that write segments: auto = a bf16 copy where bf16 is native (CUDA, "
                              "AVX512-BF16, AMX) or training is bf16, else fp32", choices=("auto", "fp32", "bf16"))
    # optimisation
    lr: float = _f(1e-6, "peak learning rate (authors: 5e-7 DPO/RMSprop, 5e-6 ORPO/AdamW, at 7-8B)")
    optimizer: str = _f("adamw", "adamw | rmsprop (authors' DPO) | sgd", choices=("adamw", "rmsprop", "sgd"))
    weight_decay: float = _f(0.0, "decoupled weight decay (AdamW)")
    schedule: str = _f("linear", "learning-rate schedule after warmup",
                       choices=("linear", "cosine", "constant", "inverse_sqrt"))
    warmup_ratio: float = _f(0.1, "fraction of --max-steps spent warming up linearly (authors: 0.1)")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    batch_size: int = _f(4, "prompts per micro-batch (fresh negatives, and tuples sampled, per micro-batch)")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_steps: int = _f(20, "optimizer steps to run")
    max_length: int = _f(512, "longest prompt + response in tokens; longer examples are skipped (authors: 2048)")
    max_prompt_length: int = _f(384, "longest prompt in tokens; longer prompts are skipped (authors: 1792)")
    precision: str = _f("fp32", "fp32 | bf16-mixed (fp32 weights, bf16 autocast; keep fp32 for the bundled model, "
                        "whose 4-bit-grid weights make bf16 diverge: README) | bf16 (bf16 weights)",
                        choices=("fp32", "bf16-mixed", "bf16"))
    device: str = _f("auto", "cpu | cuda | cuda:N | auto")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = _f(False, "allow models whose code lives in their hub repository")
    # logging and checkpoints
    log_every: int = _f(1, "print a metrics line every N steps (all steps go to metrics.jsonl)")
    num_samples: int = _f(8, "example negatives written to samples.jsonl")
    save_steps: int = _f(20, "write a resumable checkpoint every N steps (0: only at the end; -1: never)")
    keep_checkpoints: int = _f(1, "how many checkpoints to keep")
    eval_steps: int = _f(5, "also score the held-out prompts every N steps into metrics.jsonl and metrics.png (the "
                         "log-prob and reward measures, one forward; instruction following: before/after); 0: at end")
    report_to: str = _f("none", "also write the metrics as TensorBoard scalars to <output-dir>/tensorboard",
                        choices=("none", "tensorboard"))
    on_nonfinite: str = _f("skip", "a NaN/inf loss or gradient: skip that optimizer step (counted in metrics as "
                           "nonfinite/skipped) or stop with a message", choices=("skip", "stop"))


# --- 2. Data: rows -> examples as token ids (x in the chat format, y+ ending with EOS) -----------------------------

@dataclass
class Example:
    prompt_ids: list[int]      # x, already in the chat format, ending where the assistant starts
    chosen_ids: list[int]      # y+, ending with EOS
    rejected_ids: list[int] | None = None  # a dataset's own y- (unused by SAPO)
    constraints: list | None = None        # verifiable instructions, when the row has them (the bundled task)


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    """x as token ids. The model's chat template when it has one; else a plain documented format:
    'User: ...\\n\\nAssistant: ...\\n\\n' per turn, ending with 'Assistant:' (gpt2 and other base models)."""
    if tok.chat_template:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids  # the template already holds BOS if the model wants one
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
    return tok(text).input_ids


def encode_response(tok, text: str) -> list[int]:
    """y as token ids + EOS. Plain-format responses start with a space after 'Assistant:'."""
    text = text if tok.chat_template else " " + text.lstrip()
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def load_examples(source: str, tok, max_length: int, max_prompt_length: int, split: str = "train",
                  verbose: bool = True, columns: str = "") -> list[Example]:
    """Read, validate and tokenise a dataset; skip (and count) prompts or examples that are too long."""
    examples, too_long_prompt, too_long = [], 0, 0
    for where, row, (prompt, chosen, rejected) in parse_rows(read_rows(source, split), columns):
        x = encode_prompt(tok, prompt)
        y_pos = encode_response(tok, chosen)
        if len(x) > max_prompt_length:
            too_long_prompt += 1
        elif len(x) + len(y_pos) > max_length:
            too_long += 1
        else:
            examples.append(Example(x, y_pos, encode_response(tok, rejected) if rejected else None,
                                    row.get("constraints") if isinstance(row.get("constraints"), list) else None))
    if verbose and (too_long_prompt or too_long):
        print(f"{source}: skipped {too_long_prompt} prompts longer than --max-prompt-length={max_prompt_length} "
              f"and {too_long} examples longer than --max-length={max_length}; kept {len(examples)}", flush=True)
    if not examples:
        raise UserError(f"{source}: no usable examples (all {too_long_prompt + too_long} are too long for "
                        f"--max-prompt-length={max_prompt_length} / --max-length={max_length})")
    return examples


def load_data(cfg: Config, tok, needs_rejected: bool) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples). Held-out prompts come from --eval-dataset (or the bundled
    held-out file), else --eval-size prompts are held out of a shuffled --dataset and never trained on."""
    examples = load_examples(cfg.dataset, tok, cfg.max_length, cfg.max_prompt_length, cfg.dataset_split,
                             columns=cfg.columns)
    if needs_rejected and any(e.rejected_ids is None for e in examples):
        raise UserError(f"{cfg.dataset}: --method {cfg.method} needs a 'rejected' response in every row")
    eval_source = cfg.eval_dataset or (str(BUNDLED_HELDOUT) if Path(cfg.dataset) == BUNDLED_TRAIN else "")
    if eval_source:
        held_out = load_examples(eval_source, tok, cfg.max_length, cfg.max_prompt_length, verbose=False,
                                 columns=cfg.columns if cfg.eval_dataset else "")
        return examples, held_out[: cfg.eval_size]
    random.Random(cfg.seed).shuffle(examples)
    n_eval = min(cfg.eval_size, len(examples) // 5)
    return examples[: len(examples) - n_eval], examples[len(examples) - n_eval:]


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad (prompt, response) pairs. loss_mask marks response tokens: prompt and padding never count."""
    T = max(len(x) + len(y) for x, y in pairs)
    ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), T), dtype=torch.long)
    loss_mask = torch.zeros((len(pairs), T), dtype=torch.bool)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x) + len(y)] = torch.tensor(x + y)
        attn[i, : len(x) + len(y)] = 1
        loss_mask[i, len(x): len(x) + len(y)] = True
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss_mask.to(device)}


# --- 3. Per-sequence log-probabilities -----------------------------------------------------------------------------

def logps_from_logits(logits, targets, rows, batch_size: int):
    """Per-sequence sums of token log-probs: logits (N, V) at N response positions, their next tokens (N,),
    and the row each belongs to (N,) -> (B,). cross_entropy fuses log_softmax + gather, so no second
    (N, V) tensor is kept. Shared with scale/ (torchtune models return logits, not hidden states)."""
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")              # (N,)
    return torch.zeros(batch_size, device=logits.device).index_add(0, rows, token_logps)


def response_targets(input_ids, loss_mask):
    """(target_mask (B, T-1), targets (N,), rows (N,)): position t predicts token t+1; only response tokens count."""
    target_mask = loss_mask[:, 1:]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(target_mask)[target_mask]
    return target_mask, input_ids[:, 1:][target_mask], rows


def sequence_logps(model, input_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log pi(y_t | x, y_<t) over response tokens, and their count, per sequence: (B,), (B,).

    The output layer runs only on the N response positions, so the one full-vocabulary tensor alive is
    (N, V), not (B, T, V): at V = 49k-128k the logits dominate memory otherwise. Sum vs mean is the
    caller's choice: DPO sums (so a shared prefix cancels), ORPO averages (sum / count)."""
    target_mask, targets, rows = response_targets(input_ids, loss_mask)   # (B, T-1), (N,), (N,)
    if head_only_ok(model):
        h = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        logits = model.get_output_embeddings()(h[:, :-1][target_mask])                             # (N, V)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][target_mask]
    return logps_from_logits(logits, targets, rows, input_ids.shape[0]), target_mask.sum(-1)


def shared_prefix_len(y_pos: list[int], y_neg: list[int]) -> int:
    """k: how many leading tokens y+ and y- share, capped so that each keeps >= 1 token of its own."""
    k = 0
    while k < min(len(y_pos), len(y_neg)) - 1 and y_pos[k] == y_neg[k]:
        k += 1
    return k


def shared_prefix_layout(batch: list[dict], pad_id: int, pack: bool = True) -> dict:
    """One segment [x, y+[:k], y+[k:], y-[k:]] per tuple: y-[k:] sits after y+ but attends only to the shared part and
    to itself, its positions continuing from the shared part. Segments are packed first-fit, longest first, into rows
    as long as the longest (block-diagonal mask, positions restarting per segment): less padding, the same sums.
    CPU tensors: ids, pos (rows, T), allow (rows, T, T) bool, and per scored token (N,): its tuple, its row, the
    position whose logits predict it, the target, whether it counts for y+ / y-."""
    plan = []
    for b in batch:
        x, y_pos, y_neg = b["prompt_ids"], b["chosen_ids"], b["rejected_ids"]
        k = shared_prefix_len(y_pos, y_neg)
        plan.append((x + y_pos + y_neg[k:], len(x), len(x) + k, len(y_pos) - k, len(y_neg) - k))
    T, place, used = max(len(p[0]) for p in plan), {}, []     # place: tuple -> (row, offset); used: row -> length
    for i in sorted(range(len(plan)), key=lambda i: -len(plan[i][0])) if pack else range(len(plan)):
        E = len(plan[i][0])
        j = next((j for j, u in enumerate(used) if pack and u + E <= T), None)
        if j is None:                                              # no row has room: open one
            j, used = len(used), used + [0]
        place[i], used[j] = (j, used[j]), used[j] + E
    ids, pos = torch.full((len(used), T), pad_id, dtype=torch.long), torch.zeros((len(used), T), dtype=torch.long)
    allow = torch.eye(T, dtype=torch.bool).repeat(len(used), 1, 1)  # padding attends to itself: no all-masked rows
    h_at, target_at, tuple_of, row_of, is_pos, is_neg = [], [], [], [], [], []  # one entry per scored token
    for i, (r, P, S, C, R) in enumerate(plan):   # P = |x|, S = |x| + k shared, C own y+ tokens, R own y- tokens
        (j, o), E = place[i], S + C + R              # row j from offset o; E = len(r)
        ids[j, o: o + E], a = torch.tensor(r), allow[j, o: o + E, o: o + E]   # a: a view of this segment's block
        pos[j, o: o + S + C], pos[j, o + S + C: o + E] = torch.arange(S + C), torch.arange(S, S + R)
        a[: S + C, : S + C] = torch.ones(S + C, S + C, dtype=torch.bool).tril()
        a[S + C:, :S] = True
        a[S + C:, S + C:] = torch.ones(R, R, dtype=torch.bool).tril()
        h = list(range(P - 1, S + C - 1)) + [S - 1] + list(range(S + C, S + C + R - 1))  # y-'s 1st own token: S - 1
        h_at, target_at = h_at + [o + v for v in h], target_at + r[P: S + C] + r[S + C:]
        tuple_of, row_of = tuple_of + [i] * len(h), row_of + [j] * len(h)
        is_pos += [True] * (S + C - P) + [False] * R
        is_neg += [True] * (S - P) + [False] * C + [True] * R
    t = torch.tensor
    return {"ids": ids, "pos": pos, "allow": allow, "tuple_of": t(tuple_of), "row_of": t(row_of), "h_at": t(h_at),
            "targets": t(target_at), "is_pos": t(is_pos, dtype=torch.bool), "is_neg": t(is_neg, dtype=torch.bool),
            "n_pos": t([len(b["chosen_ids"]) for b in batch]), "n_neg": t([len(b["rejected_ids"]) for b in batch])}


def shared_prefix_logps(model, batch: list[dict], pad_id: int, device):
    """preference_logps with the shared prefix computed once: (sum+, sum-, n+, n-), each (B,).

    y+ and y- share x and a prefix y+[:k] (SAPO: k >= t; offline pairs: at least x), so each tuple is one segment of
    a row (shared_prefix_layout, a 4D mask; short segments share rows). The logits of the shared tokens count for
    both sums. Same numbers as two rows per tuple up to float rounding; 0.6-0.7x the tokens through the model."""
    L = {k: v.to(device) for k, v in shared_prefix_layout(batch, pad_id).items()}
    kind = torch.device(device).type                              # the mask in the dtype attention runs in
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else next(model.parameters()).dtype
    mask = torch.zeros(L["allow"].shape, dtype=dtype, device=device).masked_fill_(~L["allow"], torch.finfo(dtype).min)
    hidden = model.base_model(input_ids=L["ids"], attention_mask=mask[:, None], position_ids=L["pos"]).last_hidden_state
    logits = model.get_output_embeddings()(hidden[L["row_of"], L["h_at"]]).float()                       # (N, V)
    token_logps = -F.cross_entropy(logits, L["targets"], reduction="none")
    zeros = torch.zeros(len(batch), device=token_logps.device)
    return (zeros.index_add(0, L["tuple_of"][L["is_pos"]], token_logps[L["is_pos"]]),
            zeros.index_add(0, L["tuple_of"][L["is_neg"]], token_logps[L["is_neg"]]), L["n_pos"], L["n_neg"])


# The check's tuples: the first one's y- keeps 3 tokens of its own, so its own positions are scored too (they must not
# see y+[k:]); the two short ones share a packed row (they must not see each other, their positions restarting at 0).
SHARED_PREFIX_PROBE = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5, 6, 7], "rejected_ids": [4, 8, 9, 10]},
                       *[{"prompt_ids": [11, 12], "chosen_ids": [13, 14], "rejected_ids": [13, 15]}] * 2]


def _shared_prefix_ok(model) -> bool:
    """Does the model honour a 4D attention mask and position_ids? Checked once per model: shared_prefix_logps
    against the two-row forward on SHARED_PREFIX_PROBE (fails for attention kernels that ignore custom masks)."""
    if not hasattr(model, "_sapo_shared_prefix"):
        ok = head_only_ok(model)
        if ok:
            V = model.config.vocab_size
            pair = [{k: [i % V for i in ids] for k, ids in p.items()} for p in SHARED_PREFIX_PROBE]
            device, was_training, _ = next(model.parameters()).device, model.training, model.eval()
            try:
                with torch.no_grad(), torch.autocast(device.type, enabled=False):
                    mine = shared_prefix_logps(model, pair, 0, device)[:2]
                    model._sapo_shared_prefix = False                     # the reference path below
                    plain = preference_logps(model, pair, 0, device)[:2]
                ok = all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(mine, plain))
            except (TypeError, ValueError, RuntimeError):                 # the model rejects the arguments
                ok = False
            model.train(was_training)
        model._sapo_shared_prefix = ok
    return model._sapo_shared_prefix


# --- 4. Losses: pure functions of per-sequence log-probs -----------------------------------------------------------

def dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, beta: float):
    """DPO (Rafailov et al. 2023) on *summed* log-probs; returns (loss, rewards_pos, rewards_neg).

        r(y)  = beta * (log pi(y|x) - log pi_ref(y|x))          implicit reward
        loss  = -log sigmoid(r(y+) - r(y-)),  averaged over the batch

    With sums, the shared prefix y+[:t] of a SAPO negative cancels exactly in log pi(y+) - log pi(y-),
    so the loss sees only the regenerated segment and the (re-conditioned) suffix."""
    rewards_pos = beta * (pi_pos - ref_pos)
    rewards_neg = beta * (pi_neg - ref_neg)
    loss = -F.logsigmoid(rewards_pos - rewards_neg).mean()
    return loss, rewards_pos.detach(), rewards_neg.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012): log(-expm1(x)) near 0, log1p(-e^x) far.
    Each branch gets a safe input where it is not selected: torch.where still back-propagates through
    both, and an inf in the unused branch would turn the gradient into NaN."""
    far = x < -math.log(2)
    near_value = torch.log(-torch.expm1(torch.where(far, -1.0, x)))
    far_value = torch.log1p(-torch.exp(torch.where(far, x, -1.0)))
    return torch.where(far, far_value, near_value)


def orpo_loss(avg_pos, avg_neg, nll_pos, lam: float):
    """ORPO (Hong et al. 2024) on *length-averaged* log-probs lp; returns (loss, log_odds, rewards_pos, rewards_neg).

        odds(y)  = p / (1 - p) with p = exp(lp)   =>   log odds(y) = lp - log(1 - e^lp)
        log_odds = log odds(y+) - log odds(y-)
        loss     = NLL(y+) - lambda * mean(log sigmoid(log_odds))

    nll_pos is the token-mean NLL of the chosen responses (prompt and padding masked)."""
    log_odds = (avg_pos - avg_neg) - (log1mexp(avg_pos) - log1mexp(avg_neg))
    loss = nll_pos - lam * F.logsigmoid(log_odds).mean()
    return loss, log_odds.detach(), lam * avg_pos.detach(), lam * avg_neg.detach()


# --- 5. The EMA generator ------------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema_model, policy, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta. Called once per optimizer step, before it."""
    for p_ema, p in zip(ema_model.parameters(), policy.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)   # lerp(a, b, w) = a + w*(b - a)


@torch.no_grad()
def copy_weights(dst, src) -> None:
    """dst <- src (the reference refresh, and EMA initialisation)."""
    for p_dst, p_src in zip(dst.parameters(), src.parameters()):
        p_dst.copy_(p_src)


# --- 6. Truncation and segment regeneration ------------------------------------------------------------------------

def truncation_point(len_pos: int, len_prompt: int, segment_len: int, max_length: int, rng: random.Random):
    """(t, G) for one y+: G = min(segment_len, |y+|); t ~ U{0 .. min(|y+| - 3 - G, room)}, and t = 0 when that
    bound is <= 0 (short responses are regenerated whole, as in SPIN). room keeps |x| + t + G <= max_length."""
    G = min(segment_len, len_pos)
    hi = min(len_pos - 3 - G, max_length - len_prompt - G)
    return (rng.randint(0, hi) if hi > 0 else 0), G


def splice_negative(y_pos: list[int], t: int, G: int, segment: list[int], stop_ids) -> tuple[list[int], int]:
    """y- = y+[:t] + segment + y+[t+G:], or y+[:t] + segment up to and including its first EOS (no suffix).
    Returns (y-, number of segment tokens kept)."""
    for i, token in enumerate(segment[:G]):
        if token in stop_ids:
            return y_pos[:t] + segment[: i + 1], i + 1
    segment = segment[:G]
    return y_pos[:t] + segment + y_pos[t + G:], len(segment)


@torch.no_grad()
def generate_segments(model, contexts: list[list[int]], max_new_tokens: list[int], pad_id: int, stop_ids,
                      temperature=0.7, top_p=0.95, top_k=50, do_sample=True, dtype=None) -> list[list[int]]:
    """Continue every context by up to max_new_tokens[i] tokens: one batched, KV-cached generate call on left-padded
    contexts, weights in dtype (generation_copy), tokens drawn by TopKTopPSampler (transformers' distribution,
    computed over the top-k only; generate's argmax takes its pick). Rows stop at an EOS; the caller trims."""
    model = generation_copy(model, dtype)
    device = next(model.parameters()).device
    B, L = len(contexts), max(len(c) for c in contexts)
    ids, attn = torch.full((B, L), pad_id, dtype=torch.long), torch.zeros((B, L), dtype=torch.long)
    for i, c in enumerate(contexts):  # left padding, so every row's next token is at position L
        ids[i, L - len(c):] = torch.tensor(c)
        attn[i, L - len(c):] = 1
    was_training, frozen = model.training, [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    sampling = dict(logits_processor=[TopKTopPSampler(temperature, top_k, top_p)]) if do_sample else {}
    # Autocast caches bf16 weight copies only for leaves that require grad: a frozen generator (EMA, SPIN's) would
    # re-cast every weight at every decoding step. No graph is built (no_grad): requiring grad only turns the cache on.
    for p in frozen:
        p.requires_grad_(True)
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=False,
                             temperature=None, top_p=None, top_k=None, max_new_tokens=max(max_new_tokens),
                             pad_token_id=pad_id, eos_token_id=list(stop_ids), use_cache=True, **sampling)
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    return [row[L: L + n].tolist() for row, n in zip(out, max_new_tokens)]


def make_negatives(generator, examples: list[Example], segment_len: int, max_length: int, rng: random.Random,
                   pad_id, stop_ids, temperature=0.7, top_p=0.95, top_k=50, batch_size=None, dtype=None) -> list[dict]:
    """SAPO's self-augmented negatives: pick t, let the generator write G tokens after x + y+[:t], splice.
    Returns replay-buffer tuples with t and the kept segment length; batch_size rows per generate call."""
    tuples, per_call = [], batch_size or max(1, len(examples))
    for chunk in (examples[i: i + per_call] for i in range(0, len(examples), per_call)):
        plan = [truncation_point(len(e.chosen_ids), len(e.prompt_ids), segment_len, max_length, rng) for e in chunk]
        contexts = [e.prompt_ids + e.chosen_ids[:t] for e, (t, _) in zip(chunk, plan)]
        segments = generate_segments(generator, contexts, [G for _, G in plan], pad_id, stop_ids, temperature, top_p,
                                     top_k, dtype=dtype)
        for e, (t, G), seg in zip(chunk, plan, segments):
            y_neg, kept = splice_negative(e.chosen_ids, t, G, seg, stop_ids)
            tuples.append({"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": y_neg,
                           "t": t, "segment_len": kept, "times_sampled": 0})
    return tuples


# --- 7. The replay buffer ------------------------------------------------------------------------------------------

class ReplayBuffer:
    """FIFO buffer of (x, y+, y-) tuples; the oldest is evicted past `capacity`. Sampling is with
    replacement, either uniform or weighted 1/(times_sampled + 1), which favours fresh and rarely used
    tuples (the authors' code). Counts live inside the tuples, so they survive save/load."""

    def __init__(self, capacity: int, sampling: str = "weighted"):
        self.capacity, self.sampling = capacity, sampling
        self.items: deque[dict] = deque(maxlen=capacity)   # deque(maxlen) drops from the left: FIFO eviction

    def __len__(self):
        return len(self.items)

    def push(self, tuples: list[dict]) -> None:
        self.items.extend(tuples)

    def weights(self) -> list[float]:
        if self.sampling == "uniform":
            return [1.0] * len(self.items)
        return [1.0 / (item["times_sampled"] + 1) for item in self.items]

    def sample(self, n: int, rng: random.Random) -> list[dict]:
        picked = rng.choices(range(len(self.items)), weights=self.weights(), k=n)
        for i in picked:
            self.items[i]["times_sampled"] += 1
        return [self.items[i] for i in picked]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "sampling": self.sampling, "items": list(self.items)}

    def load_state_dict(self, state: dict) -> None:
        self.items = deque(state["items"], maxlen=self.capacity)


# --- 8. Loss on a sampled batch ------------------------------------------------------------------------------------

def autocast(cfg: Config, device):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16-mixed")


def preference_logps(model, batch: list[dict], pad_id: int, device, logps_fn=None):
    """(sum+, sum-, n+, n-), each (B,), for a batch of (x, y+, y-) tuples. With a transformers model that
    honours 4D masks (checked once per model), one shared-prefix segment per tuple (shared_prefix_logps);
    otherwise one concatenated forward over [y+ rows; y- rows]. logps_fn(model, **collated) replaces
    sequence_logps in the latter (scale/ passes its torchtune twin)."""
    if logps_fn is None and _shared_prefix_ok(model) and not beyond_window(model.config, batch):
        return shared_prefix_logps(model, batch, pad_id, device)
    pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch] + [(b["prompt_ids"], b["rejected_ids"]) for b in batch]
    logps, counts = (logps_fn or sequence_logps)(model, **collate(pairs, pad_id, device))
    B = len(batch)
    return logps[:B], logps[B:], counts[:B], counts[B:]


def batch_loss(loss_kind: str, cfg: Config, policy, ref_model, batch: list[dict], pad_id: int, device):
    """The loss ('dpo' | 'orpo' | 'sft') on a batch of (x, y+, y-) tuples, plus TRL/torchtune-named metrics."""
    if loss_kind == "sft":  # NLL of y+ only, token mean
        pairs = [(b["prompt_ids"], b["chosen_ids"]) for b in batch]
        logps, counts = sequence_logps(policy, **collate(pairs, pad_id, device))
        loss = -logps.sum() / counts.sum()
        return loss, {"loss": loss.item(), "logps/chosen": logps.detach().mean().item()}
    pi_pos, pi_neg, n_pos, n_neg = preference_logps(policy, batch, pad_id, device)
    if loss_kind == "dpo":
        with torch.no_grad():
            ref_pos, ref_neg, _, _ = preference_logps(ref_model, batch, pad_id, device)
        loss, r_pos, r_neg = dpo_loss(pi_pos, pi_neg, ref_pos, ref_neg, cfg.beta)
        extra = {}
    else:
        nll = -pi_pos.sum() / n_pos.sum()
        loss, log_odds, r_pos, r_neg = orpo_loss(pi_pos / n_pos, pi_neg / n_neg, nll, cfg.orpo_lambda)
        extra = {"nll_loss": nll.item(), "log_odds_ratio": F.logsigmoid(log_odds).mean().item(),
                 "log_odds_chosen": log_odds.mean().item()}
    return loss, preference_metrics(loss, r_pos, r_neg, pi_pos, pi_neg, extra)


def preference_metrics(loss, r_pos, r_neg, pi_pos, pi_neg, extra=None) -> dict:
    """The names TRL and torchtune users know."""
    return {"loss": loss.item(), "rewards/chosen": r_pos.mean().item(), "rewards/rejected": r_neg.mean().item(),
            "rewards/margins": (r_pos - r_neg).mean().item(),
            "rewards/accuracies": (r_pos > r_neg).float().mean().item(),
            "logps/chosen": pi_pos.detach().mean().item(), "logps/rejected": pi_neg.detach().mean().item(),
            **(extra or {})}


# --- 9. Evaluation on held-out prompts -----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(policy, eval_tuples: list[dict], pad_id: int, device, beta: float, start=None, batch_size: int = 8):
    """Held-out measures against fixed negatives (written once by the starting model pi_0):
      eval/rewards/*   DPO's implicit reward against the starting model, r(y) = beta*(log pi(y|x) - log pi_0(y|x)),
                       TRL's names: chosen, rejected, margins = r(y+) - r(y-), accuracies = share with r(y+) > r(y-).
                       They show how far training moved y+ above y- from where it began (all 0 at step 0), not
                       whether answers got better in absolute terms (instruction following measures that).
      eval/logps_*_per_token, eval/preference_accuracy (per-token log-prob of y+ above y-'s: ORPO's log-odds > 0),
      eval/log_odds_chosen (ORPO's log odds ratio of y+ over y-, per-token log-probs).
    start: pi_0's held-out (sum+, sum-) lists, None when the policy is pi_0; per_prompt: the values behind them."""
    was_training, _ = policy.training, policy.eval()
    parts = [preference_logps(policy, eval_tuples[i: i + batch_size], pad_id, device)
             for i in range(0, len(eval_tuples), batch_size)]
    policy.train(was_training)
    pi_pos, pi_neg, n_pos, n_neg = (torch.cat(p).float().cpu() for p in zip(*parts))
    start = start or (pi_pos.tolist(), pi_neg.tolist())
    avg_pos, avg_neg = pi_pos / n_pos, pi_neg / n_neg
    log_odds = (avg_pos - avg_neg) - (log1mexp(avg_pos) - log1mexp(avg_neg))
    r_pos, r_neg = beta * (pi_pos - torch.tensor(start[0])), beta * (pi_neg - torch.tensor(start[1]))
    return {"eval/rewards/chosen": r_pos.mean().item(), "eval/rewards/rejected": r_neg.mean().item(),
            "eval/rewards/margins": (r_pos - r_neg).mean().item(),
            "eval/rewards/accuracies": (r_pos > r_neg).float().mean().item(),
            "eval/logps_chosen_per_token": avg_pos.mean().item(),
            "eval/logps_rejected_per_token": avg_neg.mean().item(),
            "eval/preference_accuracy": (avg_pos > avg_neg).float().mean().item(),
            "eval/log_odds_chosen": log_odds.mean().item(),
            "per_prompt": {"logps_chosen": pi_pos.tolist(), "logps_rejected": pi_neg.tolist(),
                           "rewards_margin": (r_pos - r_neg).tolist(), "chosen_per_token": avg_pos.tolist()}}


def instruction_following(model, tok, examples: list[Example], stop_ids, max_new_tokens=128, batch_size=16) -> dict:
    """Greedy answers to prompts that carry verifiable constraints, scored by the bundled IFEval-lite checker:
    strict prompt-level accuracy (every constraint met) and loose instruction-level accuracy (IFEval's)."""
    from tasks.ifeval_lite import score
    rows = [e for e in examples if e.constraints]
    responses = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        outs = generate_segments(model, [e.prompt_ids for e in chunk], [max_new_tokens] * len(chunk),
                                 tok.pad_token_id, stop_ids, do_sample=False)
        responses += [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    s = score(responses, [{"constraints": e.constraints} for e in rows])
    return {"eval/prompt_strict_acc": s["prompt_strict_acc"],
            "eval/instruction_loose_acc": s["instruction_loose_acc"], "responses": responses}


def evaluate_model(cfg: Config) -> dict:
    """--eval-only: score a saved or hub model on held-out prompts, with nothing trained or written."""
    tok, device = load_tokenizer(cfg.model, cfg.trust_remote_code), pick_device(cfg.device)
    source = cfg.eval_dataset or str(BUNDLED_HELDOUT)
    examples = load_examples(source, tok, cfg.max_length, cfg.max_prompt_length, verbose=False,
                             columns=cfg.columns if cfg.eval_dataset else "")[: cfg.eval_size]
    model = load_model(cfg.model, torch.bfloat16 if cfg.precision == "bf16" else torch.float32, device,
                       cfg.trust_remote_code).eval()
    batches = [[(e.prompt_ids, e.chosen_ids) for e in examples[i: i + cfg.batch_size]]
               for i in range(0, len(examples), cfg.batch_size)]
    with torch.no_grad():
        sums = [sequence_logps(model, **collate(pairs, tok.pad_token_id, device)) for pairs in batches]
    logps, counts = (torch.cat(t) for t in zip(*sums))
    result = {"model": cfg.model, "eval_dataset": source, "n_prompts": len(examples),
              "eval/logps_chosen_per_token": (logps / counts).mean().item()}
    if any(e.constraints for e in examples):
        result.update(instruction_following(model, tok, examples, stop_token_ids(model, tok), cfg.eval_max_new_tokens))
    return result


# --- 10. The training loop -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """A method as a configuration of the one loop below: which loss, where negatives come from, and
    whether the loss batch is sampled from the replay buffer or is the fresh batch itself."""
    loss: str             # dpo | orpo | sft
    negatives: str        # ema | policy (written online) | frozen (SPIN) | dataset (offline) | none
    whole_response: bool  # regenerate y+ from t = 0 with no suffix, instead of a segment
    use_buffer: bool
    ref_source: str       # what the DPO reference is refreshed from: ema | policy | fixed (never) | none (no reference)


def method_recipe(cfg: Config) -> Recipe:
    online = dict(negatives=cfg.generator, whole_response=cfg.whole_response, use_buffer=cfg.use_buffer)
    return {"sapo-dpo": Recipe("dpo", ref_source=cfg.generator, **online),
            "sapo-orpo": Recipe("orpo", ref_source="none", **online),
            "sft": Recipe("sft", "none", False, False, "none"),
            "dpo": Recipe("dpo", "dataset", False, False, "fixed"),
            "orpo": Recipe("orpo", "dataset", False, False, "none"),
            "spin": Recipe("dpo", "frozen", True, False, "policy")}[cfg.method]


def refresh_due(recipe: Recipe, step: int, ref_every: int, spin_every: int = 0) -> bool:
    """Is the DPO reference refreshed at the start of this step (step = optimizer steps done)? As the authors:
    at every multiple of ref_every, after the step's EMA update, before its loss (step 0 would copy the EMA onto
    an identical reference, so it is skipped)."""
    return (recipe.ref_source in ("ema", "policy") and not spin_every and ref_every > 0 and step > 0
            and step % ref_every == 0)


def offline_tuples(examples: list[Example]) -> list[dict]:
    """(x, y+, y-) tuples from the dataset's own rejected responses (offline DPO / ORPO)."""
    return [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids or [],
             "t": 0, "segment_len": len(e.rejected_ids or []), "times_sampled": 0} for e in examples]


def frozen_copy(model):
    return copy.deepcopy(model).eval().requires_grad_(False)


def train(cfg: Config, on_step=None) -> dict:
    """Run a method as configured; returns the before/after evaluation and the last step's metrics. on_step(step,
    policy, metrics) runs after every optimizer step (and its checkpoint); it must not touch weights or draw RNG."""
    recipe, out, device = method_recipe(cfg), Path(cfg.output_dir), pick_device(cfg.device)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)                                   # truncation points and buffer sampling
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    examples, eval_examples = load_data(cfg, tok, recipe.negatives == "dataset")  # bad data fails before any write
    with StopSignals() as stop, prepare_output_dir(out, cfg.resume, cfg.overwrite, dataclasses.asdict(cfg)):
        # -- the policy pi_theta; the EMA generator (SAPO); the reference pi_ref (DPO; SPIN's frozen generator)
        policy = load_model(cfg.model, torch.bfloat16 if cfg.precision == "bf16" else torch.float32, device,
                            cfg.trust_remote_code, cfg.gradient_checkpointing)
        dropout_rates = disable_dropout(policy)                     # as TRL and the authors (copies inherit it)
        ema_model = frozen_copy(policy) if recipe.negatives == "ema" else None
        ref_model = frozen_copy(policy) if recipe.ref_source != "none" else None
        models = {k: m for k, m in dict(policy=policy.train(), ema=ema_model, ref=ref_model).items() if m is not None}
        pad_id, stop_ids = tok.pad_token_id, stop_token_ids(policy, tok)
        G = cfg.max_length if recipe.whole_response else cfg.segment_len   # whole: G = |y+|  =>  t = 0, no suffix
        gen = dict(segment_len=G, max_length=cfg.max_length, pad_id=pad_id, stop_ids=stop_ids, top_k=cfg.top_k,
                   top_p=cfg.top_p, temperature=cfg.temperature,
                   dtype=generation_dtype(cfg.generator_dtype, cfg.precision, device))
        ref_every = (math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum)) if cfg.ref_update_steps == -1
                     else cfg.ref_update_steps)                     # -1: once per epoch of prompts
        spin_every = math.ceil(cfg.max_steps / cfg.spin_iterations) if recipe.negatives == "frozen" else 0
        optimizer = make_optimizer(cfg, [p for p in policy.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        buffer, stream = ReplayBuffer(cfg.buffer_capacity, cfg.buffer_sampling), PromptStream(len(examples), cfg.seed)
        # held-out negatives: written once by the starting model, with their own seed, so every eval compares alike
        eval_tuples = make_negatives(policy, eval_examples, rng=random.Random(cfg.seed + 1), **gen)
        step, before, spin_negatives, skipped = 0, None, [], 0
        if cfg.resume and (resume_from := latest_checkpoint(out / "checkpoints")):
            js = load_checkpoint(resume_from, models, {"optimizer": optimizer, "scheduler": scheduler}, rng, device)
            step, before, spin_negatives, skipped = js["step"], js["before"], js["spin_negatives"], js["skipped"]
            buffer.load_state_dict(js["buffer"])
            stream = PromptStream(len(examples), cfg.seed, *js["stream"])
        else:
            before = run_eval(cfg, policy, tok, eval_tuples, eval_examples, None, stop_ids, full=True)
        start = (before["per_prompt"]["logps_chosen"], before["per_prompt"]["logps_rejected"]) if before else None
        stop.phase = "training"     # set up: from here a signal finishes the step and checkpoints (before: stops)
        log, n_samples = MetricsLog(out, step, cfg.report_to), trim_jsonl(out / "samples.jsonl", step)

        def checkpoint():   # what a checkpoint holds, declared here; sapo_io decides how it is written
            tensors, python_rng = rng_state(rng, device)
            save_checkpoint(out / "checkpoints", step, models, {"optimizer": optimizer, "scheduler": scheduler,
                            **tensors}, {"step": step, "before": before, "buffer": buffer.state_dict(),
                            "stream": [stream.epoch, stream.pos], "python_rng": python_rng,
                            "spin_negatives": spin_negatives, "skipped": skipped}, cfg.keep_checkpoints)

        metrics, bar = {}, tqdm(total=cfg.max_steps, initial=step, desc=cfg.method, dynamic_ncols=True, disable=None)
        while step < cfg.max_steps:
            t0, accum, gen_tokens, gen_time = time.perf_counter(), [], 0, 0.0
            if spin_every and step % spin_every == 0:     # SPIN iteration: a frozen copy writes every y-, whole
                copy_weights(ref_model, policy)
                spin_negatives = make_negatives(ref_model, examples, rng=rng, batch_size=cfg.batch_size, **gen)
            # (1) EMA update, before this step's gradient update: theta_ema <- b*theta_ema + (1-b)*theta
            if ema_model is not None:
                ema_update(ema_model, policy, cfg.ema_decay)
            # (2) SAPO-DPO: every ref_every steps, right after that EMA update, pi_ref <- EMA (authors: 108 steps)
            if refresh_due(recipe, step, ref_every, spin_every):
                copy_weights(ref_model, models[recipe.ref_source])
            optimizer.zero_grad(set_to_none=True)
            for _ in range(cfg.grad_accum):
                # (3) a fresh batch of (x, y+): truncate y+ at t, the EMA writes G tokens, splice -> (x, y+, y-)
                fresh, tg = stream.next(cfg.batch_size), time.perf_counter()
                if recipe.negatives in ("ema", "policy"):
                    with autocast(cfg, device):
                        tuples = make_negatives(ema_model or policy, [examples[i] for i in fresh], rng=rng, **gen)
                    gen_tokens += sum(t["segment_len"] for t in tuples)
                else:                                     # SPIN's frozen negatives, or the dataset's own
                    tuples = ([spin_negatives[i] for i in fresh] if spin_every
                              else offline_tuples([examples[i] for i in fresh]))
                gen_time += time.perf_counter() - tg
                # (4) push them into the replay buffer; (5) the loss batch is sampled from it
                if recipe.use_buffer:
                    buffer.push(tuples)
                    batch = buffer.sample(cfg.batch_size, rng)
                else:
                    batch = tuples
                # (6) the loss on the sampled batch: DPO against pi_ref, or ORPO; backward
                with autocast(cfg, device):
                    loss, m = batch_loss(recipe.loss, cfg, policy, ref_model, batch, pad_id, device)
                (loss / cfg.grad_accum).backward()
                accum.append(m)
                n_samples += append_samples(out / "samples.jsonl", tok, tuples if recipe.negatives != "none" else [],
                                            step + 1, cfg.num_samples - n_samples)
            # (7) the optimizer step; a NaN/inf loss or gradient skips it (or stops the run)
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or math.inf).item()
            if math.isfinite(grad_norm) and all(math.isfinite(m["loss"]) for m in accum):
                optimizer.step()
            elif cfg.on_nonfinite == "stop":
                raise UserError(f"non-finite loss or gradient at step {step + 1} (loss {[m['loss'] for m in accum]})"
                                "; lower --lr, or pass --on-nonfinite skip; the last checkpoint is intact")
            else:                                         # skip: the weights stay as they were, the step counts
                skipped += 1
            scheduler.step()
            step += 1
            metrics = {k: sum(m[k] for m in accum) / len(accum) for k in accum[0]}
            metrics.update({"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                            "nonfinite/skipped": skipped, "buffer/size": len(buffer),
                            "gen/tokens_per_s": gen_tokens / max(gen_time, 1e-9),
                            "time/step_s": time.perf_counter() - t0})
            if step == cfg.max_steps or (cfg.eval_steps and step % cfg.eval_steps == 0):
                metrics.update(run_eval(cfg, policy, tok, eval_tuples, eval_examples, start, stop_ids, False) or {})
            log.write(metrics, echo=bar.write if step % cfg.log_every == 0 else None)
            bar.update(1)
            if saved := stop.signum or (cfg.save_steps >= 0 and (step == cfg.max_steps or
                                                                 (cfg.save_steps and step % cfg.save_steps == 0))):
                checkpoint()
            if on_step is not None:
                on_step(step, policy, metrics)
            if stop.signum and saved and step < cfg.max_steps:   # (a signal during on_step: the next step stops)
                raise Stopped.after_step(stop.signum, step, out / "checkpoints")
        bar.close()
        stop.phase = "finishing"    # a signal now lets the final save and evaluation complete (exit 0)
        save_final(policy, tok, out / "final", dropout_rates)
        after = run_eval(cfg, policy, tok, eval_tuples, eval_examples, start, stop_ids, full=True)
        log.close()
        return write_summary(out, tok, eval_examples, before, after, metrics)


def run_eval(cfg: Config, policy, tok, eval_tuples, eval_examples, start, stop_ids, full: bool) -> dict | None:
    """evaluate() on the held-out tuples (start None: the policy is the starting model); with full, also
    instruction-following accuracy where rows carry constraints (greedy generation: before and after only)."""
    if not eval_tuples:
        return None
    device = next(policy.parameters()).device
    with autocast(cfg, device):
        result = evaluate(policy, eval_tuples, tok.pad_token_id, device, cfg.beta, start, cfg.batch_size)
        if full and any(e.constraints for e in eval_examples):
            result.update(instruction_following(policy, tok, eval_examples, stop_ids, cfg.eval_max_new_tokens))
    return result if full else {k: v for k, v in result.items() if k.startswith("eval/")}


# --- 11. Command line ----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    cfg = parse_args(Config, argv, "SAPO: Self-Augmented Preference Optimization (one file).",
                     epilog="held-out evaluation (before/after, and every --eval-steps):\n" + evaluate.__doc__)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # keep the terminal for our own progress bar and metrics
    try:
        check_config(cfg)
        if cfg.eval_only:
            print(json.dumps({k: v for k, v in evaluate_model(cfg).items() if k != "responses"}, indent=1))
            return 0
        summary = train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as e:   # KeyboardInterrupt: Ctrl-C while reading data, before the handlers
        print(str(e) or "interrupted (SIGINT) before the run started; nothing was written", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
