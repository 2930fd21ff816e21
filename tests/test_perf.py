"""bench/perf.py --quick runs end to end and reports every figure, finite and positive: behaviour, not speed.

TRL is the benchmark's own requirement (bench/requirements-perf.txt), not the project's: without it, skip.
The run uses the tiny Llama fixture (same code path as the bundled model, seconds instead of minutes);
`python bench/perf.py --quick` on the bundled SmolLM2 is the manual smoke test.
"""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="TRL not installed: pip install torch==2.13.0 -r bench/requirements-perf.txt")

FIGURES = [
    # 1. our DPO step vs TRL's
    "dpo.ours.step", "dpo.ours.forward_backward", "dpo.ours.optimizer", "dpo.ours.tokens_per_s", "dpo.ours.utilization_fp32",
    "dpo.ours.ref_forward", "dpo.ours.policy_forward", "dpo.ours.backward",
    "dpo.trl.step", "dpo.trl.forward_backward", "dpo.trl.optimizer", "dpo.trl.tokens_per_s", "dpo.trl.utilization_fp32",
    "dpo.speedup_step", "dpo.speedup_forward_backward",
    # 2. a SAPO step, broken down, and its ratio to our DPO step
    *[f"sapo.{p}.{k}" for p in ("fp32", "bf16-mixed")
      for k in ("ema_update", "generation", "buffer", "ref_forward", "policy_forward", "backward", "optimizer", "step",
                "gen_tokens", "gen_tokens_per_s", "ratio_to_dpo", "ratio_to_dpo_equal_tokens", "ref_refresh_per_step")],
    "dpo.profile.matmul_share", "dpo.profile.matmul_gflops", "dpo.profile.matmul_efficiency",
    # 2a. segment generation, the plain path (--plain) vs the default one
    "generation.plain.s", "generation.plain.tokens_per_s", "generation.default.s", "generation.default.tokens_per_s",
    "generation.speedup_tokens_per_s",
    # 3. against the limit, fp32 and bf16
    "matmul.fp32.peak_flops", "matmul.bf16.peak_flops", "matmul.fp32.output_layer_flops", "matmul.bf16.output_layer_flops",
    "flops.dpo_step", "flops.per_distinct_token", "dpo.bf16_mixed.step", "dpo.bf16_mixed.tokens_per_s",
    "dpo.bf16_mixed.utilization_bf16", "dpo.bf16_mixed.speedup_vs_fp32",
    # 4. memory
    "memory.fp32.peak_rss_gb", "memory.fp32.floor_gb", "memory.fp32.activations_gb", "memory.fp32.bound_gb",
    "memory.fp32.runtime_baseline_gb", "memory.fp32.peak_over_floor",
    # the batch
    "batch.real_tokens", "batch.padded_tokens", "batch.completion_tokens", "batch.distinct_tokens",
    "batch.distinct_padded_tokens", "batch.distinct_scored_tokens",
]
NON_NEGATIVE = ["dpo.max_abs_loss_diff_vs_trl", *[f"precision.{w}.{k}" for w in ("model", "dithered")
                                                 for k in ("max_abs_loss_diff", "max_rel_logps_diff", "bf16_ties")]]


def get(res, path):
    for key in path.split("."):
        res = res[key]
    return res


def test_perf_quick_reports_every_figure(tmp_path, tiny_llama_dir):
    out = tmp_path / "perf.json"
    cmd = [sys.executable, "bench/perf.py", "--quick", "--model", str(tiny_llama_dir), "--max-length", "512", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.startswith("command: python bench/perf.py --quick --model ")
    for section in ("**1. Offline DPO step", "**2. SAPO step", "**2a. Segment generation", "**3. Against the limit",
                    "**4. Memory", "**Goals**"):
        assert section in r.stdout
    res = json.loads(out.read_text())
    assert res["command"].startswith("python bench/perf.py --quick")
    for path in FIGURES:
        value = get(res, path)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (path, value)
    for path in NON_NEGATIVE:
        if path.startswith("precision.") and res["precision"] is None:   # bf16 slower than fp32 here: no trajectory
            continue
        value = get(res, path)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (path, value)
    assert res["batch"]["rows"] == 2 * res["settings"]["batch_size"]
    assert len(res["dpo"]["losses_ours"]) == len(res["dpo"]["losses_trl"]) >= 1
    assert set(res["goals"]) >= {"dpo_ge_3x_trl_tokens_per_s", "sapo_le_1.2x_dpo_fp32", "utilization_fp32_ge_55pct",
                                 "generation_ge_2.5x_tokens_per_s_of_plain", "utilization_bf16_ge_40pct",
                                 "peak_memory_le_1.3x_floor_plus_activations"}
    # --report-from prints the same report from the JSON, without running anything
    again = subprocess.run([sys.executable, "bench/perf.py", "--report-from", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "linear-layer work executed" in again.stdout
    assert again.stdout.split("\n", 1)[1].strip() in r.stdout
    # the SAPO step generates with the weights sapo.train would pick here
    import torch
    import sapo_fast
    want = str(sapo_fast.generation_dtype("auto", "fp32", torch.device("cpu"))).split(".")[-1]
    assert res["sapo"]["fp32"]["generator_dtype"] == res["generation"]["generator_dtype_default"] == want
    assert res["memory"]["fp32"]["generator_copy"] == (want == "bfloat16")


def test_perf_levers_quick_reports_every_lever(tmp_path, tiny_llama_dir):
    """bench/levers.py: the DPO-step A/B (packed as sapo.py runs, two rows, one row per tuple), the generation levers and
    the decoding bounds, every figure finite; the packed and unpacked layouts give the same log-probs."""
    out = tmp_path / "levers.json"
    cmd = [sys.executable, "bench/levers.py", "--quick", "--model", str(tiny_llama_dir), "--max-length", "512",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["levers"]) >= {"sapo.py as is (shared prefix, tuples packed into rows)", "two rows per pair",
                                  "shared prefix, one row per tuple (not packed)"}
    assert all(v["step"] > 0 and math.isfinite(v["tokens_per_s"]) for v in res["levers"].values())
    assert 0 <= res["unpacked_max_abs_logps_diff"] < 1e-3 and 0 <= res["layouts_max_abs_logps_diff"] < 1e-3
    assert res["batch"]["distinct_padded_tokens"] <= res["batch"]["unpacked_padded_tokens"]
    gen = res["generation"]
    for name in ("fp32, transformers' sampler (--plain)", "bf16 copy, TopKTopPSampler (the default where bf16 "
                 "is native)", "static KV cache", "bf16 copy, static KV cache"):
        assert gen["at_8_rows"][name]["tokens_per_s"] > 0, (name, gen["at_8_rows"][name])
    assert all(gen[k] > 0 for k in ("bare_decoding_step_ms", "matmuls_alone_ms", "bf16_bare_decoding_step_ms"))
    sp = gen["split"]                 # one prefill and one forward per decoding position, the parts adding up
    assert sp["prefill_s"] > 0 and sp["decode_steps"] >= 1 and sp["rest_s"] >= 0
    assert abs(sp["prefill_s"] + sp["decode_s"] + sp["rest_s"] - sp["s"]) < 1e-6
    again = subprocess.run([sys.executable, "bench/levers.py", "--report-from", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "not packed: one row per tuple" in again.stdout
    assert again.stdout.split("\n", 1)[1].strip() in r.stdout
