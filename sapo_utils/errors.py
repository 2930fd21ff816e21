"""The two exceptions the command line turns into a one-line message and an exit status."""
from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in the user's input (or a full disk): printed as one line, exit code 2, no traceback."""


class Stopped(Exception):
    """The run stopped on SIGTERM / SIGINT after writing a checkpoint; exit status 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @classmethod
    def after_step(cls, signum: int, step: int, ckpt_root: Path) -> "Stopped":
        return cls(signum, f"stopped at step {step}; checkpoint {ckpt_root / f'step-{step:08d}'}; resume with the "
                   "same command plus --resume")

