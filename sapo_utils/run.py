"""The output folder of a run: one run at a time (a lock file), config.json, and stop signals (SIGTERM, SIGINT)."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from sapo_utils.checkpoints import replace_text, why
from sapo_utils.errors import Stopped, UserError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, owned by someone else
        return True
    return True


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot, /proc/<pid>/stat field 22): tells the process that wrote
    a lock from a later one that got the same pid (containers restart their pids from 1). None without /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _lock_is_stale(other: dict, host: str) -> bool:
    """Is the run named by a lock gone? Only decidable on its own host: its pid is dead, or now belongs to a
    process that started later than the one that wrote the lock."""
    pid = other.get("pid")
    if not isinstance(pid, int) or other.get("host") != host:
        return False
    if not _pid_alive(pid):
        return True
    start, recorded = _process_start(pid), other.get("pid_start")
    if start is not None and recorded is not None:
        return start != recorded
    return pid == os.getpid()    # no /proc: a lock with our own pid was written by an earlier life of this pid


class RunLock:
    """<output-dir>/.lock holds the pid and host of the run using the folder. A second run into the same folder
    is refused, naming the first; a lock left by a run that is gone (a dead pid on this host) is taken over with
    a message. The lock file is written whole and then linked into place, so it is never seen half-written."""

    def __init__(self, out: Path):
        self.path, self.held = out / ".lock", False

    def _create(self, me: dict) -> bool:
        """Create the lock file holding `me`; False if one exists."""
        tmp = self.path.with_name(f".lock.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, self.path)                  # atomic, and fails if a lock exists (like O_EXCL)
        except FileExistsError:
            return False
        except OSError:                              # a filesystem without hard links: exclusive create
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "pid_start": _process_start(os.getpid())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create(me):
                self.held = True
                return
            try:
                other = json.loads(self.path.read_text())
            except (OSError, ValueError):
                other = {}
            pid, host = other.get("pid"), other.get("host")
            if _lock_is_stale(other, me["host"]):
                print(f"{self.path.parent}: taking over the lock of a run that is gone (pid {pid} on {host}, "
                      f"started {other.get('started')})", flush=True)
                self.path.unlink(missing_ok=True)
                continue
            raise UserError(f"{self.path.parent}: another run is using this folder (pid {pid} on {host}, started "
                            f"{other.get('started')}); wait for it, or delete {self.path} if it is dead") from None
        raise UserError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, config: dict) -> RunLock:
    """Lock the folder, apply the rules (a non-empty folder needs --resume or --overwrite), write config.json.
    Whatever goes wrong after the lock is taken releases it; an unwritable folder is a one-line UserError."""
    lock = RunLock(out)
    try:
        existing = out.exists() and any(p.name != ".lock" for p in out.iterdir())
        lock.acquire()
        if existing and not resume and not overwrite:
            raise UserError(f"{out}: output folder is not empty; pass --resume to continue or --overwrite to "
                            "replace it")
        if overwrite and not resume:
            for p in out.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        replace_text(out / "config.json", json.dumps(config, indent=1))
    except BaseException as e:
        lock.release()
        if isinstance(e, OSError):
            raise UserError(f"{out}: cannot write to the output folder: {why(e)}") from None
        raise
    return lock



def _say(line: str) -> None:
    """A line on stderr from a signal handler: os.write, since print() re-entered while the interrupted code is
    itself printing raises RuntimeError (reentrant call)."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError, AttributeError):     # no file descriptor (a notebook): print, if it can
        try:
            print(line, file=sys.stderr, flush=True)
        except RuntimeError:
            pass


