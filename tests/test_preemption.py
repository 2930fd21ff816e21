"""Issue 15: runs survive preemption, Ctrl-C, a full disk and a second run in their folder.

Real runs (subprocesses) get SIGTERM / SIGINT at random steps and are resumed; in-process runs get a signal at
chosen moments (setup, the first evaluation, generation, a checkpoint write, the last step, the final save and
evaluation); a second signal lands during a checkpoint write; the checkpoint and final writers fail with ENOSPC
(as OSError, as safetensors' SafetensorError, as torch.save's RuntimeError, and for real through RLIMIT_FSIZE);
a second run starts while the first runs; stale locks are taken over. Every resumed run must end bit-identical to
an uninterrupted one (final weights, metrics less timing, samples). The random points come from SEED (printed
in every assertion message; set SAPO_TEST_SEED to replay). The 20-point sweep is bench/preempt_sweep.py.
"""
import errno
import functools
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_jsonl

import sapo
import sapo_utils.checkpoints
import sapo_utils.errors
import sapo_utils.report
import sapo_utils.run
from bench.preempt_sweep import (ROWS, STOPPED, common_args, differences, lines, metrics_rows, run, start,
                                 wait_until)

SEED = int(os.environ.get("SAPO_TEST_SEED", time.time_ns() % 1_000_000))
MAX_STEPS = 8
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def rnd(*salt) -> random.Random:
    return random.Random(f"{SEED}-{'-'.join(map(str, salt))}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("preempt") / "d.jsonl", ROWS)


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs on one thread, like the subprocesses (OMP_NUM_THREADS=1): fast on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def argv(tiny_llama_dir, data, out, *extra, save_steps=-1):
    return [str(a) for a in common_args(tiny_llama_dir, data, MAX_STEPS, save_steps)] + ["--output-dir", str(out),
                                                                                          *map(str, extra)]


def main(args, capfd) -> tuple[int, str]:
    """sapo.main in this process: (exit status, stderr, file-descriptor level so the handler's lines count)."""
    rc = sapo.main(args)
    return rc, capfd.readouterr().err


@pytest.fixture(scope="module")
def inproc_ref(tmp_path_factory, tiny_llama_dir, data, one_thread):
    out = tmp_path_factory.mktemp("inproc") / "ref"
    assert sapo.main(argv(tiny_llama_dir, data, out)) == 0
    return out


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1] if err.strip() else ""


def no_leftovers(out: Path) -> list[str]:
    """A lock, or temporary / set-aside folders, left in a run folder."""
    found = [p.name for p in [out / ".lock", *out.glob(".tmp-*"), *out.glob(".old-*")] if p.exists()]
    return found + [p.name for p in (out / "checkpoints").glob(".tmp-*")]


# ---------------------------------------------------------------------------------------------------
# Real runs: SIGTERM and SIGINT at random steps, resumed; a second signal mid-write; two runs in one folder
# ---------------------------------------------------------------------------------------------------

