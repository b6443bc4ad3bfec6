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
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

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
        # Per (group, device, dtype): the buffer that holds each tensor's trust ratio at its size
        # (PerTensorValues); rebuilt when the tensors with a gradient change. Not optimiser state.
        self._trust_buffers: dict = {}
        # Per (group, device, dtype): tensors like the gradients that receive ``g + wd * w`` every step
        # (allocated once: a fresh parameter-sized list per step cost more than the arithmetic on the
        # CPU, whose allocator returns large blocks to the system). Not optimiser state.
        self._decayed: dict = {}

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient: a handful of multi-tensor
        (``torch._foreach_*``) launches per group and dtype instead of several per tensor (a
        ResNet-50 has 161 parameter tensors), no host synchronisation. Same arithmetic, in the same
        order, as the per-tensor form in the class docstring.

        ATen's multi-tensor fast path on CUDA (``check_fast_path_restrictions`` in
        aten/src/ATen/native/ForeachUtils.h) needs (a) one device and one dtype for every tensor of
        every list of a call, strided, non-overlapping and dense, and (b) in list-list ops, equal
        sizes and strides for the paired tensors. (a): parameters are split by device and dtype
        (:func:`same_device_and_dtype`), and gradients and momentum buffers share their parameter's
        dtype. (b): a gradient has its parameter's sizes and strides (autograd's layout contract),
        a momentum buffer is a clone of a gradient, and on CUDA the trust ratios are multiplied in
        as tensors of each gradient's sizes and strides (:class:`PerTensorValues`), not as 0-d
        tensors paired with whole gradients (which sends the call to the per-tensor slow path; on
        the CPU, which has only that path, they are: :meth:`_scaled`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            with_grad = [p for p in group["params"] if p.grad is not None]
            for positions in same_device_and_dtype(with_grad):
                params = [with_grad[i] for i in positions]
                self._update(params, group, (index, params[0].device, params[0].dtype))
        return loss

    @staticmethod
    def spreads_trust_ratios(device: torch.device) -> bool:
        """Whether trust ratios are spread to the gradients' shapes on ``device`` (:meth:`_scaled`)."""
        return device.type == "cuda"

    def _scaled(self, grads: List[torch.Tensor], trust: torch.Tensor, key: tuple, owned: bool) -> List[torch.Tensor]:
        """``grads[i] * trust[i]``; in place when the list is ``owned`` (made by this step, not the
        parameters' ``.grad``). On CUDA the ratios are spread to each gradient's sizes and strides
        (:class:`PerTensorValues`) so that the call takes the multi-tensor fast path. Elsewhere there
        is no fast path to keep (CPU ``_foreach_*`` ops loop over the tensors), and spreading would
        write and read a parameter-sized buffer every step (about 100 MB for a ResNet-50: a fifth of
        the 64 px trial step of ``bench/throughput.py --done-when`` on one CPU thread, under
        ``torch.profiler``), so each gradient is multiplied by its 0-d ratio."""
        if self.spreads_trust_ratios(grads[0].device):
            buffer = self._trust_buffers.get(key)
            if buffer is None or not buffer.fits(grads):
                buffer = self._trust_buffers[key] = PerTensorValues(grads)
            ratios = buffer.fill(trust)
        else:
            ratios = list(trust.unbind())
        if owned:
            torch._foreach_mul_(grads, ratios)
            return grads
        return torch._foreach_mul(grads, ratios)

    def _update(self, params: List[torch.Tensor], group: dict, key: tuple) -> None:
        """The update of ``params`` (one device and dtype) of ``group``."""
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            decayed = self._decayed.get(key)
            if decayed is None or _layout(decayed) != _layout(grads):
                decayed = self._decayed[key] = [torch.empty_like(g) for g in grads]
            torch._foreach_copy_(decayed, grads)
            torch._foreach_add_(decayed, params, alpha=group["weight_decay"])
            grads = decayed
        if group["lars_adaptation"]:
            param_norms = torch.stack(torch._foreach_norm(params))
            grad_norms = torch.stack(torch._foreach_norm(grads))
            trust = torch.where((param_norms > 0) & (grad_norms > 0),
                                group["eta"] * param_norms / grad_norms, torch.ones_like(param_norms))
            grads = self._scaled(grads, trust, key, owned=bool(group["weight_decay"]))
        fresh = [i for i, p in enumerate(params) if "momentum_buffer" not in self.state[p]]
        for i in fresh:  # the first step only
            self.state[params[i]]["momentum_buffer"] = torch.clone(grads[i]).detach()
        fresh_set = set(fresh)
        kept = [i for i in range(len(params)) if i not in fresh_set]
        if kept:
            buffers = [self.state[params[i]]["momentum_buffer"] for i in kept]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, [grads[i] for i in kept])
        torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])


