"""Stopping a run on request: SIGTERM and SIGINT (Ctrl-C) keep the work done so far.

Long BYOL runs (the paper's 1000 epochs, section 3.3) get stopped: a scheduler's SIGTERM, a user's
Ctrl-C. The first signal asks the trial to stop after the current step (one process) or after the
step of the next non-finite check (several processes: each rank's signal travels in that check's
all_reduce, ``nonfinite.NonFiniteWatch.agree``, at most ``finite_check_period`` steps later, so a
signal to one rank stops them all and rank 0 names it), the trial calls
Determined's own ``context.set_stop_requested(True)`` and ends the reporting period there
(:class:`StopAwareBatch`), so the harness checkpoints and returns exactly as it does for a
preemption on a cluster. The command line then names the checkpoint and how to resume, and exits
with ``128 + signal`` (no traceback). A second signal stops at once, without a checkpoint, ending
this process's data-loader workers first so that none is left behind.

Data-loader workers live in sessions of their own (:func:`detach_worker`): a signal to the run's
process group (torchrun, GNU ``timeout``, ``kill -TERM -PGID``, Ctrl-C) reaches the main process
only, which ends its workers itself after the checkpoint.

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
from typing import Dict, Optional

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
        return signal_name(self.signal) if self.signal else ""

    def install(self) -> None:
        """Handles SIGTERM and SIGINT from now on (only the main thread may; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.signal = None  # a new run (in-process callers may run several)
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self, stopped: bool = False) -> None:
        """Restores the handlers :meth:`install` replaced; after a stop (``stopped``: its checkpoint
        is written, its message is due) SIGTERM and SIGINT are ignored instead while the process
        exits, so that it ends with ``128 + signal``: torchrun signals the other ranks as soon as the
        first one exits, and would otherwise kill them on their way out."""
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if stopped else previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal, self.at = signum, time.monotonic()
            if os.environ.get("RANK", "0") == "0":  # rank 0 speaks for all processes
                print(f"[byol] {signal_name(signum)} received: finishing the current step, then writing a "
                      f"checkpoint (send it again to stop at once, without one)", file=sys.stderr, flush=True)
            return
        if time.monotonic() - self.at < REPEAT_WINDOW_S:
            return  # the same request, forwarded once more (torchrun)
        print(f"[byol] second {signal_name(signum)}: stopping at once, without a checkpoint",
              file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # data-loader workers: none is orphaned
            child.kill()
        os._exit(128 + signum)


REQUEST = StopRequest()


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (the number itself for one that is not a signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def requests_of(agreed: Dict[int, int], rank: int) -> Dict[int, int]:
    """Rank -> signal of every process asked to stop: those the processes agreed on
    (``nonfinite.NonFiniteWatch.stop_signals``) and this process's own request (which may have come
    after the last agreement)."""
    requests = dict(agreed)
    if REQUEST.requested:
        requests.setdefault(rank, int(REQUEST.signal))
    return requests


ORPHAN_CHECK_S = 1.0  # how often a data-loader worker checks that its main process is still there


def detach_worker(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data loaders: the worker leaves the run's process group for a session of
    its own, so that a signal sent to the group reaches the main process alone. torchrun forwards
    SIGTERM/SIGINT to each rank's whole group (``os.killpg``), GNU ``timeout`` signals its group, a
    terminal's Ctrl-C reaches the foreground group: a worker that died of it first would end the run
    with "DataLoader worker ... killed by signal" and no checkpoint. The main process finishes its
    step, checkpoints, and ends its workers itself: the DataLoader's shutdown (done event, join,
    SIGTERM as a last resort) and ``multiprocessing``'s at exit, whose SIGTERM torch's worker handler
    takes quietly from the parent (so a run that ends on an error never hangs at exit). SIGINT is
    ignored besides (a ``kill -INT`` of the worker alone). :func:`_exit_when_orphaned` ends a worker
    whose main process died without ending it (``kill -9``, torchrun's final SIGKILL to the group)."""
    try:
        os.setsid()
    except OSError:  # already a group leader: stays where it is
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent, report = os.getppid(), threading.excepthook

    def quiet_when_orphaned(args) -> None:  # e.g. multiprocessing's resource sharer, its peer gone
        if os.getppid() == parent:
            report(args)

    threading.excepthook = quiet_when_orphaned
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="byol-orphan-guard", daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """Ends this process (a data-loader worker) once ``parent`` is gone: an orphan is re-parented, so
    its parent id changes. (torch's own check runs only between samples, and a worker blocked in a
    long read would outlive its run.)"""
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(0)


class StopAwareBatch(pytorch.Batch):
    """A reporting period of ``value`` batches that also ends as soon as a stop was agreed on, so
    the harness checks ``context.get_stop_requested()`` after that very step (Determined checks it
    only at period boundaries)."""

    def __init__(self, value: int, context: pytorch.PyTorchTrialContext):
        super().__init__(value)
        self.context = context

    def should_stop(self, step_num: int) -> bool:
        return self.context.get_stop_requested() or super().should_stop(step_num)
