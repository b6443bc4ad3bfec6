"""The hot path's speed settings: mixed precision, memory format, compilation, threads.

BYOL's step is two views forward and backward through the online network and two forward through
the target (section 3.1; each network takes both views as one batch, ``byol.py``), about 2.7
supervised steps per image, so a 1000-epoch run (section 3.3)
pays for every factor of speed. None of this changes the method:

* ``precision: bf16`` runs the forward passes under ``torch.autocast`` with bfloat16 (matrix
  products and convolutions in bf16); the loss (``byol.regression_loss``), batch-norm statistics
  (``sync_batchnorm``), the optimiser and the EMA target (section 3.1) stay in float32, as do the
  weights themselves. bf16 needs no loss scaling (same exponent range as float32).
* ``channels_last`` stores the convolutional networks' weights NHWC, the layout tensor cores read
  without transposes, and oneDNN's fastest CPU convolutions; on by default on CUDA and the CPU.
* ``compile: true`` compiles the device part of each training step as ONE function
  (``model_def`` ``forward_step``: both photometric views, the learner's forward and loss; AOT
  autograd traces the backward): one graph, no graph break, no recompile after the first step
  (``tests/test_performance.py``). Off by default: the first step pays the compile, measured
  204 s with inductor for ``small_cnn`` at 32 px, batch 32, on the shared 2-core CPU
  (``python bench/compile_time.py``; later steps 0.84-1.00 s compiled vs 1.35-1.59 s eager).
* ``cudnn.benchmark`` picks the fastest convolution algorithms once for the fixed training shapes.
* :func:`choose_threads`: intra-op threads x data-loader workers x processes within the cores.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import ContextManager, Optional

import torch
from torch import nn

from utils import env_int

AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str) -> ContextManager:
    """The forward passes' autocast context: bf16 on CUDA and CPU alike, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision {precision!r} is not one of fp32, {', '.join(AUTOCAST_DTYPES)}")
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


# Where ``channels_last: null`` turns NHWC on: CUDA (tensor cores) and the CPU, where oneDNN's NHWC
# convolutions ran a forward + backward 1.10-1.21x faster than NCHW (medians) for every backbone we
# ship (torch 2.14, one thread: `python bench/channels_last.py`).
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


def use_channels_last(setting: Optional[bool], device: torch.device) -> bool:
    """``channels_last: null`` means on for the devices in :data:`CHANNELS_LAST_DEVICES`."""
    return device.type in CHANNELS_LAST_DEVICES if setting is None else setting


def to_channels_last(module: nn.Module) -> nn.Module:
    """4-D weights (convolutions) stored NHWC; inputs follow with :func:`images_channels_last`."""
    return module.to(memory_format=torch.channels_last)


def images_channels_last(images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


# torch.compile's backend for ``compile: true``; tests set "aot_eager" (the same graph capture,
# without inductor's code generation, which takes minutes on a small CPU).
COMPILE_BACKEND = "inductor"


def maybe_compile(function, enabled: bool, backend: Optional[str] = None):
    """``torch.compile(function)`` when enabled (dynamic=False: the training shapes are fixed)."""
    return torch.compile(function, dynamic=False, backend=backend or COMPILE_BACKEND) if enabled else function


def configure_device(device: torch.device) -> None:
    """cuDNN autotuning for the fixed shapes of training (the algorithm search runs once per
    shape). TF32 is left as torch sets it: ``precision: fp32`` means float32."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclass(frozen=True)
class ThreadChoice:
    cores: int
    processes: int
    workers: int
    threads: int
    reason: str

    def describe(self) -> str:
        return (f"[byol] threads: {self.processes} process(es) x {self.threads} intra-op thread(s) + "
                f"{self.workers} data-loader worker(s) per process on {self.cores} core(s) ({self.reason})")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return max(os.cpu_count() or 1, 1)


def choose_threads(workers: int, processes: int = 1, cores: Optional[int] = None,
                   environment: Optional[dict] = None) -> ThreadChoice:
    """Intra-op threads and data-loader workers that together do not oversubscribe the cores.

    Each process gets ``cores // processes`` cores. Workers are capped at that share (more would
    only queue), and intra-op threads take what the workers leave, at least one. Measured on the
    2-core machine (issue 12): 2 workers with 2 intra-op threads ran the digits trial 2.1x slower
    than with 1 thread. An ``OMP_NUM_THREADS`` set by the user is kept.
    """
    environment = os.environ if environment is None else environment
    cores = cores or available_cores()
    share = max(cores // max(processes, 1), 1)
    workers = min(workers, share)
    threads = env_int("OMP_NUM_THREADS", minimum=1, environment=environment)  # 0 or a word: refused
    if threads is not None:
        return ThreadChoice(cores, processes, workers, threads, "OMP_NUM_THREADS as set")
    threads = max(share - workers, 1)
    return ThreadChoice(cores, processes, workers, threads, f"{share} core(s) per process")
