"""Per-view batch normalisation in one pass (BYOL section 3.1, appendix A).

The authors' code forwards each augmented view through the networks on its own, so every batch-norm
layer normalises a view with that view's statistics. ``byol.BYOL`` instead forwards both views as
ONE batch of 2B (convolutions see 2B images at once) inside :func:`view_groups` ``(2)``; every
batch-norm layer of its networks then splits its input into 2 equal groups along the batch and
normalises each with its own statistics. The design is explicit in two steps:

* :func:`per_view_batch_norm` (called by ``BYOL.__init__``) turns every ``nn.BatchNorm{1,2,3}d`` of a
  network into :class:`PerViewBatchNorm1d` / ``2d`` / ``3d`` *in place*: the module object keeps its
  identity, parameters, buffers, hooks and ``state_dict`` keys and stays an instance of its
  ``nn.BatchNorm*d`` class (only the class is swapped to a subclass whose ``forward`` reads the view
  grouping, as torch's own lazy modules swap their class when they materialise).
* :func:`view_groups` sets the number of view groups for the duration of one forward pass (a
  process-wide setting, as ``torch.autocast`` is a thread-wide one; ``BYOL.forward`` sets it; two
  learners running forward at once in different threads are not supported).
  Outside it, and in evaluation mode, every layer is exactly ``nn.BatchNorm`` (single-view calls:
  ``return_embedding``, linear evaluation, fine-tuning).

Each group's outcome is that of a separate forward pass: its output, the gradients of the input and
of the scale and bias, and the running statistics, which are updated once per view in view order
(view 1, then view 2), as two passes would. Process-locally this uses torch's own batch-norm kernel
on each group (so the numbers are those of two passes, bit for bit, for the same group) and
concatenates the outputs (one copy of the layer's output per forward and backward).

Statistics over several processes (synchronised batch norm) are the subclass
``runtime/sync_batchnorm.AllReduceBatchNorm``, which shares this forward. This module is part of the
installable method (no Determined, no ``runtime/``).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_VIEW_GROUPS = 1  # set by view_groups() for the duration of one forward pass
# The num_batches_tracked counters the per-view layers of the current view_groups() pass leave for
# its end, each with the batches it counts: one multi-tensor add for the whole network instead of one
# launch per layer (a ResNet-50 learner has 109 batch-norm layers).
_PENDING_COUNTS: Optional[Dict[int, list]] = None


@contextlib.contextmanager
def view_groups(count: int) -> Iterator[None]:
    """Within this context every per-view batch-norm layer (:func:`per_view_batch_norm`,
    :class:`AllReduceBatchNorm`) in training mode splits its batch into ``count`` equal groups, in
    order, and normalises each with its own statistics. The layers' ``num_batches_tracked``
    counters (read only by ``momentum=None`` layers, which count at once) are advanced together
    when the context ends, also when the pass raised (as each layer that ran would have)."""
    global _VIEW_GROUPS, _PENDING_COUNTS
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"view_groups needs a positive number of groups, got {count!r}")
    previous, _VIEW_GROUPS = _VIEW_GROUPS, count
    previous_counts, _PENDING_COUNTS = _PENDING_COUNTS, {}
    try:
        yield
    finally:
        pending, _VIEW_GROUPS, _PENDING_COUNTS = _PENDING_COUNTS, previous, previous_counts
        _advance_counters(pending)


def _advance_counters(pending: Dict[int, list]) -> None:
    """Adds to each pending counter its batches: one ``_foreach_add_`` per (device, number), each
    counter once per call (a layer run twice in one pass counts twice, in one add)."""
    calls: Dict[tuple, List[torch.Tensor]] = {}
    for counter, batches in pending.values():
        calls.setdefault((counter.device, batches), []).append(counter)
    for (_, batches), counters in calls.items():
        torch._foreach_add_(counters, batches)


def _count_batches(counter: torch.Tensor, batches: int) -> None:
    """``counter += batches``, now, or at the end of the current :func:`view_groups` pass."""
    if _PENDING_COUNTS is None:
        counter.add_(batches)
        return
    entry = _PENDING_COUNTS.setdefault(id(counter), [counter, 0])
    entry[1] += batches


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class PerViewForward:
    """The forward pass shared by the per-view classes (a mixin before a ``_BatchNorm`` class)."""

    synchronised = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        batch_statistics = self.training or self.running_mean is None
        views = _VIEW_GROUPS if batch_statistics else 1
        world = _distributed_world() if batch_statistics and self.synchronised else 1
        if views == 1 and world == 1:
            return _BatchNorm.forward(self, input)   # exactly nn.BatchNorm
        if input.shape[0] % views:
            raise ValueError(f"a batch of {input.shape[0]} cannot be split into {views} equal view groups")
        factors = self._momentum_factors(views)
        update = self.training and self.track_running_stats
        running_mean, running_var = (self.running_mean, self.running_var) if update else (None, None)
        if world == 1:  # torch's kernel on each view: the numbers of separate passes
            return torch.cat([F.batch_norm(group, running_mean, running_var, self.weight, self.bias, True,
                                           factor, self.eps)
                              for group, factor in zip(input.chunk(views), factors)])
        return self._global_statistics(input, running_mean, running_var, factors, views)

    def _global_statistics(self, input: torch.Tensor, running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], factors: Sequence[float], views: int) -> torch.Tensor:
        """Statistics over every process's batch (a ``synchronised`` subclass defines it:
        ``runtime/sync_batchnorm.AllReduceBatchNorm``)."""
        raise NotImplementedError

    def _momentum_factors(self, views: int) -> Sequence[float]:
        """The running-average factor of each view's update, counting one batch per view as separate
        passes would (``nn.BatchNorm``'s rule; ``momentum=None``, a cumulative average, reads the
        count back to the host as torch does)."""
        if not (self.training and self.track_running_stats):
            return [0.0] * views
        if self.momentum is not None:
            _count_batches(self.num_batches_tracked, views)
            return [self.momentum] * views
        factors = []
        for _ in range(views):
            self.num_batches_tracked.add_(1)
            factors.append(1.0 / float(self.num_batches_tracked))
        return factors


class PerViewBatchNorm1d(PerViewForward, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with per-view statistics inside :func:`view_groups`."""


