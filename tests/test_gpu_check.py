"""scale/gpu_check.py: the one-GPU check of scale/.

On CPU (what CI runs):
  - without CUDA the script prints one line, `no CUDA device: nothing to check`, and exits 0;
  - --dry-run prints the commands it would run (tune run, the resume, python -m scale.memory);
  - its pieces: the 8B / 1B shapes are torchtune's builders', the recipe config it writes passes the recipe's
    check and has the estimate and disk need stated, the checks on metrics.jsonl (log 2 at step 1, resume,
    memory against the estimate), the backend read from a log, the layer fitting, the time limit, the table;
  - --cpu-smoke runs every part on tiny shapes on CPU (gloo): the recipe's decode with its host reads counted,
    the FSDP2 paths in one process against the unsharded model, a 3-step recipe run and its resume (~1 min).
On a CUDA machine: the full check (~8 min, ~30 GB of GPU memory, ~45 GB of disk), skipped elsewhere.
"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale import gpu_check as G  # noqa: E402


def run_script(*args, timeout=600, hide_gpus=False) -> subprocess.CompletedProcess:
    """python -m scale.gpu_check ...; hide_gpus: as on a machine without CUDA (CUDA_VISIBLE_DEVICES empty)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if hide_gpus else None
    return subprocess.run([sys.executable, "-m", "scale.gpu_check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ----------------------------------------------------------------------------- what CI sees

def test_without_cuda_one_line_and_exit_0(tmp_path):
    out = tmp_path / "r.json"
    p = run_script("--out", str(out), timeout=120, hide_gpus=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout == G.NO_CUDA + "\n" and p.stdout.strip() == "no CUDA device: nothing to check"
    assert p.stderr == ""
    assert not out.exists()


def test_bad_arguments_exit_2():
    assert run_script("--parts", "decode,nope", timeout=120).returncode == 2
    assert run_script("--budget-s", "0", timeout=120).returncode == 2


def test_dry_run_prints_the_commands(tmp_path):
    p = run_script("--dry-run", "--workdir", str(tmp_path / "w"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    runs = [x for x in lines if " run scale/sapo_recipe.py --config " in x]
    assert len(runs) == 2
    first, resume = runs
    for needle in ("device=cuda", "dtype=bf16-mixed", "max_steps=3", "save_every_n_steps=2", "num_samples=0",
                   f"output_dir={tmp_path / 'w' / 'run'}", "optimizer._component_=torch.optim.RMSprop"):
        assert needle in first and needle in resume
    assert "resume_from_checkpoint=True" in resume and "resume_from_checkpoint" not in first
    assert any("-m scale.memory" in x and "--nproc 1" in x and "--json" in x for x in lines)
    assert any("make_tiny_llama3" in x and "vocab_size=128256" in x for x in lines)
    assert "1.50 B parameters" in p.stdout
    assert not (tmp_path / "w").exists()          # a dry run writes nothing


# ----------------------------------------------------------------------------- pieces

def meta_params(builder, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in builder(**kw).parameters())


def test_shapes_are_torchtunes_builders():
    from torchtune.models.llama3 import llama3, llama3_8b
    from torchtune.models.llama3_2 import llama3_2_1b
    assert meta_params(llama3, vocab_size=G.LLAMA3_VOCAB, **G.EIGHT_B) == meta_params(llama3_8b)
    one_b = meta_params(llama3, vocab_size=G.LLAMA3_VOCAB, **G.ONE_B)
    assert one_b == meta_params(llama3_2_1b, tie_word_embeddings=False)
    assert 1.4e9 < one_b < 1.55e9


def test_recipe_config_and_estimate(tmp_path):
    from omegaconf import OmegaConf
    from scale import memory
    from scale import sapo_recipe as R
    plan = G.Plan(workdir=str(tmp_path))
    over = G.recipe_overrides(plan, tmp_path / "run")
    cfg = G.merged_config_from(G.recipe_config(plan, tmp_path / "model", files=["a.safetensors"]), over)
    R.check_recipe_config(cfg)
    assert cfg.device == "cuda" and cfg.dtype == "bf16-mixed" and cfg.num_samples == 0 and cfg.max_steps == 3
    assert cfg.model.vocab_size == 128256 and cfg.model.num_layers == 16
    assert list(cfg.checkpointer.checkpoint_files) == ["a.safetensors"]
    assert cfg.tokenizer.path == str(tmp_path / "model" / "original" / "tokenizer.model")
    e = memory.estimate(cfg, 1)
    assert abs(e["params"] / 1e9 - 1.498) < 0.01
    # fp32 policy + fp32 grads + RMSprop (4) + bf16 EMA + bf16 reference = 16 bytes per parameter on the GPU
    assert e["state_on_device"] == pytest.approx(16 * e["params"])
    assert e["runtime"] == memory.CUDA_CONTEXT_GIB * 2**30 and "checkpoint save (process 0, host)" not in e["phases"]
    # the model folder in fp32 and two checkpoints of 12 bytes per parameter
    assert G.recipe_disk_bytes(e, e["params"]) == pytest.approx(1.05 * 28 * e["params"])
    # the written YAML round-trips; fewer layers where asked
    path = tmp_path / "c.yaml"
    OmegaConf.save(G.recipe_config(plan, tmp_path / "model", layers=3), path)
    assert G.merged_config(path, over).model.num_layers == 3
    cmd = G.memory_command(path, over, 300, 200)
    assert cmd[1:3] == ["-m", "scale.memory"] and "--json" in cmd and "device=cuda" in cmd


def metrics_rows(**step3):
    base = {"loss": 0.6931, "logps/chosen": -100.0, "logps/rejected": -90.0, "rewards/chosen": 0.0,
            "rewards/rejected": 0.0, "rewards/margins": 0.0, "lr": 1e-5, "buffer/size": 8, "grad_norm": 12.0,
            "shape/max_tokens": 300, "shape/max_response": 150, "memory/peak_allocated_gib": 20.0}
    rows = [{**base, "step": s} for s in (1, 2, 3)]
    rows[2].update(step3)
    return rows


def test_step1_loss_check():
    assert G.check_step1_loss(metrics_rows(), 1e-3)[0] == G.PASS
    rows = metrics_rows()
    rows[0]["loss"] = math.log(2) + 2e-3
    assert G.check_step1_loss(rows, 1e-3)[0] == G.FAIL
    assert G.check_step1_loss(rows[1:], 1e-3)[0] == G.FAIL           # no step 1


def test_resume_comparison():
    a = metrics_rows()
    assert G.compare_resumed(a, metrics_rows(), 3, 1e-5, 1e-3)[0] == G.PASS
    # grad_norm: its own, looser tolerance (attention's backward may add in another order on a GPU)
    status, gaps, _ = G.compare_resumed(a, metrics_rows(grad_norm=12.0 * (1 + 5e-4)), 3, 1e-5, 1e-3)
    assert status == G.PASS and gaps["grad_norm"] > 0
    assert G.compare_resumed(a, metrics_rows(grad_norm=12.1), 3, 1e-5, 1e-3)[0] == G.FAIL
    status, _, detail = G.compare_resumed(a, metrics_rows(loss=0.7), 3, 1e-5, 1e-3)
    assert status == G.FAIL and "loss" in detail
    assert G.compare_resumed(a, metrics_rows(loss=float("nan")), 3, 1e-5, 1e-3)[0] == G.FAIL
    assert G.compare_resumed(a, metrics_rows()[:2], 3, 1e-5, 1e-3)[0] == G.FAIL
    # the resumed metrics.jsonl must hold steps 1..3 (the recipe cuts it back to the checkpoint, then appends)
    assert G.compare_resumed(a, metrics_rows()[2:], 3, 1e-5, 1e-3)[0] == G.FAIL


def test_memory_check_and_longest_batch():
    rows = metrics_rows()
    rows[1]["memory/peak_allocated_gib"] = 25.0
    rows[1]["shape/max_tokens"] = 384
    assert G.longest_batch(rows) == (384, 150)
    status, peak, detail = G.check_memory(rows, 26.0 * G.GIB, 0.2)
    assert status == G.PASS and peak == 25.0 and "+4.0%" in detail
    assert G.check_memory(rows, 31.0 * G.GIB, 0.2)[0] == G.FAIL
    assert G.check_memory(rows, 19.0 * G.GIB, 0.2)[0] == G.FAIL
    assert G.check_memory([{"step": 1}], 1e9, 0.2)[0] == G.FAIL          # a CPU run's metrics


def test_first_run_checks_on_cuda_metrics(tmp_path):
    """The glue of the CUDA branch (backend from the log, the estimate for the run's longest batch against
    memory/peak_allocated_gib), on synthetic metrics: what a GPU run's metrics.jsonl holds."""
    from omegaconf import OmegaConf
    from scale import memory
    plan = G.Plan(workdir=str(tmp_path))
    over = G.recipe_overrides(plan, tmp_path / "run")
    path = tmp_path / "c.yaml"
    OmegaConf.save(G.recipe_config(plan, tmp_path / "model"), path)
    e = memory.estimate(G.merged_config(path, over), 1, seq_len=300, response_len=150)
    rows = metrics_rows()
    for m in rows:
        m["memory/peak_allocated_gib"] = e["peak"] / G.GIB / 1.05      # the estimate 5% above the measurement
    rep, d = G.Report(), {}
    G.judge_first_run(plan, rep, d, rows, "[0] NCCL INFO comm 0x1 rank 0 nranks 1 - Init COMPLETE", path, over, True)
    status = {c["check"]: c["status"] for c in rep.checks}
    assert status == {"steps logged": "PASS", "step 1 loss = log 2": "PASS", "process group backend (log)": "PASS",
                      "peak allocated vs scale/memory.py": "PASS"}, rep.table()
    assert d["estimate"]["seq_len"] == 300 and d["estimate"]["peak_gib"] == pytest.approx(e["peak"] / G.GIB)
    assert "--seq-len 300 --response-len 150" in d["estimate"]["command"]
    rep = G.Report()
    G.judge_first_run(plan, rep, {}, rows, "gloo only", path, over, True)
    assert {c["check"]: c["status"] for c in rep.checks}["process group backend (log)"] == "FAIL"
    rep = G.Report()
    G.judge_first_run(plan, rep, {}, rows, "", path, over, False)     # a CPU run: those two are skipped
    assert [c["status"] for c in rep.checks] == ["PASS", "PASS", "SKIP", "SKIP"]


def test_read_metrics_ignores_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in metrics_rows()) + '{"loss": 0.69, "st')
    assert [m["step"] for m in G.read_metrics(path)] == [1, 2, 3]


def test_backend_from_log():
    assert G.backend_from_log("x\nhost:1:1 [0] NCCL INFO Bootstrap : Using eth0\n") == "nccl"
    assert G.backend_from_log("NCCL version 2.21.5+cuda12.4") == "nccl"
    assert G.backend_from_log("checkpoint: step 3 in /tmp/run") is None


def test_fitting_and_sync_arithmetic():
    assert G.largest_fitting(16, lambda n: n <= 9) == 9
    assert G.largest_fitting(16, lambda n: True) == 16
    assert G.largest_fitting(16, lambda n: False) == 0
    # torchtune_generate reads `done` at k + 1 = 16, 32, 48 of 64 steps, none in 16: 3 / 48 per step
    assert G.sync_checks_due(64, 16) == 3 and G.sync_checks_due(16, 16) == 0 and G.sync_checks_due(48, 16) == 2


def test_time_limit():
    t = time.perf_counter()
    with pytest.raises(G.PartTimeout):
        with G.time_limit(0.2):
            time.sleep(3)
    assert time.perf_counter() - t < 2
    with pytest.raises(G.PartTimeout):
        with G.time_limit(0):
            pass
    with G.time_limit(5):
        pass


def test_report_table():
    rep = G.Report()
    rep.add("decode", "ms per decoding step", G.INFO, 21.5, "8 rows", seconds=3.0)
    assert not rep.failed
    rep.add("recipe", "step 1 loss = log 2", G.FAIL, 0.71, "0.6931 +- 0.001", "|loss - log 2| = 1.7e-02")
    assert rep.failed
    table = rep.table()
    assert "ms per decoding step" in table and "FAIL recipe / step 1 loss = log 2: |loss - log 2|" in table
    assert table.splitlines()[-1].startswith("FAIL: 0 passed, 1 failed")


def test_host_read_counter():
    counter = G.host_read_counter()
    x = torch.ones(3)
    with counter:
        x.sum().item()
        bool(x.all())
        x * 2
    assert counter.n == 2


# ----------------------------------------------------------------------------- every part, tiny, on CPU

def test_cpu_smoke(tmp_path):
    """All three parts on tiny shapes on CPU (gloo): the checks that need CUDA are SKIPped, the others PASS."""
    out, work = tmp_path / "r.json", tmp_path / "work"
    p = run_script("--cpu-smoke", "--out", str(out), "--workdir", str(work), "--budget-s", "400", timeout=600,
                   hide_gpus=True)     # FSDP2 would put its default mesh on a visible GPU
    r = json.loads(out.read_text()) if out.exists() else None
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    assert r["passed"] and not [c for c in r["checks"] if c["status"] == "FAIL"]
    status = {(c["part"], c["check"]): c["status"] for c in r["checks"]}
    for key in [("decode", "every row decodes all its tokens"), ("decode", "host reads per decoding step"),
                ("fsdp", "process group backend"), ("fsdp", "policy and EMA sharded (DTensor)"),
                ("fsdp", "log-probs sharded vs unsharded"), ("fsdp", "grad norm sharded vs unsharded"),
                ("fsdp", "greedy decode, gathered EMA vs unsharded"), ("fsdp", "local_ema_update vs sapo.ema_update"),
                ("recipe", "3-step run"), ("recipe", "step 1 loss = log 2"), ("recipe", "resume from step 2"),
                ("recipe", "resumed step 3 = uninterrupted")]:
        assert status.get(key) == "PASS", (key, status)
    assert status[("decode", "CUDA syncs per decoding step")] == "SKIP"
    # compile_decode's step (aot_eager on CPU) timed beside the eager one, writing the same tokens
    assert "compiled_ms_per_step" in r["details"]["decode"]
    agree = [c for c in r["checks"] if c["check"] == "compiled step's tokens = eager's"]
    assert agree and agree[0]["value"] == 2 * 2, agree
    assert r["details"]["decode"]["host_reads_per_step"] == pytest.approx(1 / 16)
    assert r["details"]["recipe"]["resume_gaps"]["loss"] == 0.0          # CPU: exact
    assert "device=cpu" in r["details"]["recipe"]["command"]
    assert (work / "run1.log").exists() and (work / "uninterrupted_metrics.jsonl").exists()
    assert "PASS:" in p.stdout and "part" in p.stdout


# ----------------------------------------------------------------------------- the real thing

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = run_script("--out", str(out), "--budget-s", "480", timeout=900)
    r = json.loads(out.read_text()) if out.exists() else {}
    failed = [c for c in r.get("checks", []) if c["status"] == "FAIL"]
    assert p.returncode == 0 and r.get("passed"), (failed, (p.stdout + p.stderr)[-5000:])
