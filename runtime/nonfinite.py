"""The non-finite loss check without a host synchronisation per step.

A diverged BYOL run (too large a learning rate for LARS, section 3.3; bad data) must stop, name the
step, and never checkpoint non-finite weights. Reading the loss on the host every step (``.item()``)
would stall a GPU once per step, so :class:`NonFiniteWatch` records, on the device, the first step
whose loss was not finite, and the trial reads that record every ``finite_check_period`` steps and at
the end of every training workload, i.e. before every validation and every checkpoint the harness
takes (``FiniteCheckCallback.on_training_workload_end``). A stop request (SIGTERM/SIGINT,
``stops.py``) travels in the same all_reduce, each rank's signal in its own slot, so with several
processes a stop asked of any of them takes effect on all at the next check; one process stops
after the current step. Checkpoint writing additionally checks the
weights themselves (``checkpoints.check_finite``), whatever the period.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from determined import pytorch


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left untouched."""


class NonFiniteWatch:
    """Device-side record of the first global step whose loss was NaN or infinite, and of the last
    loss; both are read on the host only at a check (:meth:`local_first_bad`, :meth:`agree`), and
    ``last_read`` keeps what the last check read: ``(step, loss)``, the loss of global step index
    ``step`` (the mean over processes after :meth:`agree`), for progress lines that must not
    synchronise with the device themselves."""

    def __init__(self, period: int):
        if period < 1:
            raise ValueError(f"finite_check_period must be >= 1, got {period}")
        self.period = period
        self.first_bad: Optional[torch.Tensor] = None   # int64 scalar on the loss's device; -1: none
        self.stop_signals: Dict[int, int] = {}  # rank -> signal of each process asked to stop, as agreed
        self.last_loss: Optional[torch.Tensor] = None   # the loss of step last_step, on its device
        self.last_step = -1
        self.last_read: Optional[Tuple[int, float]] = None

    def record(self, loss: torch.Tensor, step: int) -> None:
        """Notes ``step`` if ``loss`` is not finite (no host synchronisation)."""
        if self.first_bad is None or self.first_bad.device != loss.device:
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
        loss = loss.detach()
        bad = ~torch.isfinite(loss).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.last_loss, self.last_step = loss, step

    def due(self, step: int) -> bool:
        """Whether the step with index ``step`` ends a check period."""
        return (step + 1) % self.period == 0

    def local_first_bad(self) -> Optional[int]:
        """This process's record, read back with the last loss (one synchronisation)."""
        if self.first_bad is None:
            return None
        # float64 holds every step index exactly (below 2**53)
        first, loss = torch.stack([self.first_bad.double(), self.last_loss.double().reshape(())]).tolist()
        self.last_read = (self.last_step, loss)
        return int(first) if first >= 0 else None

    def agree(self, rank: int, world_size: int, stop: int = 0) -> Tuple[List[Tuple[int, int]], bool]:
        """``(rank, first bad step)`` of every process with a non-finite loss, and whether any process
        was asked to stop (``stop``: this process's signal number, 0 for none; ``stops.py``), known to
        every process in one all_reduce: all of them stop together at the same step, and
        :attr:`stop_signals` names which rank got which signal. The last losses travel in the same
        all_reduce (their mean goes to ``last_read``). A collective when ``world_size > 1``: every
        rank must call it at the same step."""
        if world_size == 1:
            first = self.local_first_bad()
            self.stop_signals = {0: int(stop)} if stop else {}
            return ([] if first is None else [(0, first)]), bool(stop)
        device = self.first_bad.device if self.first_bad is not None else torch.device("cpu")
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        # [first bad step + 1 of each rank (0: none), signal of each rank (0: none), sum of last losses,
        # ranks with one]; float64 holds the step indices exactly.
        flags = torch.zeros(2 * world_size + 2, dtype=torch.float64, device=device)
        if self.first_bad is not None:
            flags[rank] = self.first_bad.to(device) + 1
            flags[2 * world_size] = self.last_loss.to(device).double().reshape(())
            flags[2 * world_size + 1] = 1
        flags[world_size + rank] = int(stop)
        dist.all_reduce(flags)
        values = flags.tolist()
        if values[2 * world_size + 1] > 0:
            self.last_read = (self.last_step, values[2 * world_size] / values[2 * world_size + 1])
        bad = [(index, int(value) - 1) for index, value in enumerate(values[:world_size]) if value > 0]
        self.stop_signals = {index: int(value) for index, value in enumerate(values[world_size:2 * world_size])
                             if value}
        return bad, bool(self.stop_signals)


class FiniteCheckCallback(pytorch.PyTorchCallback):
    """Reads the record at the end of every training workload (every rank, before the harness
    validates or checkpoints) and, on the chief, once more as a checkpoint starts (a preemption
    checkpoint included)."""

    def __init__(self, trial) -> None:
        self.trial = trial

    def on_training_workload_end(self, avg_metrics, batch_metrics) -> None:
        self.trial.check_finite_loss()

    def on_checkpoint_save_start(self, checkpoint) -> None:
        first = self.trial.finite_watch.local_first_bad()
        if first is not None:
            self.trial.check_finite_loss_local(first)