class PerViewBatchNorm2d(PerViewForward, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with per-view statistics inside :func:`view_groups`."""


class PerViewBatchNorm3d(PerViewForward, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with per-view statistics inside :func:`view_groups`."""


_PER_VIEW = {nn.BatchNorm1d: PerViewBatchNorm1d, nn.BatchNorm2d: PerViewBatchNorm2d,
             nn.BatchNorm3d: PerViewBatchNorm3d}


def per_view_batch_norm(module: nn.Module) -> nn.Module:
    """Every ``nn.BatchNorm{1,2,3}d`` of ``module`` becomes per-view capable in place (its class is
    swapped to the ``PerViewBatchNorm*d`` subclass; same object, parameters, buffers, hooks and
    state_dict keys). Per-view layers and :class:`AllReduceBatchNorm` are kept; any other batch norm
    (``nn.SyncBatchNorm``, a subclass with its own forward, an uninitialised lazy layer) cannot keep
    BYOL's per-view statistics and is refused with its name."""
    for name, layer in module.named_modules():
        if not isinstance(layer, _BatchNorm) or isinstance(layer, PerViewForward):
            continue
        per_view = _PER_VIEW.get(type(layer))
        if per_view is None:
            raise ValueError(
                f"batch-norm layer {name or type(layer).__name__!r} ({type(layer).__name__}) cannot normalise "
                "each view with its own statistics; use nn.BatchNorm1d/2d/3d (for synchronised batch norm, "
                "runtime.sync_batchnorm.convert_sync_batchnorm(learner) after building the learner)")
        layer.__class__ = per_view
    return module
