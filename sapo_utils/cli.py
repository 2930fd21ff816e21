"""The command line: config dataclasses become argparse flags (each field's `help` is its --help
text), the checks that turn a bad value into a one-line error before anything is loaded, and
the options every run has (where it writes, what it logs, how it is evaluated): RunOptions,
which sapo.Config extends with the algorithm's own fields."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from dataclasses import dataclass, field

from sapo_utils.errors import UserError
from sapo_utils.report import MetricsLog


def option(default, help, **kw):
    """A config field whose `help` is its --help text (choices=... limits its values)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunOptions:
    """What any trainer has besides its algorithm (TRL keeps these in TrainingArguments): the
    optimizer and its schedule, how it computes, where a run reads and writes, how it is
    evaluated, logged and checkpointed."""
    # the optimizer and its learning-rate schedule
    lr: float = option(1e-6, "peak learning rate (authors at 7-8B: 5e-7 DPO, 5e-6 ORPO)")
    optimizer: str = option("adamw", "adamw | rmsprop (authors' DPO) | sgd",
                            choices=("adamw", "rmsprop", "sgd"))
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW)")
    schedule: str = option("linear", "learning-rate decay after warmup (authors: linear for "
                           "DPO, inverse_sqrt for ORPO)",
                           choices=("linear", "cosine", "constant", "inverse_sqrt"))
    warmup_ratio: float = option(0.1, "fraction of --max-steps warming up (authors' DPO)")
    warmup_steps: int = option(0, "warmup steps, instead of --warmup-ratio when > 0 "
                               "(authors' ORPO: 100)")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    # how it computes
    precision: str = option("fp32", "fp32 | bf16-mixed (fp32 weights, bf16 autocast; the "
                            "bundled model's 4-bit-grid weights need fp32: README) | bf16",
                            choices=("fp32", "bf16-mixed", "bf16"))
    generator_dtype: str = option("auto", "weights that write segments: auto = a bf16 copy "
                                  "where bf16 is native (CUDA, AVX512-BF16, AMX) or training "
                                  "is bf16", choices=("auto", "fp32", "bf16"))
    plain: bool = option(False, "the plain path of sapo.py only, without sapo_fast.py's "
                         "speed-ups (same numbers to float rounding, slower)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward")
    # data and model plumbing
    columns: str = option("", "other row layouts as field=column pairs (prompt=question,"
                          "chosen=answer); applies to --dataset and --eval-dataset")
    dataset_split: str = option("train", "split to use when --dataset is a hub dataset")
    device: str = option("auto", "cpu | cuda | cuda:N | auto")
    trust_remote_code: bool = option(False, "allow models whose code lives on the hub")
    # output folder
    output_dir: str = option("runs/sapo", "metrics.jsonl, samples.jsonl, checkpoints/, final/")
    overwrite: bool = option(False, "allow writing into a non-empty --output-dir")
    resume: bool = option(False, "continue from the newest complete checkpoint in --output-dir")
    # evaluation
    eval_dataset: str = option("", "held-out prompts (default: the bundled held-out file with "
                               "the bundled data, else --eval-size prompts held out of --dataset)")
    eval_size: int = option(16, "number of held-out prompts")
    eval_steps: int = option(5, "held-out log-prob and reward measures every N steps (0: at the "
                             "end only)")
    eval_logps: bool = option(True, "the held-out log-prob and reward measures (they need one "
                              "generation pass for fixed negatives at the start)")
    task: str = option("auto", "a scorer in tasks/ for greedy answers to held-out prompts "
                       "(ifeval_lite, arithmetic); auto: ifeval_lite; none: off")
    task_eval_steps: int = option(0, "also run the task's scorer every N steps (0: before and "
                                  "after training only)")
    eval_max_new_tokens: int = option(96, "longest greedy answer the task's scorer reads")
    eval_only: bool = option(False, "only score --model on the held-out prompts; print JSON")
    # logging and checkpoints
    log_every: int = option(1, "print a metrics line every N steps (all go to metrics.jsonl)")
    num_samples: int = option(8, "example negatives written to samples.jsonl")
    save_steps: int = option(20, "write a resumable checkpoint every N steps (0: at the end "
                             "only; -1: never)")
    keep_checkpoints: int = option(1, "how many checkpoints to keep")
    report_to: str = option("none", "also write TensorBoard scalars to "
                            "<output-dir>/tensorboard", choices=("none", "tensorboard"))
    on_nonfinite: str = option("skip", "a NaN/inf loss or gradient: skip the optimizer step "
                               "(counted) or stop", choices=("skip", "stop"))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; the epilog printed as written."""


def parse_args(config_cls, argv=None, description="", epilog=""):
    """Config fields as --kebab-case flags, the class's own fields first (then RunOptions');
    booleans are switches (--resume / --no-resume)."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog,
                                     formatter_class=_HelpFormatter)
    own = set(vars(config_cls).get("__annotations__", {}))
    fields = dataclasses.fields(config_cls)
    for f in [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]:
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            name = f.type if isinstance(f.type, str) else f.type.__name__
            kind = {"int": int, "float": float, "str": str}[name]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"],
                                choices=f.metadata.get("choices"))
    return config_cls(**vars(parser.parse_args(argv)))


