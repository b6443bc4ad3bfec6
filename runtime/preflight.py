"""Checks before the first training step: everything a run will read is there and readable.

A BYOL run on image folders (ImageNet, section 4; ``custom``) reads every file of every split,
and the labelled and test images only at the first validation, maybe hours in. Here every image
file behind the run's datasets gets a header check (``PIL.Image.open`` reads the format and size,
not the pixels: fast, and it catches non-images, empty files and decompression bombs) before the
first step; each process checks its share of the files, with progress on large sets. Images held in
array files (CIFAR, STL-10, EMNIST, digits) were read whole when the dataset was built; objects
streamed from Cloud Storage are checked when fetched (``gcs.py``).

Memory is estimated from the settings before the first step too (:func:`estimate_step_memory`: the
backbone's activations for the per-process batch of both views, measured on the ``meta`` device;
parameters and optimiser state; the data loaders' buffers), and a step that cannot fit on the
device, or in the host's memory, is refused naming the settings (:func:`check_step_memory`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Sequence

import torch
from torch.utils.data import ConcatDataset

import backbone as backbones
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



# ----------------------------------------------------------------------------- memory before the first step
GIB = 1 << 30
PREFETCH_FACTOR = 4  # batches each data-loader worker prepares ahead (runtime/loaders.py)


class MemoryLimitError(InputError):
    """The settings ask for more memory per training step than the device (or host) has."""


def activation_bytes_per_image(backbone_name: str, image_size: int, bytes_per_value: int = 4,
                               largest: bool = False) -> int:
    """Bytes of activations one ``image_size`` image leaves in the backbone for the backward pass:
    the outputs of every leaf module (in-place ones share their input's storage), measured by a
    forward pass on the ``meta`` device (shapes only: no memory, no compute). ``largest``: twice the
    largest single output instead (a frozen encoder's forward pass keeps only its current layer)."""
    with torch.device("meta"):
        net = backbones.build_backbone(backbone_name)
    total = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor) and not getattr(module, "inplace", False):
            total[0] = max(total[0], 2 * output.numel()) if largest else total[0] + output.numel()

    for module in net.modules():
        if not list(module.children()):
            module.register_forward_hook(count)
    net.train()
    try:  # two images: batch norm in training mode needs more than one value per channel
        net(torch.empty(2, 3, image_size, image_size, device="meta"))
    except (RuntimeError, ValueError) as error:
        raise MemoryLimitError(f"hyperparameters.image_size {image_size} is too small for backbone {backbone_name!r} "
                               f"({' '.join(str(error).split())[:160]}): raise image_size") from None
    return total[0] * bytes_per_value // 2


@dataclass(frozen=True)
class StepMemory:
    """An estimate of one training step's memory (bytes), from the settings alone."""

    activations: int   # the backbone's saved activations for every view of the per-process batch
    parameters: int    # weights, gradients, optimiser state and the target network
    views: int         # the batch's augmented float views on the training device
    loader: int        # uint8 views in flight: workers x prefetch x batch x views, plus the batch in hand

    @property
    def device(self) -> int:
        return self.activations + self.parameters + self.views

    @property
    def total(self) -> int:
        return self.device + self.loader


def estimate_step_memory(backbone_name: str, image_size: int, per_process_batch: int, views: int,
                         workers: int, trained_copies: int, bytes_per_value: int = 4,
                         encoder_trained: bool = True) -> StepMemory:
    """One step's memory: ``views`` views of ``per_process_batch`` images (BYOL: 2, section 3.1;
    heads: 1), ``trained_copies`` copies of the parameters (BYOL: online weights, gradients, LARS
    momentum and the target network: 4), ``workers`` data-loader workers each ``PREFETCH_FACTOR``
    batches ahead."""
    with torch.device("meta"):  # shapes only
        parameter_count = sum(parameter.numel() for parameter in backbones.build_backbone(backbone_name).parameters())
    per_image = activation_bytes_per_image(backbone_name, image_size, bytes_per_value, largest=not encoder_trained)
    image_bytes = 3 * image_size * image_size
    return StepMemory(activations=views * per_process_batch * per_image,
                      parameters=trained_copies * parameter_count * 4,
                      views=views * per_process_batch * image_bytes * 4,
                      loader=(workers * PREFETCH_FACTOR + 2) * per_process_batch * views * image_bytes)


def available_memory(device) -> tuple:
    """``(device bytes or None, host bytes)`` free now: the GPU's free memory (CUDA), and the host's
    available memory (``MemAvailable`` of /proc/meminfo, else ``sysconf``)."""
    on_device = torch.cuda.mem_get_info(device)[0] if getattr(device, "type", "cpu") == "cuda" else None
    host = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if host is None:
        try:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            host = None
    return on_device, host


def check_step_memory(estimate: StepMemory, device, settings_named: str, processes_on_host: int = 1) -> None:
    """Refuses (:class:`MemoryLimitError`, naming the settings) a step that cannot fit: on a GPU its
    device part against the GPU's free memory and the loader part against the host's share; on
    the CPU everything against the host's share (``processes_on_host`` processes share it)."""
    on_device, host = available_memory(device)
    parts = (f"activations {_gib(estimate.activations)}, parameters and optimiser {_gib(estimate.parameters)}, "
             f"augmented views {_gib(estimate.views)}, data-loader buffers {_gib(estimate.loader)}")
    checks = []
    if on_device is not None:
        checks.append((estimate.device, on_device, "free on the GPU"))
        needed_on_host = estimate.loader
    else:
        needed_on_host = estimate.total
    if host is not None:
        share = host // max(processes_on_host, 1)
        checks.append((needed_on_host, share, "of host memory available" + (
            f" to each of {processes_on_host} processes" if processes_on_host > 1 else "")))
    for needed, available, where in checks:
        if needed > available:
            raise MemoryLimitError(f"one training step needs about {_gib(needed)} ({parts}), more than the "
                                   f"{_gib(available)} {where}: lower {settings_named}")


def _gib(count: int) -> str:
    return f"{count / GIB:,.1f} GiB" if count >= GIB / 10 else f"{count / (1 << 20):,.1f} MiB"
