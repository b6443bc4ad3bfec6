"""Data pipelines of the trial: which split, which per-image transform, which sampler.

Workers decode and do the per-image geometric part (crop, resize, flip) into uint8 tensors; the
photometric part runs batched on the training device (``augment.PhotometricAugment``; paper
section 3.3 and appendix B). Order and randomness come from ``sampling`` so that runs resume exactly.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

import augment
import data
from runtime import jpeg_decode, stops
from runtime.sampling import GlobalBatchSampler, SeededTransformDataset, ShardSampler
from runtime.settings import Settings
from utils import ConfigError, one_line

VALIDATION_TAG, TEST_TAG = 0, 1


def base_dataset(settings: Settings, split: data.Split, lazy: bool = False) -> Dataset:
    """The raw split: ``(PIL image, label)`` items (``lazy``: opened, not decoded)."""
    cfg = settings.data
    try:
        return data.build_dataset(cfg.dataset, split, root=cfg.root, transform=None,
                                  validation_size=cfg.validation_size, seed=settings.seed,
                                  download=cfg.download, gcs=cfg.gcs, lazy=lazy)
    except ValueError as error:  # the data section does not fit the files (validation_size, class folders, ...)
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"data ({cfg.dataset}, split {split.value}): {error}") from None


class Tagged(Dataset):
    """Adds a constant tag (which split an image came from) to every item."""

    def __init__(self, base: Dataset, tag: int):
        self.base, self.tag = base, tag

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index):
        image, label = self.base[index]
        return image, label, self.tag


class LazyTrainingLoader:
    """A never-ending training loader whose position is read when iteration actually starts.

    The Determined harness calls ``iter()`` on the training loader before it restores a checkpoint;
    this generator creates the real DataLoader only at the first ``next()``, after the trial has
    loaded its global step, so a resumed run continues at exactly the next batch. Batches reach
    ``device`` through :func:`prefetch_to_device`, ``prepare`` applied there (e.g. the JPEG decode
    of ``data.decode: device``), one batch ahead of the step on CUDA.
    """

    def __init__(self, dataset: Dataset, sampler_factory: Callable[[], GlobalBatchSampler],
                 num_workers: int, device: Optional[torch.device] = None, collate_fn: Optional[Callable] = None,
                 prepare: Optional[Callable] = None):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.sampler_factory = sampler_factory
        self.num_workers = num_workers
        self.device = device if device is not None else torch.device("cpu")
        self.prepare = prepare
        self._steps_per_epoch = len(sampler_factory())

    def __len__(self) -> int:
        return self._steps_per_epoch

    def __iter__(self) -> Iterator:
        cuda = self.device.type == "cuda"
        loader = DataLoader(self.dataset, batch_sampler=self.sampler_factory(), num_workers=self.num_workers,
                            pin_memory=cuda, persistent_workers=False, collate_fn=self.collate_fn,
                            worker_init_fn=stops.detach_worker if self.num_workers else None,
                            prefetch_factor=4 if self.num_workers else None)
        yield from (prefetch_to_device(loader, self.device, self.prepare) if cuda or self.prepare else loader)


def prefetch_to_device(batches: Iterable, device: torch.device, prepare: Optional[Callable] = None) -> Iterator:
    """Yields each batch already on ``device`` and passed through ``prepare`` (if given), in order.

    On CUDA the work for batch k+1 (the copy from pinned memory, then ``prepare``, e.g. the batched
    JPEG decode and crops of ``data.decode: device``) is issued on a side stream before batch k is
    yielded, so it overlaps the step on batch k and never waits behind that step's host syncs. The
    consumer's stream waits on an event recorded after that work, and every tensor of the batch is
    ``record_stream``-ed on the consumer's stream so the caching allocator does not hand its memory
    back to the side stream while the step still reads it. (Tensors nested in tuples and lists;
    anything else passes unchanged to ``prepare``.) Off CUDA the same work runs in order, one batch
    at a time, still before the step sees the batch."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(copy(item) for item in batch)
        return batch

    def ready(batch):
        batch = copy(batch)
        return prepare(batch) if prepare is not None else batch

    def mark_used(batch, consumer):
        if isinstance(batch, torch.Tensor) and batch.is_cuda:
            batch.record_stream(consumer)
        elif isinstance(batch, (tuple, list)):
            for item in batch:
                mark_used(item, consumer)

    def hand_over(batch, done):
        consumer = torch.cuda.current_stream(device)
        consumer.wait_event(done)
        mark_used(batch, consumer)
        return batch

    pending = None
    for batch in batches:
        if stream is None:
            yield ready(batch)
            continue
        with torch.cuda.stream(stream):
            prepared = ready(batch)
            done = torch.cuda.Event()
            done.record(stream)
        if pending is not None:
            yield hand_over(*pending)
        pending = (prepared, done)
    if pending is not None:
        yield hand_over(*pending)


