"""Deterministic, resumable, sharded data order.

Exact resume (a run stopped at step k and resumed gives the same weights as one that never
stopped) needs the data order and every random augmentation to be a pure function of
``(seed, global step)``, not of whatever state a data-loader iterator or worker had when the run was
interrupted. Determined's own sampler restarts its position after a local resume, so this is ours:

* :class:`GlobalBatchSampler` walks a fresh permutation per epoch (seeded by ``seed`` and the epoch),
  cuts it into global batches, and gives rank r its contiguous share of each global batch, so N
  processes together see exactly the batches one process would (what BYOL's batch statistics and
  synchronised batch norm assume). It starts at any global step and never ends (the Determined
  harness keeps one iterator for the whole run); ``len()`` is the number of steps per epoch.
* Each index comes paired with a per-sample seed; :class:`SeededTransformDataset` applies the
  per-image transform under that seed, so crops and flips do not depend on which worker ran them.
* :class:`ShardSampler` splits an evaluation set into contiguous, disjoint per-rank shards without
  padding, so reducers count every sample exactly once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, Sampler

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden-ratio constant, mixes seeds apart


class SeedStream:
    """Every stream of the project's randomness, in one table. Each draw is seeded by the run's
    ``seed`` and its stream (and, for the trial's streams, the global step:
    ``mix_seed(seed, step, stream)``), so two streams never share random numbers and every draw is
    the same after a resume and for any number of processes. The values are those the streams had
    before this table existed (changing one changes that stream's random numbers). Plain integers,
    not an enum: the data splits and the trial's streams are seeded differently, so a value may
    recur across the groups (an enum would turn the second name into a hidden alias of the first)."""

    # data.py's splits: numpy generators seeded by [seed, stream]
    TEST_SPLIT = 1          # the held-out TEST part of datasets without an official test set
    VALIDATION_SPLIT = 2    # CLS_VALIDATION, held out of the labelled training set
    LABEL_SUBSET = 3        # classifier.label_fraction: the labelled images of semi-supervised runs
    # the trial, per global step: torch generators seeded by mix_seed(seed, step, stream)
    VIEW1 = 1               # photometric parameters of the first view (table 6)
    VIEW2 = 2               # ... of the second view
    HEAD_VARIANT = 4        # head training with the pretraining augmentations (classifier.augmentation)
    EVALUATION_VIEWS = -3   # the views of the validation BYOL loss
    # once per run: mix_seed(seed, stream)
    HEAD_FEATURE_ORDER = 17  # order of the features when linear-evaluation heads train on them
    RANDOM_ENCODER = 99      # the randomly initialised encoder of the representation comparison


def mix_seed(*parts: int) -> int:
    """Combines integers into one 63-bit seed (deterministic, unlike Python's salted hash)."""
    value = 0
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + _MIX) % (1 << 63)
    return value


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))  # data order: (seed, epoch)
    return torch.randperm(num_samples, generator=generator)


class GlobalBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Yields this rank's part of each global batch, as ``[(index, sample_seed), ...]``."""

    def __init__(self, num_samples: int, global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0, infinite: bool = True):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} processes")
        if num_samples < global_batch_size:
            raise ValueError(f"the dataset has {num_samples} images, fewer than one global batch "
                             f"of {global_batch_size}: lower global_batch_size")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.per_rank = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self.infinite = infinite
        self.steps_per_epoch = steps_per_epoch(num_samples, global_batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        end = self.start_step + self.steps_per_epoch if not self.infinite else None
        order, order_epoch = None, None
        while end is None or step < end:
            epoch, offset = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = epoch_permutation(self.num_samples, self.seed, epoch), epoch
            start = offset * self.global_batch_size + self.rank * self.per_rank
            indices = order[start:start + self.per_rank].tolist()
            yield [(index, mix_seed(self.seed, epoch, index)) for index in indices]
            step += 1


class ShardSampler(Sampler[int]):
    """Contiguous, disjoint shard ``rank`` of ``range(num_samples)``; shards differ by at most one."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.start = num_samples * rank // world_size
        self.end = num_samples * (rank + 1) // world_size

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))


class SeededTransformDataset(Dataset):
    """Applies ``transform`` to ``base[index]`` under a per-sample seed.

    ``base`` returns ``(pil_image, label)``. Indices are ``(index, seed)`` pairs from
    :class:`GlobalBatchSampler` or plain ints (seed 0, for evaluation transforms without randomness).
    When ``base`` fetches batches itself (``__getitems__``, e.g. Cloud Storage streaming with many
    requests in flight), the batch is fetched that way and transformed here.
    """

    def __init__(self, base: Dataset, transform: Optional[Callable[[Any], Any]]):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _apply(self, item: Tuple[Any, int], seed: int):
        image, label = item
        if self.transform is None:
            return image, label
        # fork_rng keeps the caller's global RNG untouched (matters with num_workers=0).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label

    @staticmethod
    def _split(key) -> Tuple[int, int]:
        if isinstance(key, (tuple, list)):
            return int(key[0]), int(key[1])
        return int(key), 0

    def __getitem__(self, key):
        index, seed = self._split(key)
        return self._apply(self.base[index], seed)

    def __getitems__(self, keys: Sequence):
        pairs = [self._split(key) for key in keys]
        if hasattr(self.base, "__getitems__"):
            items = self.base.__getitems__([index for index, _ in pairs])
        else:
            items = [self.base[index] for index, _ in pairs]
        return [self._apply(item, seed) for item, (_, seed) in zip(items, pairs)]


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    """Whole global batches per epoch (the last partial batch is dropped); at least 1."""
    return max(num_samples // global_batch_size, 1)