def same_device_and_dtype(tensors: Sequence[torch.Tensor]) -> List[List[int]]:
    """Positions of ``tensors`` grouped by (device, dtype), groups in order of first appearance: the
    tensors of one ``torch._foreach_*`` call must share both to take ATen's multi-tensor fast path
    (``check_fast_path_restrictions``, aten/src/ATen/native/ForeachUtils.h). Ours, because torch's
    own grouping (``torch.utils._foreach_utils``) is private."""
    groups: Dict[tuple, List[int]] = {}
    for position, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(position)
    return list(groups.values())


def _layout(tensors: Sequence[torch.Tensor]) -> tuple:
    """What must stay the same for buffers made like ``tensors`` to be reused: sizes, strides, dtype, device."""
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)


def _dense_strides(tensor: torch.Tensor) -> Tuple[int, ...]:
    """``tensor``'s strides if it is non-overlapping and dense (its elements fill a block of memory
    in some order of dimensions: contiguous, channels_last, ...), else the contiguous ones."""
    expected = 1
    for dim in sorted((d for d in range(tensor.dim()) if tensor.size(d) != 1), key=tensor.stride):
        if tensor.stride(dim) != expected:
            break
        expected *= tensor.size(dim)
    else:
        return tensor.stride()
    contiguous, step = [], 1
    for size in reversed(tensor.shape):
        contiguous.insert(0, step)
        step *= size
    return tuple(contiguous)


class PerTensorValues:
    """One value per tensor of a list, held as tensors of those tensors' sizes and strides (views of
    one flat buffer), so that a list-list ``torch._foreach_*`` call pairing them with the list stays
    on ATen's fast path (equal sizes and strides of paired tensors). :meth:`fill` writes a 1-D
    tensor of values (on the device, no host synchronisation) in two launches: ``repeat_interleave``
    with a known output size (so it need not read the counts back), and a copy into the buffer.
    Costs one buffer of the list's size, kept while the list's layout stays the same."""

    def __init__(self, like: Sequence[torch.Tensor]):
        self.layout = _layout(like)
        first = like[0]
        counts = [t.numel() for t in like]
        self.total = sum(counts)
        counts_on_host = torch.tensor(counts, dtype=torch.int64)
        if first.device.type == "cuda":  # a non-blocking copy needs pinned memory: no synchronisation
            counts_on_host = counts_on_host.pin_memory()
        self.counts = counts_on_host.to(first.device, non_blocking=True)
        self.flat = torch.empty(self.total, dtype=first.dtype, device=first.device)
        offsets = [0]
        for count in counts[:-1]:
            offsets.append(offsets[-1] + count)
        self.views = [self.flat.as_strided(t.shape, _dense_strides(t), offset)
                      for t, offset in zip(like, offsets)]

    def fits(self, tensors: Sequence[torch.Tensor]) -> bool:
        return _layout(tensors) == self.layout

    def fill(self, values: torch.Tensor) -> List[torch.Tensor]:
        """Tensor ``i`` of the result holds ``values[i]`` everywhere."""
        self.flat.copy_(torch.repeat_interleave(values, self.counts, output_size=self.total))
        return self.views


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