DRIVER = """
import os, sys, time
sys.path.insert(0, os.environ["SAPO_ROOT"])
import sapo
import sapo_utils.checkpoints
import sapo_utils.errors
import sapo_utils.report
import sapo_utils.run
if os.environ.get("SLOW_CHECKPOINT_S"):           # a checkpoint write that takes a while: room for a 2nd signal
    import safetensors.torch as st
    real_save = st.save_model
    def save_model(model, path, *a, **k):
        if path.endswith("policy.safetensors"):
            time.sleep(float(os.environ["SLOW_CHECKPOINT_S"]))
        return real_save(model, path, *a, **k)
    st.save_model = save_model
if os.environ.get("GATE_FILE"):                   # hold the run after step GATE_STEP until the file exists
    real_write = sapo_utils.report.MetricsLog.write
    def write(self, metrics, echo=None):
        real_write(self, metrics, echo)
        if metrics["step"] == int(os.environ["GATE_STEP"]):
            while not os.path.exists(os.environ["GATE_FILE"]):
                time.sleep(0.05)
    sapo_utils.report.MetricsLog.write = write
sys.exit(sapo.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


@pytest.fixture(scope="module")
def cli_ref(tmp_path_factory, tiny_llama_dir, data):
    work = tmp_path_factory.mktemp("cli")
    assert run(argv(tiny_llama_dir, data, work / "ref"), work / "ref") == 0, (work / "ref.err").read_text()
    return work / "ref"


def signal_at_random_step(args, out: Path, signum: int, at: int, delay: float) -> dict:
    proc = start(args, out.with_suffix(""))
    reached = wait_until(proc, lambda: lines(out / "metrics.jsonl") >= at)
    time.sleep(delay)
    sent = reached and proc.poll() is None
    if sent:
        proc.send_signal(signum)
    rc = proc.wait(timeout=600)
    return {"sent": sent, "rc": rc, "err": Path(f"{out.with_suffix('')}.err").read_text(),
            "lines": metrics_rows(out) if (out / "metrics.jsonl").exists() else []}


def test_sigterm_and_sigint_at_random_steps_resume_bit_identically(tmp_path, tiny_llama_dir, data, cli_ref):
    """Both signals, each at a random step (and a random moment within it), in real runs side by side; each exits
    143 / 130 with one line naming the checkpoint and --resume, and its resume ends equal to the reference."""
    points = {s: (rnd("cli", s).randint(1, MAX_STEPS - 1), rnd("cli-delay", s).uniform(0, 0.1)) for s in SIGNALS}
    outs = {s: tmp_path / signal.Signals(s).name for s in SIGNALS}
    with ThreadPoolExecutor(2) as pool:
        got = dict(zip(SIGNALS, pool.map(lambda s: signal_at_random_step(argv(tiny_llama_dir, data, outs[s]), outs[s],
                                                                         s, *points[s]), SIGNALS)))
    for s, r in got.items():
        why = (f"SEED={SEED} {signal.Signals(s).name} after line {points[s][0]} + {points[s][1]:.3f} s: "
               f"{r['err'][-2000:]}")
        assert r["sent"], why
        assert "Traceback" not in r["err"] and "KeyboardInterrupt" not in r["err"], why
        assert no_leftovers(outs[s]) == [], why
        assert r["lines"] == metrics_rows(cli_ref)[: len(r["lines"])], why        # what it wrote is kept as is
        if r["rc"] == 0:          # the signal landed after the last step: the run finished normally
            assert differences(cli_ref, outs[s]) == [], why
            continue
        m = STOPPED.fullmatch(last_line(r["err"]))
        assert r["rc"] == 128 + s and m, why
        step = int(m.group(1))
        assert len(r["lines"]) == step and Path(m.group(2)) == outs[s] / "checkpoints" / f"step-{step:08d}", why
        assert sapo_utils.checkpoints.verify_checkpoint(Path(m.group(2))) is None, why
    with ThreadPoolExecutor(2) as pool:
        rcs = list(pool.map(lambda s: run(argv(tiny_llama_dir, data, outs[s], "--resume"), tmp_path / f"resume-{s}")
                            if got[s]["rc"] else 0, SIGNALS))
    assert rcs == [0, 0], f"SEED={SEED}"
    for s in SIGNALS:
        assert differences(cli_ref, outs[s]) == [], f"SEED={SEED} {signal.Signals(s).name} at {points[s]}"


def test_second_signal_during_a_checkpoint_write_then_stale_lock_taken_over(tmp_path, tiny_llama_dir, data,
                                                                              cli_ref, driver):
    """SIGTERM during a (slowed) checkpoint write, then SIGTERM again: the process dies at once, by the signal.
    The previous checkpoint still verifies; the next run takes over the dead run's lock with a message, clears
    the half-written folder, and ends equal to the reference."""
    out = tmp_path / "o"
    proc = start(argv(tiny_llama_dir, data, out, save_steps=2), tmp_path / "first", driver,
                 env={"SAPO_ROOT": str(ROOT), "SLOW_CHECKPOINT_S": "1.5"})
    ckpts = out / "checkpoints"
    assert wait_until(proc, lambda: (ckpts / "step-00000002").exists() and any(ckpts.glob(".tmp-step-*")))
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    err = (tmp_path / "first.err").read_text()
    assert "SIGTERM again: stopping at once" in err and "Traceback" not in err, err
    assert (out / ".lock").exists() and json.loads((out / ".lock").read_text())["pid"] == proc.pid
    assert sapo_utils.checkpoints.latest_checkpoint(ckpts) == ckpts / "step-00000002"
    assert sapo_utils.checkpoints.verify_checkpoint(ckpts / "step-00000002") is None
    assert run(argv(tiny_llama_dir, data, out, "--resume", save_steps=2), tmp_path / "resume") == 0
    said = (tmp_path / "resume.out").read_text()
    assert f"taking over the lock of a run that is gone (pid {proc.pid} on {socket.gethostname()}" in said, said
    assert no_leftovers(out) == []
    assert differences(cli_ref, out) == []


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, tiny_llama_dir, data, cli_ref, driver):
    """While a run holds its folder (held after step 2 by a gate), a second one, even with --resume, refuses with
    one line naming the first's pid and host; the first then finishes exactly as if alone."""
    out, gate = tmp_path / "o", tmp_path / "gate"
    first = start(argv(tiny_llama_dir, data, out), tmp_path / "first", driver,
                  env={"SAPO_ROOT": str(ROOT), "GATE_FILE": str(gate), "GATE_STEP": "2"})
    try:
        assert wait_until(first, lambda: lines(out / "metrics.jsonl") >= 2)
        assert run(argv(tiny_llama_dir, data, out, "--resume"), tmp_path / "second") == 2
        err = (tmp_path / "second.err").read_text()
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {out}: another run is using this folder (pid {first.pid} on "
                              f"{socket.gethostname()}, started "), err
        assert first.poll() is None
    finally:
        gate.touch()
    assert first.wait(timeout=600) == 0, (tmp_path / "first.err").read_text()
    assert no_leftovers(out) == []
    assert differences(cli_ref, out) == []