class StopSignals:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) while active; what the first one does depends on `phase`, which
    the loop sets:
      setup      nothing trained yet: stop at once (Stopped is raised from the handler); nothing is lost
      training   only set `signum`: the loop finishes its optimizer step, writes a checkpoint, raises Stopped
      finishing  the last step is done: the final save and evaluation complete, and the run ends normally
    A second one ends the process at once, by the signal's default action (the last checkpoint is intact: writes
    are atomic; the lock it leaves is taken over by the next run). Only the main thread can have handlers."""

    DOING = {"training": "finishing this step, then writing a checkpoint",
             "finishing": "the last step is done: saving the final model and evaluating it"}

    def __init__(self, phase: str = "setup"):
        self.signum, self.phase, self._previous = None, phase, {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:           # second signal: the default action (or the caller's handler), now
            _say(f"{name} again: stopping at once")
            previous = self._previous.get(signum)
            self.restore()
            if previous in (None, signal.SIG_DFL, signal.default_int_handler):
                signal.signal(signum, signal.SIG_DFL)     # SIGINT dies too, instead of a KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.phase == "setup":
            _say(f"\n{name}: stopping (still setting up: nothing trained yet)")
            raise Stopped(signum, "stopped during setup, before any step was trained: nothing new to save; start "
                          "again with the same command plus --resume")
        _say(f"\n{name}: {self.DOING[self.phase]} (send it again to stop at once)")

    def __enter__(self):
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(s) != signal.SIG_IGN:     # an ignored signal stays ignored (nohup, `cmd &`)
                    self._previous[s] = signal.signal(s, self._handle)
        except ValueError:                    # not the main thread (e.g. a notebook worker): no handlers
            self.restore()
        return self

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def __exit__(self, *exc):
        self.restore()
        return False



def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global random streams."""
    import random
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """One training run's plumbing, called by sapo.train at a few named points: the output
    folder and its lock, stop signals, checkpoints and resuming, metrics.jsonl / TensorBoard,
    samples.jsonl, the progress bar and timings, held-out scores when due, the final model
    and summary.json.

        with Run(cfg, config_dict, on_step) as run:
            run.say("loading the model")        # one line per setup phase (stdout not a tty)
            run.start(models, optimizer, scheduler, rng, device, loop, heldout)
            while ...:
                run.step_started(); with run.timing("generation"): ...
                run.end_step(step, policy, metrics, tok, fresh_tuples, negatives)
            run.finish(policy, tok, dropout_rates); run.summary(...)

    `loop` is the caller's declaration of what a checkpoint holds besides weights, optimizer,
    scheduler and RNG: a dict of JSON values and objects with state_dict()/load_state_dict().
    """

    def __init__(self, cfg, config: dict, on_step=None):
        self.cfg, self.config, self.on_step = cfg, config, on_step
        self.out = Path(cfg.output_dir)
        self.signals = StopSignals()
        self.lock = self.log = self.bar = None
        self.n_samples, self.times, self.t0 = 0, {}, 0.0

    def __enter__(self):
        self.signals.__enter__()
        try:
            self.lock = prepare_output_dir(self.out, self.cfg.resume, self.cfg.overwrite,
                                           self.config)
        except BaseException:
            self.signals.restore()
            raise
        return self

    def __exit__(self, *exc):
        try:
            if self.bar is not None:
                self.bar.close()
            if self.log is not None:
                self.log.close()
        finally:
            self.lock.release()
            self.signals.restore()
        return False

    def say(self, what: str) -> None:
        """One line per setup phase, for logs (a terminal has the progress bar instead)."""
        if self.signals.phase == "setup" and not sys.stdout.isatty():
            print(f"[setup] {what}", flush=True)

    # -- checkpoints: the caller declares what they hold; this decides how they are written
    def start(self, models: dict, optimizer, scheduler, rng, device, loop: dict, heldout):
        """Resume from the newest complete checkpoint (with --resume), else score the starting
        model on the held-out prompts; then open the logs. From here a signal finishes the
        step and checkpoints."""
        from tqdm.auto import tqdm
        from sapo_utils.checkpoints import latest_checkpoint, load_checkpoint
        from sapo_utils.report import MetricsLog, trim_jsonl
        self.models = {name: m for name, m in models.items() if m is not None}
        self.trainer_state = {"optimizer": optimizer, "scheduler": scheduler}
        self.rng, self.device, self.loop, self.heldout = rng, device, loop, heldout
        path = latest_checkpoint(self.out / "checkpoints") if self.cfg.resume else None
        if path is not None:
            self.say(f"resuming from {path}")
            saved = load_checkpoint(path, self.models, self.trainer_state, rng, device)
            if missing := [key for key in loop if key not in saved]:
                raise UserError(f"{path}: state.json has no {', '.join(missing)}: written by "
                                "another version of sapo; resume it with that version, or start "
                                "a new run")
            for key, value in loop.items():
                if hasattr(value, "load_state_dict"):
                    value.load_state_dict(saved[key])
                else:
                    loop[key] = saved[key]
            heldout.start_from(loop["before"])
        else:
            self.say("scoring the held-out prompts")
            loop["before"] = heldout.before(self.models["policy"])
        step = loop["step"]
        self.signals.phase = "training"
        self.log = MetricsLog(self.out, step, self.cfg.report_to)
        self.n_samples = trim_jsonl(self.out / "samples.jsonl", step)
        self.bar = tqdm(total=self.cfg.max_steps, initial=step, desc=self.cfg.method,
                        dynamic_ncols=True, disable=None)

    def save_checkpoint(self, step: int) -> None:
        from sapo_utils.checkpoints import rng_state, save_checkpoint
        tensors, python_rng = rng_state(self.rng, self.device)
        state = {key: value.state_dict() if hasattr(value, "state_dict") else value
                 for key, value in self.loop.items()}
        state["python_rng"] = python_rng
        save_checkpoint(self.out / "checkpoints", step, self.models,
                        {**self.trainer_state, **tensors}, state, self.cfg.keep_checkpoints)

    # -- the loop
    def step_started(self) -> None:
        self.t0, self.times = time.perf_counter(), {}

    @contextlib.contextmanager
    def timing(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t

    def end_step(self, step: int, policy, metrics: dict, tok, fresh_tuples: list,
                 negatives: str) -> None:
        """Add timings, the share of negatives equal to y+ and the held-out scores due; log;
        write sample negatives; checkpoint when due or after a signal; call on_step; stop
        after a signal."""
        from sapo_utils.report import append_samples, identical
        cfg = self.cfg
        online = negatives in ("ema", "policy")
        written = sum(t["segment_len"] for t in fresh_tuples) if online else 0
        generation_s = max(self.times.get("generation", 0.0), 1e-9)
        metrics["gen/tokens_per_s"] = written / generation_s
        metrics["time/step_s"] = time.perf_counter() - self.t0
        if negatives == "none":
            fresh_tuples = []
        else:
            same = identical(fresh_tuples)
            metrics["negatives/identical"] = sum(same) / max(1, len(same))
        room = cfg.num_samples - self.n_samples
        self.n_samples += append_samples(self.out / "samples.jsonl", tok, fresh_tuples, step, room)
        metrics.update(self.heldout.due(policy, step))
        echo = self._echo if step % cfg.log_every == 0 else None
        self.log.write(metrics, echo=echo)
        self.bar.update(1)
        due = cfg.save_steps >= 0 and (step == cfg.max_steps or
                                       (cfg.save_steps and step % cfg.save_steps == 0))
        saved = bool(self.signals.signum or due)
        if saved:
            self.save_checkpoint(step)
        if self.on_step is not None:
            self.on_step(step, policy, metrics)
        if self.signals.signum and saved and step < cfg.max_steps:
            # (a signal during on_step: the next step stops)
            raise Stopped.after_step(self.signals.signum, step, self.out / "checkpoints")

    def _echo(self, line: str) -> None:
        """A metrics line above the progress bar, flushed (a log file sees it at once)."""
        self.bar.write(line)
        sys.stdout.flush()

    def finish(self, policy, tok, config_values=None) -> None:
        """The last step is done: a signal now lets the final save and evaluation complete.
        final/ is the policy as a transformers folder (config_values: the dropout rates the
        loop set to 0, saved as they were)."""
        from sapo_utils.checkpoints import save_final
        self.bar.close()
        self.signals.phase = "finishing"
        save_final(policy, tok, self.out / "final", config_values)

    def summary(self, tok, eval_examples, after) -> dict:
        """summary.json and metrics.png; returns the summary."""
        from sapo_utils.report import write_summary
        self.log.close()
        self.log = None
        rows = self.out / "metrics.jsonl"
        lines = rows.read_text().splitlines() if rows.exists() else []
        lines = [line for line in lines if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
        return write_summary(self.out, tok, eval_examples, self.loop["before"], after, last)
