"""Progress of every long step (training, head training, feature extraction, kNN, the representation
comparison, file checks), each with an estimate of the time left.

tqdm draws a bar on a terminal. In a log file or a pipe (a cluster's task log, ``> run.log``,
``| tee``) a bar's carriage returns and cursor moves would pile up on one line or show as literal
``[A``, so there tqdm writes through :class:`_Lines`: every refresh becomes one plain line (no escape
codes, every bar at position 0, so nested bars never move the cursor), at most one every
:data:`LOG_INTERVAL_S` seconds, e.g. ``linear heads (4 lr): 12/30 epoch (40%), 00:05 elapsed, about
00:07 left``. :class:`Remaining` gives the same estimate to loops that print their own lines (the
``[train]`` lines).
"""
from __future__ import annotations

import re
import sys
import time
from typing import Iterable, Optional

from tqdm import tqdm

LOG_INTERVAL_S = 10.0
# What a plain line says: with a known total the share done and the time left, else the rate.
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {elapsed} elapsed, about {remaining} left"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit}, {elapsed} elapsed ({rate_fmt})"
_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal control sequences (cursor moves, colours)


class _Lines:
    """A file for tqdm that writes each refreshed status as its own plain line (for logs and pipes)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = _ESCAPE.sub("", text).replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def chief() -> bool:
    """Rank 0 (or the only process): the one that shows progress."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_terminal(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


def progress(iterable: Optional[Iterable] = None, desc: str = "", total: Optional[int] = None,
             unit: str = "it", enabled: Optional[bool] = None, stream=None) -> tqdm:
    """``tqdm(iterable)``: a bar on a terminal, plain lines with the time left every
    :data:`LOG_INTERVAL_S` seconds otherwise; nothing when ``enabled`` is false (e.g. on ranks
    other than 0)."""
    stream = stream or sys.stderr
    enabled = chief() if enabled is None else enabled
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, dynamic_ncols=True,
                    file=stream, mininterval=0.5, leave=True)
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, file=_Lines(stream),
                mininterval=LOG_INTERVAL_S, position=0, leave=True, ascii=True,
                bar_format=LOG_FORMAT if total else LOG_FORMAT_NO_TOTAL)


class Remaining:
    """The time left of a loop of ``total`` steps that prints its own lines, from the mean time per
    step since :meth:`start` (the first steps, which warm caches, weigh less as the run goes on)."""

    def __init__(self, total: int, done: int = 0, clock=time.monotonic):
        self.clock = clock
        self.total = total
        self.start(done)

    def start(self, done: int) -> None:
        """Counts from now and step ``done`` (e.g. after a resume)."""
        self.started_at, self.started_step = self.clock(), done

    def text(self, done: int) -> str:
        """``about 03:10 left`` (``about ? left`` before any step was timed)."""
        steps = done - self.started_step
        if steps <= 0:
            return "about ? left"
        left = (self.clock() - self.started_at) / steps * max(self.total - done, 0)
        return f"about {tqdm.format_interval(left)} left"