@pytest.mark.parametrize("limit,writer", [(100_000, "safetensors"), (250_000, "torch.save")])
def test_a_real_write_failure_is_one_line(tmp_path, tiny_llama_dir, data, limit, writer):
    """A real writer failing mid-file (RLIMIT_FSIZE: EFBIG, the way ENOSPC also surfaces): safetensors raises
    SafetensorError, torch.save a RuntimeError; both must end as the one-line error, with nothing left behind.
    The policy file is ~180 kB and trainer.pt ~360 kB, so the two limits fail one writer each."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sapo.py"), *argv(tiny_llama_dir, data, out, save_steps=2)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 2, err
    line = last_line(err)
    assert line.startswith(f"error: {out / 'checkpoints'}: cannot write step-00000002: ") and " bytes " in line, err
    assert ("File too large; it needs about " in line) == (writer == "safetensors") and "Traceback" not in err, err
    assert not any((out / "checkpoints").iterdir()) and no_leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# In-process runs: a signal at each kind of moment
# ---------------------------------------------------------------------------------------------------

def send_on_call(monkeypatch, owner, name, signum, when):
    """Wrap owner.name: the call for which when(n, args, kwargs) holds first sends `signum` to this process."""
    real, calls = getattr(owner, name), {"n": 0, "sent": 0}

    @functools.wraps(real)
    def wrapper(*a, **k):
        calls["n"] += 1
        if not calls["sent"] and when(calls["n"], a, k):
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler)  # else: pytest dies
            calls["sent"] = calls["n"]
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _moment(name: str, r: random.Random, out: Path):
    """(what to wrap, when to signal, the step it stops at: None = setup, 'end' = it finishes, --save-steps)."""
    import safetensors.torch
    k = r.randint(1, MAX_STEPS - 1)
    j = r.randint(1, MAX_STEPS // 2 - 1)
    return {"setup": (sapo, "load_model", lambda n, a, kw: n == 1, None, -1),
            "first evaluation": (sapo, "evaluate", lambda n, a, kw: n == 1, None, -1),
            # make_negatives: call 1 writes the held-out negatives (setup), call 1 + k the negatives of step k
            "generation": (sapo, "make_negatives", lambda n, a, kw: n == 1 + k, k, -1),
            # three models per checkpoint, one every 2 steps: call 3(j-1)+2 is inside the checkpoint of step 2j
            "checkpoint write": (safetensors.torch, "save_model", lambda n, a, kw: n == 3 * (j - 1) + 2, 2 * j, 2),
            # the last step's held-out scoring (not the --eval-steps ones before it): steps 1..7 are logged by then
            "last step": (sapo, "evaluate", lambda n, a, kw: n > 1
                          and lines(out / "metrics.jsonl") == MAX_STEPS - 1, "end", -1),
            "final save": (sapo_utils.checkpoints, "save_final", lambda n, a, kw: True, "end", -1),
            "final evaluation": (sapo, "evaluate", lambda n, a, kw: n > 1
                                 and lines(out / "metrics.jsonl") == MAX_STEPS, "end", -1)}[name]


MOMENTS = ("setup", "first evaluation", "generation", "checkpoint write", "last step", "final save",
           "final evaluation")


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_signal_at_each_moment(moment, monkeypatch, tmp_path, tiny_llama_dir, data, inproc_ref, capfd):
    r = rnd("moment", moment)
    signum = r.choice(SIGNALS)
    out = tmp_path / "o"
    owner, name, when, expect, save_steps = _moment(moment, r, out)
    why = f"SEED={SEED} {moment} {signal.Signals(signum).name} expect {expect}"
    calls = send_on_call(monkeypatch, owner, name, signum, when)
    rc, err = main(argv(tiny_llama_dir, data, out, save_steps=save_steps), capfd)
    monkeypatch.undo()
    why += f" (signal at call {calls['sent']}): {err[-2000:]}"
    assert calls["sent"] and "Traceback" not in err, why
    assert no_leftovers(out) == [], why
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.getsignal(signal.SIGINT) == \
        signal.default_int_handler, why                                   # the handlers are put back
    if expect == "end":                                                    # after the last step: it just finishes
        assert rc == 0, why
        assert ("the last step is done" if moment != "last step" else "finishing this step") in err, why
    else:
        assert rc == 128 + signum, why
        if expect is None:
            assert last_line(err) == ("stopped during setup, before any step was trained: nothing new to save; "
                                      "start again with the same command plus --resume"), why
            assert not (out / "checkpoints").exists() and lines(out / "metrics.jsonl") == 0, why
        else:
            ckpt = out / "checkpoints" / f"step-{expect:08d}"
            assert last_line(err) == (f"stopped at step {expect}; checkpoint {ckpt}; resume with the same command "
                                      "plus --resume"), why
            assert sapo_utils.checkpoints.latest_checkpoint(out / "checkpoints") == ckpt, why
            assert metrics_rows(out) == metrics_rows(inproc_ref)[:expect], why
        rc, err = main(argv(tiny_llama_dir, data, out, "--resume", save_steps=save_steps), capfd)
        assert rc == 0, why + err
    assert differences(inproc_ref, out) == [], why


def test_a_signal_while_resuming_loses_nothing(monkeypatch, tmp_path, tiny_llama_dir, data, inproc_ref, capfd):
    """Stopped at step k, then stopped again while the resume loads that checkpoint: the checkpoint is untouched,
    and the next resume ends equal to the reference."""
    k, signum = rnd("resume").randint(1, MAX_STEPS - 1), rnd("resume-signal").choice(SIGNALS)
    out = tmp_path / "o"
    send_on_call(monkeypatch, sapo, "make_negatives", signal.SIGTERM, lambda n, a, kw: n == 1 + k)
    assert main(argv(tiny_llama_dir, data, out), capfd)[0] == 143
    monkeypatch.undo()
    send_on_call(monkeypatch, sapo_utils.checkpoints, "load_checkpoint", signum, lambda n, a, kw: True)
    rc, err = main(argv(tiny_llama_dir, data, out, "--resume"), capfd)
    monkeypatch.undo()
    assert rc == 128 + signum and "stopped during setup" in last_line(err), f"SEED={SEED} {err}"
    assert sapo_utils.checkpoints.latest_checkpoint(out / "checkpoints").name == f"step-{k:08d}"
    assert lines(out / "metrics.jsonl") == k and no_leftovers(out) == []
    assert main(argv(tiny_llama_dir, data, out, "--resume"), capfd)[0] == 0
    assert differences(inproc_ref, out) == [], f"SEED={SEED} k={k}"


def test_the_lock_is_released_when_the_loop_raises(monkeypatch, tmp_path, tiny_llama_dir, data, one_thread):
    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(sapo, "batch_loss", boom)
    with pytest.raises(RuntimeError, match="boom"):
        sapo.main(argv(tiny_llama_dir, data, tmp_path / "o"))
    assert no_leftovers(tmp_path / "o") == []


# ---------------------------------------------------------------------------------------------------
# A full disk, an unwritable folder
# ---------------------------------------------------------------------------------------------------

def _enospc_writers():
    from safetensors import SafetensorError
    return {"OSError": ("safetensors.torch", "save_model", 4, OSError(errno.ENOSPC, "No space left on device")),
            "SafetensorError": ("safetensors.torch", "save_model", 5, SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)")),
            "torch.save": ("torch", "save", 2, RuntimeError("[enforce fail at inline_container.cc:672] . "
                                                             "PytorchStreamWriter failed writing file data/3"))}


def fail_on_call(monkeypatch, module: str, name: str, call: int, error: BaseException):
    import importlib
    owner = importlib.import_module(module)
    real, calls = getattr(owner, name), {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise error
        return real(*a, **k)
    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("kind", ["OSError", "SafetensorError", "torch.save"])
def test_disk_full_at_a_checkpoint(kind, monkeypatch, tmp_path, tiny_llama_dir, data, inproc_ref, capfd):
    """The second checkpoint (step 4) fails as a full disk shows through each writer: exit 2, one line naming the
    folder and the bytes, no temporary folder, the step-2 checkpoint verifies, and a resume from it ends equal."""
    out = tmp_path / "o"
    fail_on_call(monkeypatch, *_enospc_writers()[kind])
    rc, err = main(argv(tiny_llama_dir, data, out, save_steps=2), capfd)
    monkeypatch.undo()
    line = last_line(err)
    assert rc == 2 and err.strip() == line and "Traceback" not in err, err
    assert line.startswith(f"error: {out / 'checkpoints'}: cannot write step-00000004: ") and " bytes " in line, err
    if kind != "torch.save":
        assert ": disk full; " in line
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert sapo_utils.checkpoints.verify_checkpoint(out / "checkpoints" / "step-00000002") is None
    assert no_leftovers(out) == []
    assert main(argv(tiny_llama_dir, data, out, "--resume", save_steps=2), capfd)[0] == 0
    assert differences(inproc_ref, out) == []


def test_disk_full_at_the_final_save(monkeypatch, tmp_path, tiny_llama_dir, data, inproc_ref, capfd):
    """The final save fails: exit 2, one line, no final/ and no temporary folder; the end-of-run checkpoint
    verifies and --resume writes final/. Failing again later leaves that final/ as it was."""
    import transformers
    out = tmp_path / "o"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    rc, err = main(argv(tiny_llama_dir, data, out, save_steps=0), capfd)
    assert rc == 2 and last_line(err).startswith(f"error: {out}: cannot write final: disk full; it needs about "), err
    assert err.count("\n") == 1 and not (out / "final").exists() and no_leftovers(out) == []
    assert sapo_utils.checkpoints.latest_checkpoint(out / "checkpoints").name == f"step-{MAX_STEPS:08d}"
    monkeypatch.undo()
    assert main(argv(tiny_llama_dir, data, out, "--resume", save_steps=0), capfd)[0] == 0
    assert differences(inproc_ref, out) == []
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    assert main(argv(tiny_llama_dir, data, out, "--resume", save_steps=0), capfd)[0] == 2
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before and no_leftovers(out) == []


def test_not_enough_free_space_is_refused_before_writing(monkeypatch, tmp_path):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sapo_utils.checkpoints.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(sapo_utils.errors.UserError) as e:
        sapo_utils.checkpoints.save_checkpoint(tmp_path, 1, {"policy": torch.nn.Linear(256, 256)}, {}, {}, keep=1)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: cannot write step-00000001: not enough free space; it needs about ")
    assert "1,000 bytes free" in msg and "\n" not in msg and list(tmp_path.iterdir()) == []


def test_unwritable_folder(monkeypatch, tmp_path):
    """A checkpoint into a folder that cannot be written: one line, the previous checkpoint intact. As root,
    chmod does not stop writes, so EACCES is simulated at the temporary folder's creation."""
    model = torch.nn.Linear(4, 4)
    first = sapo_utils.checkpoints.save_checkpoint(tmp_path, 1, {"policy": model}, {}, {}, keep=2)
    if os.geteuid() == 0:
        real_mkdir = Path.mkdir

        def mkdir(self, *a, **k):
            if self.name.startswith(".tmp-"):
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *a, **k)
        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        tmp_path.chmod(0o500)
    try:
        with pytest.raises(sapo_utils.errors.UserError) as e:
            sapo_utils.checkpoints.save_checkpoint(tmp_path, 2, {"policy": model}, {}, {}, keep=2)
    finally:
        tmp_path.chmod(0o700)
    assert str(e.value).startswith(f"{tmp_path}: cannot write step-00000002: Permission denied; it needs about ")
    assert [p.name for p in tmp_path.iterdir()] == [first.name] and sapo_utils.checkpoints.verify_checkpoint(first) is None


