"""Linear evaluation heads (appendix C.1 of Grill et al. 2020).

Several linear classifiers, one per learning rate, are trained side by side on the same frozen
features (SGD with Nesterov momentum 0.9, cosine-decayed learning rate); the one best on
CLS_VALIDATION is reported on TEST (see ``reducers.ValidatedAccuracyReducer``). As in the reference
code, the configured rates are *base* rates, scaled by batch / 256 (0.2 -> 0.8 at batch 1024). Options
from the appendix (its "variant" protocol): logit clipping ``c * tanh(logits / c)`` and an L2 penalty
on the logits.

``train_heads_on_features`` is the cheap path used before each validation during pretraining: it
extracts features once and trains on them. With several processes every rank gathers all features
in dataset order and trains identical heads, so results equal those of one process exactly.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from optim import apply_schedule, scaled_learning_rate
from runtime.progress import progress
from runtime.sampling import SeedStream, epoch_permutation, mix_seed
from utils import check_keys, checked_number, reject


@dataclass(frozen=True)
class ClassifierSettings:
    """Linear evaluation (appendix C.1): one head per learning rate, SGD with Nesterov momentum."""

    learning_rates: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1, 0.05)
    train_epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    logit_clip: Optional[float] = None      # logits -> c * tanh(logits / c)
    logit_regularization: float = 0.0       # + lambda * mean squared logit
    augmentation: str = "none"              # none | crop_flip | variant
    encoder_lr: float = 0.0                 # FINE_TUNE only: (base) learning rate of the encoder
    label_fraction: Optional[float] = None  # CLASSIFIER_ONLY / FINE_TUNE: seeded fraction of each class
    label_list: Optional[str] = None        # ... or a file listing the labelled images (SimCLR's lists)
    knn_k: int = 0                          # >0: report a weighted cosine kNN accuracy at validation


def parse_classifier_section(section: dict) -> ClassifierSettings:
    """The ``hyperparameters.classifier`` section, checked into :class:`ClassifierSettings`."""
    prefix = "hyperparameters.classifier."
    check_keys(section, ClassifierSettings, prefix)
    values = {**dataclasses.asdict(ClassifierSettings()), **section}
    rates = values["learning_rates"]
    if isinstance(rates, (list, tuple)):
        rates = [checked_number({"rate": r}, "rate", prefix + "learning_rates.") if isinstance(r, str) else r
                 for r in rates]
    if not isinstance(rates, (list, tuple)) or not rates:
        reject(prefix + "learning_rates", rates, "expected a non-empty list of positive numbers")
    if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or not math.isfinite(r) for r in rates):
        reject(prefix + "learning_rates", rates, "every learning rate must be a positive number")
    if len(set(rates)) != len(rates):
        reject(prefix + "learning_rates", rates, "learning rates must not repeat")
    values["learning_rates"] = tuple(float(r) for r in rates)
    values["train_epochs"] = checked_number(values, "train_epochs", prefix, int, minimum=0)
    values["batch_size"] = checked_number(values, "batch_size", prefix, int, minimum=1)
    values["momentum"] = checked_number(values, "momentum", prefix, minimum=0, maximum=1)
    values["weight_decay"] = checked_number(values, "weight_decay", prefix, minimum=0)
    values["logit_clip"] = checked_number(values, "logit_clip", prefix, minimum=0, exclusive_min=True, optional=True)
    values["logit_regularization"] = checked_number(values, "logit_regularization", prefix, minimum=0)
    values["encoder_lr"] = checked_number(values, "encoder_lr", prefix, minimum=0)
    values["knn_k"] = checked_number(values, "knn_k", prefix, int, minimum=0)
    values["label_fraction"] = checked_number(values, "label_fraction", prefix, minimum=0, exclusive_min=True,
                                              maximum=1,
                                       optional=True)
    if values["label_list"] is not None:
        if not isinstance(values["label_list"], str) or not os.path.isfile(values["label_list"]):
            reject(prefix + "label_list", values["label_list"], "expected an existing file listing the labelled images")
        if values["label_fraction"] is not None:
            reject(prefix + "label_fraction", values["label_fraction"], "give label_list or label_fraction, not both")
    if values["augmentation"] not in ("none", "crop_flip", "variant"):
        reject(prefix + "augmentation", values["augmentation"], "allowed: none, crop_flip, variant")
    return ClassifierSettings(**values)


class LinearHeads(nn.Module):
    """``len(learning_rates)`` zero-initialised linear classifiers over the same features.

    Zero initialisation makes the heads identical on every rank and every run without seeding.
    """

    def __init__(self, feature_size: int, num_classes: int, num_heads: int, logit_clip: Optional[float] = None):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(feature_size, num_classes) for _ in range(num_heads))
        self.logit_clip = logit_clip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for head in self.heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Returns logits of shape [heads, batch, classes]."""
        logits = torch.stack([head(features) for head in self.heads])
        if self.logit_clip:
            logits = self.logit_clip * torch.tanh(logits / self.logit_clip)
        return logits