def training_dataset(settings: Settings, image_size: int, pretraining: bool) -> Dataset:
    """TRAIN with two geometric views (pretraining), or CLS_TRAIN (its labelled subset with
    ``classifier.label_fraction`` / ``label_list``) with the classifier transform."""
    if pretraining:
        view1, view2 = settings.views
        decode = settings.data.decode
        if decode == "pil":
            transform = augment.TwoViewTransform(image_size, view1, view2)
        else:  # jpeg_decode.py: decode only what the crops need, or on the training device

            kind = jpeg_decode.DraftTwoViewTransform if decode == "draft" else jpeg_decode.EncodedTwoViewTransform
            transform = kind(image_size, view1, view2)
        return SeededTransformDataset(pretraining_images(settings, lazy=decode != "pil"), transform)
    mode = settings.classifier.augmentation
    if mode == "crop_flip":
        transform = augment.crop_flip_transform(image_size)
    elif mode == "variant":  # appendix C.1 variant: reuse the pretraining augmentations (view 1)
        transform = augment.geometric_transform(image_size, settings.views[0])
    else:
        transform = evaluation_transform(settings, image_size)
    cls_train = base_dataset(settings, data.Split.CLS_TRAIN)
    try:
        labelled = data.labelled_subset(cls_train, settings.classifier.label_fraction, settings.classifier.label_list,
                                        settings.seed)
    except (ValueError, OSError) as error:  # a label list naming absent images, unreadable, not text
        key = "label_list" if settings.classifier.label_list else "label_fraction"
        raise ConfigError(f"config key 'hyperparameters.classifier.{key}': {one_line(error)}") from None
    return SeededTransformDataset(labelled, transform)


def pretraining_images(settings: Settings, lazy: bool = False) -> Dataset:
    """TRAIN; without ``classifier_validation`` minus the CLS_VALIDATION images, on which validation
    then measures the BYOL loss (the searcher metric): images the encoder never trained on, and
    never TEST. Every dataset's labelled training set is the start of its TRAIN split (stl10's
    'train+unlabeled' begins with 'train'), so CLS_VALIDATION's positions in it are positions in TRAIN.
    ``lazy``: images opened undecoded (``data.decode: draft | device``, jpeg_decode.py)."""
    train = base_dataset(settings, data.Split.TRAIN, lazy=lazy)
    if settings.classifier_validation:
        return train  # pretraining on the whole training set, as the paper does
    held_out_of = len(base_dataset(settings, data.Split.CLS_TRAIN)) + settings.data.validation_size
    held_out = set(data.split_labelled(held_out_of, settings.data.validation_size, settings.seed)[1])
    return Subset(train, [index for index in range(len(train)) if index not in held_out])


def evaluation_transform(settings: Settings, image_size: int):
    """Resize and centre crop (appendix C.1: 224 of 256); small images (CIFAR, digits) uncropped."""
    native = data.dataset_info(settings.data.dataset, settings.data.root).native_size
    return augment.eval_transform(image_size, crop_fraction=1.0 if native < 64 else 0.875)


def evaluation_dataset(settings: Settings, image_size: int) -> Dataset:
    """CLS_VALIDATION then TEST, un-augmented, each item tagged with its split."""
    transform = evaluation_transform(settings, image_size)
    return ConcatDataset([
        Tagged(SeededTransformDataset(base_dataset(settings, data.Split.CLS_VALIDATION), transform), VALIDATION_TAG),
        Tagged(SeededTransformDataset(base_dataset(settings, data.Split.TEST), transform), TEST_TAG),
    ])


def sharded_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int,
                   pin_memory: bool = False) -> DataLoader:
    """Every sample exactly once across ranks, in dataset order (no padding, no dropping)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=stops.detach_worker if num_workers else None)


def classifier_feature_dataset(settings: Settings, image_size: int) -> Dataset:
    """CLS_TRAIN un-augmented, for the linear-evaluation heads trained on cached features
    (``linear_eval.LinearEvaluation``) and the representation comparison."""
    return SeededTransformDataset(base_dataset(settings, data.Split.CLS_TRAIN),
                                  evaluation_transform(settings, image_size))
