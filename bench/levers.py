"""The A/B of each lever on sapo.py's training step and segment generation, alternating (rotating order) on the
same batch and weights so that machine drift cancels; medians. Uses bench/perf.py's batch, config and timers.

    python bench/levers.py --reps 3 --compile-lever     # ~11 minutes on 2 idle cores; writes bench/perf_levers.json
    python bench/levers.py --quick                      # tiny settings, one repetition (tests/test_perf.py)

1. our fp32 DPO step: sapo.py as it runs (shared-prefix tuples packed into rows), two rows per pair, one
   shared-prefix row per tuple (not packed), each with PyTorch's AdamW and its fused form;
2. bf16-mixed numerics against fp32 on the same weights, with and without an fp32 output layer;
3. segment generation (sapo.make_negatives on a frozen copy, as the EMA generates): rows per call, the bf16 copy,
   transformers' static KV cache and (--compile-lever) a compiled decoding step, the time split of one call into
   prefill, decoding forwards and the rest, and the bounds (one bare decoding step, its matmuls alone, one copy of
   the weights).

Prints the command line first, then markdown tables; writes bench/perf_levers.json (--out). Nothing here changes
sapo.py: its functions are imported and timed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import sapo  # noqa: E402
import sapo_fast  # noqa: E402
import sapo_utils.models  # noqa: E402
from bench.perf import (FAST_GENERATE, SAMPLING, batch_stats, generate_kwargs, load_batch, log, machine_info, make_config,  # noqa: E402
                        medians, optimizer_for, our_dpo_step, parse, timed_ops)


def run_levers(args) -> dict:
    """A/B the levers on our fp32 DPO step, alternating (rotating order) on the same batch and weights: sapo.py as it
    is (shared-prefix tuples packed into rows); two rows per pair ([y+ rows; y- rows], sapo.py before the shared
    prefix, and its fallback for models that ignore 4D masks); fused AdamW; both; one shared-prefix row per tuple
    (sapo.py before packing)."""
    res: dict = {"command": args.command, "mode": "levers", "machine": machine_info()}
    device = torch.device("cpu")
    policy, tok = sapo_utils.models.load_model_and_tokenizer(args.model)
    policy.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    batch, _ = load_batch(args, tok)
    stats, pad_id = batch_stats(batch), tok.pad_token_id
    cfg = make_config(args, "fp32")
    shared_ok = (sapo_fast.packing_ok(policy, sapo.preference_logps)
                 and sapo_fast.packing_ok(ref, sapo.preference_logps))
    layouts = {"packed": timed_ops(cfg, device), "two rows": timed_ops(cfg, device, two_rows=True),
               "unpacked": timed_ops(cfg, device, pack=False)}
    with torch.no_grad():                                 # every layout computes the same numbers
        a, b, c = (layouts[k].preference_logps(policy, batch, pad_id, device) for k in layouts)
    res["batch"], res["shared_prefix_supported"] = stats, shared_ok
    res["layouts_max_abs_logps_diff"] = max(float((x - y).abs().max()) for x, y in zip(a[:2], b[:2]))
    res["unpacked_max_abs_logps_diff"] = max(float((x - y).abs().max()) for x, y in zip(a[:2], c[:2]))
    fused = lambda: torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)  # noqa: E731
    configs = {"sapo.py as is (shared prefix, tuples packed into rows)": ("packed", optimizer_for(cfg, policy.parameters())),
               "two rows per pair": ("two rows", optimizer_for(cfg, policy.parameters())),
               "shared prefix + fused AdamW": ("packed", fused()),
               "two rows + fused AdamW": ("two rows", fused()),
               "shared prefix, one row per tuple (not packed)": ("unpacked", optimizer_for(cfg, policy.parameters()))}
    runs, names = {k: [] for k in configs}, list(configs)
    for r in range(args.warmup + args.reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            log(f"lever round {r + 1}/{args.warmup + args.reps}: {name}")
            kind, opt = configs[name]
            out = our_dpo_step(cfg, policy, ref, opt, batch, pad_id, device, layouts[kind])
            if r >= args.warmup:
                runs[name].append(out)
    base = medians(runs[names[0]])["step"]
    res["levers"] = {k: {**medians(v), "tokens_per_s": stats["real_tokens"] / medians(v)["step"],
                         "speedup": base / medians(v)["step"]} for k, v in runs.items()}
    res["bf16_numerics"] = bf16_numerics(args, policy, ref, batch, pad_id, device)
    res["generation"] = generation_levers(args, ref, tok, batch)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    return res


class _Fp32Head:
    """The output layer (and so the log-softmax input) in fp32 even inside a bf16 autocast region."""

    def __init__(self, model):
        self.head = model.get_output_embeddings()

    def __enter__(self):
        head = self.head

        def forward(x):
            with torch.autocast(x.device.type, enabled=False):
                return torch.nn.functional.linear(x.float(), head.weight.float(),
                                                  None if head.bias is None else head.bias.float())
        head.forward = forward

    def __exit__(self, *exc):
        del self.head.forward


def bf16_numerics(args, policy, ref, batch, pad_id, device) -> dict:
    """DPO loss and sequence log-probs on the same batch and (trained) weights: fp32, bf16-mixed as sapo.py runs it,
    and bf16-mixed with the output layer in fp32 (a proposed change). Forward only."""
    nb = min(args.bf16_pairs or 2, len(batch))
    out = {"pairs": nb}
    for mode in ("fp32", "bf16-mixed", "bf16-mixed, fp32 output layer"):
        cfg = make_config(args, "fp32" if mode == "fp32" else "bf16-mixed")
        log(f"bf16 numerics: {mode}")
        heads = (_Fp32Head(policy), _Fp32Head(ref)) if "fp32 output" in mode else ()
        with contextlib.ExitStack() as stack, torch.no_grad():
            for h in heads:
                stack.enter_context(h)
            with sapo.autocast(cfg, device):
                _, m = sapo.batch_loss("dpo", cfg, policy, ref, batch[:nb], pad_id, device,
                                     sapo.ops_for(cfg, device))
        out[mode] = {"loss": m["loss"], "logps": [m["logps/chosen"], m["logps/rejected"]],
                     "margin": m["rewards/margins"]}
    ref32 = out["fp32"]
    for mode in ("bf16-mixed", "bf16-mixed, fp32 output layer"):
        out[mode]["abs_loss_diff"] = abs(out[mode]["loss"] - ref32["loss"])
        out[mode]["max_rel_logps_diff"] = max(abs(a - b) / abs(b) for a, b in zip(out[mode]["logps"], ref32["logps"]))
        out[mode]["abs_margin_diff"] = abs(out[mode]["margin"] - ref32["margin"])
    return out


def generation_levers(args, model, tok, batch) -> dict:
    """Segment generation (sapo.make_negatives on a frozen fp32 copy, as the EMA generates), G = --segment-len:
    tokens/s by rows per generate call (sapo.py makes one call of batch_size rows per micro-batch); at 8 rows: the
    sampler (transformers' own over the whole vocabulary, as sapo.py did, vs TopKTopPSampler) with fp32 weights and
    with the bf16 copy, the bf16 copy at 16 and 32 rows, transformers' static KV cache, and (--compile-lever) a
    compiled decoding step; and the bounds, for fp32 and bf16 weights: one decoding step of the bare model (greedy,
    no generate plumbing) and the matmuls alone (every weight of the model times 8 rows, streamed from memory)."""
    from transformers.generation import CompileConfig
    examples = sapo.load_examples(args.dataset, tok, args.max_length, args.max_prompt_length, verbose=False)
    pad_id, stop_ids, G = tok.pad_token_id, sapo.stop_token_ids(model, tok), args.segment_len
    rows = [r for r in (4, 8, 16, 32) if r <= len(examples)]
    out: dict = {"segment_len": G, "by_rows": {}, "at_8_rows": {}}

    def timed(gen, n_rows, warmup=args.warmup, plain=False, **generate_kw):
        times, tokens, first = [], [], []
        generate = sapo.generate_segments if plain else FAST_GENERATE
        with generate_kwargs(gen, **generate_kw):
            for r in range(warmup + args.reps):
                rng = random.Random(r)
                torch.manual_seed(r)
                t = time.perf_counter()
                tuples = sapo.make_negatives(gen, examples[:n_rows], G, args.max_length, rng, pad_id, stop_ids,
                                             SAMPLING, generate=generate)
                (times if r >= warmup else first).append(time.perf_counter() - t)
                if r >= warmup:
                    tokens.append(sum(x["segment_len"] for x in tuples))
        s = statistics.median(times)
        return {"s": s, "tokens": statistics.median(tokens), "tokens_per_s": statistics.median(tokens) / s,
                "ms_per_position": 1e3 * s / G, "warmup_s": sum(first)}

    for n in rows:
        log(f"generation: {n} rows per call")
        out["by_rows"][n] = timed(model, n)
    n = min(8, len(examples))
    twin = copy.deepcopy(sapo_fast.generator_copy(model, torch.bfloat16))   # what --generator-dtype bf16 generates with
    for name, gen, plain in (("fp32, transformers' sampler (--plain)", model, True),
                             ("bf16 copy, transformers' sampler", twin, True),
                             ("bf16 copy, TopKTopPSampler (the default where bf16 is native)", twin, False)):
        log(f"generation: {name}")
        out["at_8_rows"][name] = timed(gen, n, plain=plain)
    out["split"] = generation_split(args, twin, examples[:n], pad_id, stop_ids)
    for rows_ in (16, 32):
        if rows_ <= len(examples):
            log(f"generation: bf16 copy, {rows_} rows")
            out["at_8_rows"][f"bf16 copy, TopKTopPSampler, {rows_} rows"] = {**timed(twin, rows_), "rows": rows_}
    compiled = CompileConfig(mode="default")    # reduce-overhead means CUDA graphs; transformers compiles on CPU
    compiled._compile_all_devices = True        # only when asked to (an attribute, not an __init__ argument)
    levers = [("static KV cache", model, {"cache_implementation": "static"}, 0),
              ("bf16 copy, static KV cache", twin, {"cache_implementation": "static"}, 0)]
    if args.compile_lever:       # the first calls compile, and a new prompt length recompiles once (then dynamic)
        levers.append(("bf16 copy, static KV cache + compiled decoding step", twin,
                       {"cache_implementation": "static", "compile_config": compiled}, 2))
    for name, gen, kw, extra_warmup in levers:
        log(f"generation: {name}")
        try:
            out["at_8_rows"][name] = timed(gen, n, args.warmup + extra_warmup, **kw)
        except Exception as e:      # a lever this transformers/torch cannot run here is reported, not fatal
            out["at_8_rows"][name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    # the bounds: a decoding step of the bare model at n rows, and its matmuls alone, in fp32 and in bf16
    ids = torch.tensor([e.prompt_ids[-16:] for e in examples[:n] if len(e.prompt_ids) >= 16][:n])
    for tag, m in (("", model), ("bf16_", twin)):
        out.update({tag + k: v for k, v in decoding_bounds(m, ids, 2 * G).items()})
    out["bound_rows"] = len(ids)
    return out


def generation_split(args, gen, examples, pad_id, stop_ids) -> dict:
    """Where one generate call's time goes (sapo.make_negatives as sapo.py runs it, medians over --reps calls): the
    prefill forward (the contexts' KV cache), the decoding forwards (one position each), and the rest (sampling,
    generate's plumbing, splicing). Each forward is timed by wrapping gen.forward, in this process only."""
    calls, original = [], gen.forward

    def forward(*a, **kw):
        t = time.perf_counter()
        out = original(*a, **kw)
        calls.append((time.perf_counter() - t, kw["input_ids"].shape[1] if "input_ids" in kw else a[0].shape[1]))
        return out
    gen.forward, runs = forward, []
    try:
        for r in range(args.warmup + args.reps):
            rng = random.Random(r)
            torch.manual_seed(r)
            calls.clear()
            t = time.perf_counter()
            sapo.make_negatives(gen, examples, args.segment_len, args.max_length, rng, pad_id, stop_ids, SAMPLING,
                                generate=FAST_GENERATE)
            total = time.perf_counter() - t
            prefill = sum(d for d, width in calls if width > 1)
            decode = [d for d, width in calls if width == 1]
            if r >= args.warmup:
                runs.append({"s": total, "prefill_s": prefill, "decode_s": sum(decode), "decode_steps": len(decode),
                             "rest_s": total - prefill - sum(decode)})
    finally:
        del gen.forward
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} | {"rows": len(examples)}


@torch.no_grad()
def decoding_bounds(model, ids, steps: int) -> dict:
    """ms per decoding step of the bare model at len(ids) rows (greedy, DynamicCache), the ms of its Linear matmuls
    alone at that many rows, and the ms to copy its Linear weights' bytes once."""
    from transformers import DynamicCache
    cache = DynamicCache()
    o = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt, t = o.logits[:, -1].argmax(-1, keepdim=True), time.perf_counter()
    for _ in range(steps):
        nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    out = {"bare_decoding_step_ms": 1e3 * (time.perf_counter() - t) / steps}
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {(w.shape[1], w.dtype): torch.randn(len(ids), w.shape[1], dtype=w.dtype) for w in weights}
    per = []
    for _ in range(3):
        t = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(x[w.shape[1], w.dtype], w)
        per.append(time.perf_counter() - t)
    out["matmuls_alone_ms"] = 1e3 * min(per)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    a, b = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
    per = []
    for _ in range(3):
        t = time.perf_counter()
        b.copy_(a)
        per.append(time.perf_counter() - t)
    out["weight_bytes"], out["copy_weights_once_ms"] = nbytes, 1e3 * min(per)
    return out


def report_levers(res) -> str:
    m, b = res["machine"], res["batch"]
    out = [f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads); load average "
           f"{m['loadavg_start']:.1f} at start, {m['loadavg_end']:.1f} at end",
           f"batch: {b['rows'] // 2} pairs; tokens through the model: two rows per pair {b['real_tokens']} real / "
           f"{b['padded_tokens']} padded as {b['rows']} rows; shared prefix {b['distinct_tokens']} real / "
           f"{b['distinct_padded_tokens']} padded as {b.get('distinct_rows', b['rows'] // 2)} rows; log-prob sums agree to "
           f"{res['layouts_max_abs_logps_diff']:.1e}", "",
           "| our fp32 DPO step | forward+backward s | optimizer s | step s | pair tokens/s | speed vs sapo.py |",
           "|---|---|---|---|---|---|"]
    for k, v in res["levers"].items():
        out.append(f"| {k} | {v['forward_backward']:.2f} | {v['optimizer']:.2f} | {v['step']:.2f} | {v['tokens_per_s']:.0f} | "
                   f"{v['speedup']:.2f}x |")
    if "packed_rows" in res:    # a run from before sapo.py packed (bench/perf_levers*.json of earlier versions)
        out += ["", f"packed: the {b['rows'] // 2} shared-prefix rows as {res['packed_rows']} rows of "
                f"{res['packed_padded_tokens'] // res['packed_rows']} positions ({res['packed_padded_tokens']} padded, vs "
                f"{b['distinct_padded_tokens']}); log-prob sums agree with sapo.py's to {res['packed_max_abs_logps_diff']:.1e}"]
    elif "unpacked_max_abs_logps_diff" in res:
        out += ["", f"not packed: one row per tuple, {b['rows'] // 2} rows ({b['unpacked_padded_tokens']} padded positions, vs "
                f"{b['distinct_padded_tokens']} packed); log-prob sums agree with sapo.py's to "
                f"{res['unpacked_max_abs_logps_diff']:.1e}"]
    gen = res["generation"]
    base = gen["by_rows"].get("8") or gen["by_rows"].get(8)
    out += ["", f"segment generation (sapo.make_negatives, G = {gen['segment_len']}, temperature 0.7, top-p 0.95, top-k 50; "
            "fp32 weights and TopKTopPSampler unless the row says otherwise):",
            "", "| lever | rows per call | s per call | new tokens | tokens/s | ms per decoding position | tokens/s vs 8 rows |",
            "|---|---|---|---|---|---|---|"]
    for n, v in gen["by_rows"].items():
        out.append(f"| one call for {n} rows | {n} | {v['s']:.2f} | {v['tokens']:.0f} | {v['tokens_per_s']:.0f} | "
                   f"{v['ms_per_position']:.0f} | {v['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    for name, v in gen["at_8_rows"].items():
        if "error" in v:
            out.append(f"| {name} | 8 | failed: {v['error']} | | | | |")
        else:
            out.append(f"| {name} | {v.get('rows', 8)} | {v['s']:.2f} | {v['tokens']:.0f} | {v['tokens_per_s']:.0f} | "
                       f"{v['ms_per_position']:.0f} | {v['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    slow = {k: v["warmup_s"] for k, v in gen["at_8_rows"].items() if "compiled" in k and "warmup_s" in v}
    out += [f"\n{k}: its warm-up calls (compiling, then recompiling for a new prompt length) took {s:.0f} s" for k, s in slow.items()]
    if "split" in gen:
        sp = gen["split"]
        out += ["", f"one generate call at {sp['rows']} rows, bf16 copy, TopKTopPSampler, split (medians): {sp['s']:.2f} s = "
                f"prefill {sp['prefill_s']:.2f} s + {sp['decode_steps']:.0f} decoding forwards {sp['decode_s']:.2f} s "
                f"({1e3 * sp['decode_s'] / max(sp['decode_steps'], 1):.0f} ms each) + the rest (sampling, generate's "
                f"plumbing, splicing) {sp['rest_s']:.2f} s"]
    for tag, name in (("", "fp32"), ("bf16_", "bf16")):
        if tag + "bare_decoding_step_ms" in gen:
            out += ["", f"bounds at {gen['bound_rows']} rows, {name} weights: one decoding step of the bare model "
                    f"(greedy, no generate plumbing) {gen[tag + 'bare_decoding_step_ms']:.0f} ms; its matmuls alone "
                    f"(every Linear weight times {gen['bound_rows']} rows) {gen[tag + 'matmuls_alone_ms']:.0f} ms; copying "
                    f"those {gen[tag + 'weight_bytes'] / 1e6:.0f} MB of weights once (read + write) "
                    f"{gen[tag + 'copy_weights_once_ms']:.0f} ms"]
    n = res["bf16_numerics"]
    out += ["", f"bf16-mixed numerics vs fp32, same weights (after the steps above) and the first {n['pairs']} pairs, forward only:", "",
            "| | DPO loss | abs diff | reward margin abs diff | sequence log-prob max rel diff |", "|---|---|---|---|---|",
            f"| fp32 | {n['fp32']['loss']:.4f} | - | - | - |"]
    for mode in ("bf16-mixed", "bf16-mixed, fp32 output layer"):
        v = n[mode]
        out.append(f"| {mode} | {v['loss']:.4f} | {v['abs_loss_diff']:.1e} | {v['abs_margin_diff']:.1e} | {v['max_rel_logps_diff']:.1e} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--compile-lever", action="store_true", help="also time a compiled decoding step (torch.compile "
                    "of the decoding forward, static cache; compiling takes minutes on a CPU)")
    args = parse(argv, ap, default_out="perf_levers.json", script="bench/levers.py")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.report_from:
        try:
            res = json.loads(Path(args.report_from).read_text())
            print(f"command: {res['command']}\n" + report_levers(res))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {args.report_from}: not a bench/levers.py results file ({type(e).__name__}: {e})",
                  file=sys.stderr)
            return 2
        return 0
    print(f"command: {args.command}", flush=True)
    res = run_levers(args)
    res["report_markdown"] = text = report_levers(res)
    print(text, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"\nwrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
