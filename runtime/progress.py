"""Progress of long steps (head training, feature extraction, kNN, file checks, listing).

tqdm draws a bar on a terminal. In a log file (a cluster's task log, ``> run.log``) a bar's carriage
returns would pile up on one line, so there tqdm writes through :class:`_Lines`, which turns every
refresh into a plain line, at most one every :data:`LOG_INTERVAL_S` seconds.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class _Lines:
    """A file for tqdm that writes each refreshed status as its own line (for logs)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def chief() -> bool:
    """Rank 0 (or the only process): the one that shows progress."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress(iterable: Optional[Iterable] = None, desc: str = "", total: Optional[int] = None,
             unit: str = "it", enabled: Optional[bool] = None, stream=None) -> tqdm:
    """``tqdm(iterable)``: a bar on a terminal, plain lines every few seconds otherwise; nothing when
    ``enabled`` is false (e.g. on ranks other than 0)."""
    stream = stream or sys.stderr
    enabled = chief() if enabled is None else enabled
    terminal = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, dynamic_ncols=terminal,
                file=stream if terminal else _Lines(stream), mininterval=0.5 if terminal else LOG_INTERVAL_S,
                ascii=not terminal, leave=True)
