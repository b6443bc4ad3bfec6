"""Faults that end a run, turned into one clear message each.

Long BYOL runs (the paper's 1000 epochs, section 3.3) meet broken inputs and broken machines. This
module names them:

* :class:`UnreadableImageError`: an image file that cannot be decoded (truncated download, not an
  image at all). :class:`ReadGuard` wraps a dataset; on a failed read it finds the sample and names
  its file, through the wrappers the trial stacks on top of the image folders.
* :func:`non_finite_ranks`: which processes saw a NaN/inf loss, agreed by all of them.
* :func:`describe`: the one-line message the command line prints for a fault, including errors
  that a data-loader worker process re-raised with its whole traceback in the message.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset


class UnreadableImageError(RuntimeError):
    """An image of the dataset could not be read or decoded."""


# What PIL raises for undecodable files: OSError ("image file is truncated", UnidentifiedImageError),
# SyntaxError ("broken PNG file"), EOFError; missing or unreadable files are OSErrors too.
_READ_ERRORS = (OSError, SyntaxError, EOFError)


def _source_of(dataset: Any, index: int) -> Optional[str]:
    """The file (or object name) behind sample ``index``, looking through dataset wrappers."""
    for _ in range(16):  # wrappers nest a few levels deep
        if isinstance(dataset, Subset):
            dataset, index = dataset.dataset, int(dataset.indices[index])
        elif isinstance(dataset, ConcatDataset):
            import bisect

            which = bisect.bisect_right(dataset.cumulative_sizes, index)
            index -= dataset.cumulative_sizes[which - 1] if which else 0
            dataset = dataset.datasets[which]
        elif hasattr(dataset, "samples") and isinstance(getattr(dataset, "samples"), (list, tuple)):
            sample = dataset.samples[index]
            return str(sample[0] if isinstance(sample, (tuple, list)) else sample)
        elif hasattr(dataset, "base"):
            dataset = dataset.base
        elif hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        else:
            return None
    return None


def _index_of(key: Any) -> int:
    return int(key[0]) if isinstance(key, (tuple, list)) else int(key)


class ReadGuard(Dataset):
    """``dataset`` unchanged, except that a failed read raises :class:`UnreadableImageError`
    naming the file. Costs nothing while reads succeed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _error(self, key: Any, error: BaseException) -> UnreadableImageError:
        index = _index_of(key)
        source = _source_of(self.dataset, index)
        where = f"image file {source!r}" if source else f"sample {index} of the dataset"
        return UnreadableImageError(f"cannot read {where}: {type(error).__name__}: {error}. Replace or remove "
                                    f"the file (a truncated download or not an image)")

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except _READ_ERRORS as error:
            raise self._error(key, error) from error

    def __getitems__(self, keys: Sequence):
        fetch = getattr(self.dataset, "__getitems__", None)
        try:
            return fetch(list(keys)) if fetch else [self.dataset[key] for key in keys]
        except _READ_ERRORS as error:
            for key in keys:  # which sample was it?
                try:
                    self.dataset[key]
                except _READ_ERRORS as single:
                    raise self._error(key, single) from single
            raise


def non_finite_ranks(loss: torch.Tensor, rank: int, world_size: int) -> List[int]:
    """The ranks whose loss is NaN or infinite, known to every rank (one flag per rank, all-reduced),
    so that all processes stop together at the same step."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world_size == 1:
        return [0] if bad.item() else []
    flags = torch.zeros(world_size, device=bad.device)
    flags[rank] = bad[0]
    torch.distributed.all_reduce(flags)
    return [index for index, flag in enumerate(flags.tolist()) if flag]


def describe(error: BaseException) -> str:
    """One line for the user: the last line of a worker's re-raised traceback, without the type."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker process
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(text.split())
