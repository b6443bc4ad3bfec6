"""Optimisation for BYOL (section 3.3 and appendix C of Grill et al. 2020).

- LARS (You et al. 2017) with trust coefficient 1e-3, momentum 0.9 and weight decay 1.5e-6; biases
  and batch-norm parameters are excluded from both weight decay and the LARS adaptation.
- One schedule, :func:`cosine_schedule`, for every value that changes with the step: the learning
  rate (``base_lr * global_batch / 256``, linear warm-up, cosine decay to zero), the EMA decay tau
  (section 3.2, cosine from tau_base to 1) and the linear-evaluation heads' learning rates
  (appendix C.1, cosine to zero); :func:`apply_schedule` is the one place that sets an optimiser's
  learning rates from it.

Schedules are pure functions of the global step and the total step count, so a resumed run
continues them exactly.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from utils import InputError


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with heavy-ball momentum.

    For parameter groups with ``lars_adaptation=True`` the update is
        g <- g + wd * w
        g <- g * eta * ||w|| / ||g||      (trust ratio, when both norms are positive)
        m <- momentum * m + g
        w <- w - lr * m
    Groups with ``lars_adaptation=False`` (biases, batch-norm) use plain SGD with momentum and their
    own ``weight_decay`` (0 in :func:`lars_param_groups`).

    Written here rather than taken from a library because torch has no LARS and the paper's exact
    exclusion rules matter.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1.5e-6,
                 eta: float = 1e-3, lars_adaptation: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS settings lr={lr} momentum={momentum} "
                             f"weight_decay={weight_decay} eta={eta}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                        lars_adaptation=lars_adaptation)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, a handful of multi-tensor
        (``torch._foreach_*``) launches per group instead of several per tensor (a ResNet-50 has
        161 parameter tensors). Same arithmetic, in the same order, as the per-tensor form in the
        class docstring."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            if group["lars_adaptation"]:
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((param_norms > 0) & (grad_norms > 0),
                                    group["eta"] * param_norms / grad_norms, torch.ones_like(param_norms))
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            fresh = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
            for i in fresh:
                self.state[params[i]]["momentum_buffer"] = torch.clone(grads[i]).detach()
            fresh_set = set(fresh)
            kept = [i for i in range(len(params)) if i not in fresh_set]
            if kept:
                buffers = [self.state[params[i]]["momentum_buffer"] for i in kept]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, [grads[i] for i in kept])
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        return loss


def is_excluded(name: str, param: nn.Parameter) -> bool:
    """Biases and batch-norm parameters (all 1-D tensors) skip weight decay and LARS (appendix C)."""
    return param.ndim <= 1 or name.endswith(".bias")


def lars_param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                      peak_lr: Optional[float] = None) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases/batch-norm (neither); ``peak_lr`` is
    the peak of their learning-rate schedule (:func:`apply_schedule`)."""
    adapted, excluded = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        (excluded if is_excluded(name, param) else adapted).append(param)
    peak = {} if peak_lr is None else {"lr": peak_lr, "initial_lr": peak_lr}
    return [
        {"params": adapted, "weight_decay": weight_decay, "lars_adaptation": True, **peak},
        {"params": excluded, "weight_decay": 0.0, "lars_adaptation": False, **peak},
    ]


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """Section 3.3: LR = base_lr x BatchSize / 256 (base 0.2 in the paper, for LARS)."""
    return base_lr * global_batch_size / 256


def cosine_schedule(step: int, total_steps: int, start: float, end: float = 0.0, warmup_steps: int = 0) -> float:
    """The value at global ``step`` of a schedule over ``total_steps``: a linear warm-up from 0 to
    ``start`` over ``warmup_steps``, then a half cosine from ``start`` to ``end`` at ``total_steps``
    (held there after). One function drives every schedule, as DINO drives its learning rate,
    weight decay and momentum from one cosine scheduler:

    * learning rate (section 3.3): ``start`` = base_lr x batch / 256, ``end`` 0, 10 warm-up epochs;
    * EMA decay (section 3.2): ``start`` = tau_base, ``end`` 1, no warm-up, i.e.
      tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2;
    * linear-evaluation heads (appendix C.1): ``start`` = their scaled rate, ``end`` 0.

    Without steps to schedule (``total_steps <= 0``) the value is ``start``."""
    if total_steps <= 0:
        return start
    step = min(max(step, 0), total_steps)
    if warmup_steps > 0 and step < warmup_steps:
        return start * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return end - (end - start) * (1.0 + math.cos(math.pi * progress)) / 2.0


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Sets each parameter group's learning rate to :func:`cosine_schedule` of its own peak
    (``group["initial_lr"]``, set when the groups are built) at ``step``; returns the first
    group's."""
    for group in optimizer.param_groups:
        if "initial_lr" not in group:
            # Groups built here carry it (lars_param_groups(..., peak_lr), classifier.heads_optimizer), and
            # checkpoints keep it; an optimiser state saved before that (BYOL pretraining before
            # 2026-11-26) has none.
            raise InputError("an optimiser parameter group has no 'initial_lr' (the peak of its learning-rate "
                             "schedule): the checkpoint's optimiser state predates it, so the run cannot be "
                             "resumed exactly; evaluate or warm-start from the checkpoint, or start a new run")
        group["lr"] = cosine_schedule(step, total_steps, group["initial_lr"], 0.0, warmup_steps)
    return optimizer.param_groups[0]["lr"]