def heads_loss(logits: torch.Tensor, labels: torch.Tensor, logit_regularization: float = 0.0) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy (+ ``logit_regularization`` x mean squared logit).

    Heads share no parameters, so summing their losses trains each one independently."""
    heads, batch, classes = logits.shape
    loss = F.cross_entropy(logits.reshape(heads * batch, classes), labels.repeat(heads), reduction="sum") / batch
    if logit_regularization:
        loss = loss + logit_regularization * logits.pow(2).mean(dim=(1, 2)).sum()
    return loss


def heads_optimizer(heads: LinearHeads, learning_rates: Sequence[float], batch_size: int, momentum: float = 0.9,
                    weight_decay: float = 0.0, extra_groups: Iterable[dict] = ()) -> torch.optim.SGD:
    """SGD (Nesterov momentum) with one group per head; head i starts at ``learning_rates[i] x
    batch_size / 256`` (base rates, as the reference's linear evaluation). ``extra_groups`` carry
    their own ``lr`` and ``initial_lr``."""
    groups = [{"params": list(head.parameters()), "lr": scaled_learning_rate(lr, batch_size),
               "initial_lr": scaled_learning_rate(lr, batch_size)}
              for head, lr in zip(heads.heads, learning_rates)]
    groups += list(extra_groups)
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, nesterov=momentum > 0,
                           weight_decay=weight_decay)


def correct_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per-head numbers of top-1 and top-5 correct predictions."""
    k = min(5, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices                       # [heads, batch, k]
    hits = topk == labels.view(1, -1, 1)
    return hits[..., 0].sum(dim=1).tolist(), hits.any(dim=-1).sum(dim=1).tolist()


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's rows in rank order (shards of unequal length allowed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes)])


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: Iterable, device: torch.device,
                     preprocess: Optional[nn.Module] = None,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features and labels for every batch of ``loader`` (encoder in eval mode)."""
    was_training = encoder.training
    encoder.eval()
    features, labels = [], []
    for images, targets in progress(loader, desc, total=len(loader) if hasattr(loader, "__len__") else None,
                                    unit="batch"):
        images = images.to(device, non_blocking=True)
        if preprocess is not None:
            images = preprocess(images)
        features.append(encoder(images).float())
        labels.append(targets.to(device))
    encoder.train(was_training)
    if not features:
        raise ValueError("no images to extract features from: the classifier split is empty")
    return torch.cat(features), torch.cat(labels)


@torch.enable_grad()  # the harness runs validation callbacks under no_grad
def train_heads_on_features(heads: LinearHeads, features: torch.Tensor, labels: torch.Tensor,
                            learning_rates: Sequence[float], epochs: int, batch_size: int, seed: int,
                            momentum: float = 0.9, weight_decay: float = 0.0,
                            logit_regularization: float = 0.0) -> float:
    """Trains freshly reset heads on precomputed features; returns the last epoch's mean loss."""
    heads.reset_parameters()
    heads.train()
    batch_size = min(batch_size, features.shape[0])
    optimizer = heads_optimizer(heads, learning_rates, batch_size, momentum, weight_decay)
    steps_per_epoch = features.shape[0] // batch_size
    total = steps_per_epoch * epochs
    step, last_loss = 0, float("nan")

    for epoch in progress(range(epochs), f"linear heads ({len(learning_rates)} lr)", unit="epoch"):
        order = epoch_permutation(features.shape[0], mix_seed(seed, SeedStream.HEAD_FEATURE_ORDER), epoch)
        order = order.to(features.device)
        running = 0.0
        for start in range(0, steps_per_epoch * batch_size, batch_size):
            index = order[start:start + batch_size]
            apply_schedule(optimizer, step, total)
            loss = heads_loss(heads(features[index]), labels[index], logit_regularization)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        last_loss = running / max(steps_per_epoch, 1)
    heads.eval()
    return last_loss
