"""Stopping a run on request: SIGTERM and SIGINT (Ctrl-C) keep the work done so far.

Long BYOL runs (the paper's 1000 epochs, section 3.3) get stopped: a scheduler's SIGTERM, a user's
Ctrl-C. The first signal asks the trial to stop after the current step (one process) or after the
step of the next non-finite check (several processes: the flag travels in that check's all_reduce,
``nonfinite.NonFiniteWatch.agree``, at most ``finite_check_period`` steps later), the trial calls
Determined's own ``context.set_stop_requested(True)`` and ends the reporting period there
(:class:`StopAwareBatch`), so the harness checkpoints and returns exactly as it does for a
preemption on a cluster. The command line then names the checkpoint and how to resume, and exits
with ``128 + signal`` (no traceback). A second signal stops at once, without a checkpoint, ending
this process's data-loader workers first so that none is left behind.

torchrun forwards the terminal's Ctrl-C to processes that already received it from the terminal: a
repeat within :data:`REPEAT_WINDOW_S` seconds counts as the same request.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Optional

from determined import pytorch

REPEAT_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The signal that asked this process to stop, if any (:data:`REQUEST` is the process's one)."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self.at = 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def install(self) -> None:
        """Handles SIGTERM and SIGINT from now on (only the main thread may; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.signal = None  # a new run (in-process callers may run several)
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal, self.at = signum, time.monotonic()
            if os.environ.get("RANK", "0") == "0":  # rank 0 speaks for all processes
                    print(f"[byol] {signal.Signals(signum).name} received: finishing the current step, then writing a "
                      f"checkpoint (send it again to stop at once, without one)", file=sys.stderr, flush=True)
            return
        if time.monotonic() - self.at < REPEAT_WINDOW_S:
            return  # the same request, forwarded once more (torchrun)
        print(f"[byol] second {signal.Signals(signum).name}: stopping at once, without a checkpoint",
              file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # data-loader workers: none is orphaned
            child.kill()
        os._exit(128 + signum)


REQUEST = StopRequest()


def ignore_in_worker(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data loaders: workers leave SIGINT to the main process, which finishes
    its step and shuts them down (a terminal's Ctrl-C reaches the whole process group). SIGTERM keeps
    its default: it is how the DataLoader and ``multiprocessing`` end workers at shutdown and at
    exit, and a scheduler's SIGTERM goes to the main process, not to its workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopAwareBatch(pytorch.Batch):
    """A reporting period of ``value`` batches that also ends as soon as a stop was agreed on, so
    the harness checks ``context.get_stop_requested()`` after that very step (Determined checks it
    only at period boundaries)."""

    def __init__(self, value: int, context: pytorch.PyTorchTrialContext):
        super().__init__(value)
        self.context = context

    def should_stop(self, step_num: int) -> bool:
        return self.context.get_stop_requested() or super().should_stop(step_num)
