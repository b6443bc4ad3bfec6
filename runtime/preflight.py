"""Checks before the first training step: everything a run will read is there and readable.

A BYOL run on image folders (ImageNet, section 4; ``custom``) reads every file of every split,
and the labelled and test images only at the first validation, maybe hours in. Here every image
file behind the run's datasets gets a header check (``PIL.Image.open`` reads the format and size,
not the pixels: fast, and it catches non-images, empty files and decompression bombs) before the
first step; each process checks its share of the files, with progress on large sets. Images held in
array files (CIFAR, STL-10, EMNIST, digits) were read whole when the dataset was built; objects
streamed from Cloud Storage are checked when fetched (``gcs.py``).
"""
from __future__ import annotations

from typing import Any, Iterator, List, Sequence

from torch.utils.data import ConcatDataset

from augment import UNSUPPORTED_MODES
from runtime.progress import progress
from utils import InputError


class UnreadableFileError(InputError):
    """An image file of the dataset cannot be opened as an image."""


def _leaves(dataset: Any, depth: int = 0) -> Iterator[Any]:
    """The datasets with a ``samples`` file list under ``dataset``'s wrappers (whole, not subsets:
    every file of a folder is checked once even when splits share it)."""
    if depth > 16 or dataset is None:
        return
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            yield from _leaves(part, depth + 1)
    elif isinstance(getattr(dataset, "samples", None), (list, tuple)):
        yield dataset
    else:
        for attribute in ("dataset", "base"):
            inner = getattr(dataset, attribute, None) if attribute in getattr(dataset, "__dict__", {}) else None
            if inner is not None:
                yield from _leaves(inner, depth + 1)
                return


def image_files(datasets: Sequence[Any]) -> List[str]:
    """Every distinct image file behind ``datasets`` (sorted, so each process takes a stable share)."""
    files, seen = set(), set()
    for dataset in datasets:
        for leaf in _leaves(dataset):
            if id(leaf) not in seen:
                seen.add(id(leaf))
                files.update(str(sample[0] if isinstance(sample, (tuple, list)) else sample)
                             for sample in leaf.samples)
    return sorted(files)


def check_image_headers(datasets: Sequence[Any], rank: int = 0, world_size: int = 1, full: bool = False) -> int:
    """Opens this process's share of the image files behind ``datasets`` (header only; ``full``:
    every pixel decoded too, which also finds files whose body is truncated, ``data.image_check:
    full``); the first that fails raises :class:`UnreadableFileError` naming it. Returns the number
    checked."""
    from PIL import Image

    files = image_files(datasets)[rank::world_size]
    what = "decoding image files" if full else "checking image files"
    for path in progress(files, what, unit="file", enabled=rank == 0 and len(files) > 1000):
        try:
            with Image.open(path) as image:
                if image.mode in UNSUPPORTED_MODES:
                    raise UnreadableFileError(f"image file {path!r} has pixel mode {image.mode} (32-bit float), which "
                                              f"has no known value range; convert it to 8-bit RGB or grayscale")
                if full:
                    image.load()  # every pixel: a truncated body fails here, not hours into the run
        except UnreadableFileError:
            raise
        except Image.DecompressionBombError as error:
            raise UnreadableFileError(f"image file {path!r} is refused as a decompression bomb ({error}); replace "
                                      f"or remove it") from None
        except (OSError, SyntaxError, ValueError) as error:
            raise UnreadableFileError(f"image file {path!r} cannot be opened as an image ({type(error).__name__}: "
                                      f"{error}); replace or remove it (a truncated download or not an image)"
                                      ) from None
    return len(files)


def dataset_classes_note(num_classes: int, where: str) -> str:
    """A warning when a dataset has fewer than two classes: accuracy would be trivially 1."""
    if num_classes < 2:
        return (f"[byol] warning: {where} has {num_classes} class(es): every accuracy will be trivially "
                f"{1.0 if num_classes else 0.0:.4f}; check the class folders")
    return ""