# ---------------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------------

def test_the_lock_of_a_sigkilled_run_is_taken_over(tmp_path, capsys):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import pathlib, "
                               f"time, sapo_utils.run; sapo_utils.run.RunLock(pathlib.Path({str(out)!r})).acquire(); print('held', "
                               "flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(sapo_utils.errors.UserError, match=f"another run is using this folder \\(pid {holder.pid} on "):
        sapo_utils.run.prepare_output_dir(out, True, False, {})
    holder.kill()
    holder.wait()
    with sapo_utils.run.prepare_output_dir(out, True, False, {}):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that is gone (pid {holder.pid} on {socket.gethostname()}" in \
        capsys.readouterr().out
    assert not (out / ".lock").exists()


def test_a_live_pid_is_a_stale_lock_only_if_it_started_later(tmp_path, capsys):
    """Containers restart their pids: a lock naming a live pid whose process started after the lock was written
    is stale; one naming the live process that wrote it is not; one from another host is never taken over."""
    host, pid = socket.gethostname(), os.getppid()
    real_start = sapo_utils.run._process_start(pid)
    if real_start is None:
        pytest.skip("no /proc here")
    lock = tmp_path / ".lock"
    for other, stale in [({"pid": pid, "host": host, "pid_start": str(int(real_start) + 1)}, True),
                         ({"pid": pid, "host": host, "pid_start": real_start}, False),
                         ({"pid": 2 ** 22 + 7, "host": host + "-elsewhere"}, False)]:
        lock.write_text(json.dumps({**other, "started": "earlier"}))
        if stale:
            with sapo_utils.run.prepare_output_dir(tmp_path, True, False, {}):
                assert "taking over the lock" in capsys.readouterr().out
            assert not lock.exists()
        else:
            with pytest.raises(sapo_utils.errors.UserError, match=f"pid {other['pid']} on {other['host']}, started earlier"):
                sapo_utils.run.prepare_output_dir(tmp_path, True, False, {})
            assert json.loads(lock.read_text())["pid"] == other["pid"]     # a refused run leaves it alone


def test_an_unwritable_output_folder_is_one_line(monkeypatch, tmp_path):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(sapo_utils.run, "replace_text", denied)
    with pytest.raises(sapo_utils.errors.UserError, match=f"{tmp_path / 'o'}: cannot write to the output folder: Permission"):
        sapo_utils.run.prepare_output_dir(tmp_path / "o", False, False, {})
    assert not (tmp_path / "o" / ".lock").exists()
