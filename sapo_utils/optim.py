"""The optimizer, the learning-rate schedule (linear warmup, then linear, cosine, constant or
1/sqrt decay), and the optimizer step that a NaN/inf loss or gradient skips."""
from __future__ import annotations

import math

import torch

from sapo_utils.errors import UserError


def make_optimizer(name: str, params, lr: float, weight_decay: float = 0.0):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.SGD(params, lr=lr)


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int):
    """The LR multiplier at each step: linear warmup over warmup_steps (at least 1), then the
    schedule's decay over the remaining steps."""
    warmup = max(1, warmup_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, max_steps - warmup)
        return {"linear": max(0.0, 1 - progress),
                "cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, progress))),
                "constant": 1.0,
                "inverse_sqrt": math.sqrt(warmup / (step + 1))}[schedule]
    return f


def make_scheduler(optimizer, schedule: str, warmup_steps: int, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps,
                                                                  max_steps))


def guarded_step(optimizer, params, max_grad_norm: float, losses: list[float],
                 on_nonfinite: str, step: int) -> tuple[float, bool]:
    """Clip the gradient norm (0: no clipping) and step, unless a loss or the gradient is
    NaN/inf: then skip the step (the weights stay as they were) or, with on_nonfinite='stop',
    raise a UserError. Returns (gradient norm, whether the step was skipped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf).item()
    if math.isfinite(grad_norm) and all(math.isfinite(x) for x in losses):
        optimizer.step()
        return grad_norm, False
    if on_nonfinite == "stop":
        raise UserError(f"non-finite loss or gradient at step {step + 1} (loss {losses}); lower "
                        "--lr, or pass --on-nonfinite skip; the last checkpoint is intact")
    return grad_norm, True


def optimization(options, params):
    """The optimizer over the trainable ones of params, and the learning-rate schedule: linear warmup
    (options.warmup_steps, or options.warmup_ratio of options.max_steps), then options.schedule."""
    trainable = [p for p in params if p.requires_grad]
    optimizer = make_optimizer(options.optimizer, trainable, options.lr, options.weight_decay)
    warmup = options.warmup_steps or int(options.warmup_ratio * options.max_steps)
    return optimizer, make_scheduler(optimizer, options.schedule, warmup, options.max_steps)