def load_task(name: str):
    """--task: the module tasks/<name>.py, which gives score(answers, rows) -> {name: float} and
    optionally scorable(row) -> bool (which held-out rows it can score; default: all)."""
    if name == "none":
        return None
    name = "ifeval_lite" if name == "auto" else name
    if not name.isidentifier():
        raise UserError(f"--task {name}: not a module name in tasks/")
    try:
        task = importlib.import_module(f"tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name not in (f"tasks.{name}", "tasks"):
            raise
        raise UserError(f"--task {name}: there is no tasks/{name}.py") from None
    if not callable(getattr(task, "score", None)):
        raise UserError(f"--task {name}: tasks/{name}.py has no score(answers, rows) function")
    return task


def check_config(cfg) -> None:
    positive = ("batch_size", "grad_accum", "segment_len", "buffer_capacity", "max_length",
                "max_prompt_length", "log_every", "spin_iterations", "eval_size",
                "keep_checkpoints")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema_decay <= 1.0:
        raise UserError(f"--ema-decay must be in [0, 1], got {cfg.ema_decay}")
    if cfg.max_steps < 0 or cfg.lr <= 0 or cfg.temperature <= 0:
        raise UserError("--max-steps must be >= 0, and --lr and --temperature > 0")
    if cfg.max_prompt_length >= cfg.max_length:
        raise UserError(f"--max-prompt-length ({cfg.max_prompt_length}) must be below "
                        f"--max-length ({cfg.max_length})")
    if cfg.report_to == "tensorboard":
        MetricsLog.tensorboard_writer()      # fail before loading anything without the package
    if cfg.ref_update_steps < -1:
        raise UserError("--ref-update-steps must be >= -1 (-1: once per epoch, 0: never), got "
                        f"{cfg.ref_update_steps}")
    if cfg.max_grad_norm < 0:
        raise UserError(f"--max-grad-norm must be >= 0 (0: no clipping), got {cfg.max_grad_norm}")
    if cfg.save_steps < -1:
        raise UserError(f"--save-steps must be >= -1 (-1: never), got {cfg.save_steps}")
    if cfg.rpo_alpha < 0 or cfg.dpop_lambda < 0:
        raise UserError(f"--rpo-alpha and --dpop-lambda must be >= 0, got {cfg.rpo_alpha}, "
                        f"{cfg.dpop_lambda}")
    if (cfg.rpo_alpha or cfg.dpop_lambda) and cfg.method not in ("sapo-dpo", "dpo", "spin"):
        raise UserError(f"--rpo-alpha and --dpop-lambda change the DPO loss (sapo-dpo, dpo, spin); "
                        f"--method {cfg.method} does not use it")
    if cfg.suffix_free and (cfg.method not in ("sapo-dpo", "sapo-orpo") or cfg.whole_response):
        raise UserError(f"--suffix-free cuts SAPO's segment negatives (sapo-dpo, sapo-orpo, without "
                        f"--whole-response); --method {cfg.method} has none")
    for name in ("warmup_steps", "eval_steps", "task_eval_steps"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")


def main(config_cls, train, evaluate_model, argv=None, description="", epilog="") -> int:
    """The command line around a trainer: parse and check the flags, load the task, then train
    (or, with --eval-only, print the evaluation as JSON). A user's mistake is one line on stderr
    and exit status 2; a stop signal exits with 128 + its number."""
    import json
    import sys
    from sapo_utils.errors import Stopped
    from sapo_utils.report import print_summary
    cfg = parse_args(config_cls, argv, description, epilog)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()   # the terminal is for our progress bar and metrics
    try:
        check_config(cfg)
        task = load_task(cfg.task)
        if cfg.eval_only:
            result = evaluate_model(cfg, task)
            result.pop("responses", None)
            print(json.dumps(result, indent=1))
            return 0
        summary = train(cfg, task)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as e:   # Ctrl-C while reading data, before the handlers
        print(str(e) or "interrupted (SIGINT) before the run started; nothing was written",
              file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    print_summary(summary)
    return 0
