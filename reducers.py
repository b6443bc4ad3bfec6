"""Metric reducers that are exact across Determined slots.

Each slot sees only its shard of the validation data, so averages of per-batch means are wrong
whenever shards differ in size. These reducers carry sums and counts instead and combine them in
``cross_slot_reduce``; their result over N processes equals that of 1 process over the same data.

The validated-accuracy reducer implements the linear evaluation protocol's model choice (appendix
C.1): among the heads trained with different learning rates, report on TEST the one that was best on
CLS_VALIDATION (ties go to the first, i.e. largest, learning rate).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from determined import pytorch


class WeightedMeanReducer(pytorch.MetricReducer):
    """Mean of a per-sample quantity, fed as ``update(sum, count)``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, total: float, count: int) -> None:
        self.total += float(total)
        self.count += int(count)

    def per_slot_reduce(self) -> tuple[float, int]:
        return self.total, self.count

    def cross_slot_reduce(self, per_slot_metrics: Sequence[tuple[float, int]]) -> float:
        return combine_means(per_slot_metrics)


class DeviceMeansReducer(pytorch.MetricReducer):
    """Per-step scalar metrics of training (the loss; during pretraining also the online
    classifier's loss and accuracy), kept on the device and read back once per reporting period:
    one synchronisation per period for all of them, where returning them from ``train_batch`` would
    cost one per step (Determined's harness calls ``.cpu()`` on every tensor it gets). Reports, under
    each name, the mean over steps and processes, as the harness reports a per-batch metric;
    ``per_batch`` holds, per step of the last period, the means over processes (for the curves of
    ``plots.MetricsHistory``). Register it with ``name=None`` (its result is a dict)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.per_batch: List[Dict[str, float]] = []
        self.reset()

    def reset(self) -> None:
        self.values: List[Any] = []

    def update(self, **metrics) -> None:
        """One step's 0-d tensors, one per name (no host synchronisation)."""
        if set(metrics) != set(self.names):
            raise ValueError(f"step metrics {sorted(metrics)} differ from the reducer's {sorted(self.names)}")
        self.values.append(torch.stack([metrics[name].detach() for name in self.names]).float())

    def per_slot_reduce(self) -> List[List[float]]:
        return torch.stack(self.values).tolist() if self.values else []

    def cross_slot_reduce(self, per_slot_metrics: Sequence[List[List[float]]]) -> Dict[str, float]:
        slots = [slot for slot in per_slot_metrics if slot]
        self.per_batch = [dict(zip(self.names, np.mean(np.asarray(rows, dtype=np.float64), axis=0).tolist()))
                          for rows in zip(*slots)]
        return {name: float(np.mean([step[name] for step in self.per_batch])) if self.per_batch else float("nan")
                for name in self.names}


def combine_means(per_slot: Sequence[tuple[float, int]]) -> float:
    total = sum(t for t, _ in per_slot)
    count = sum(c for _, c in per_slot)
    return total / count if count else float("nan")


class ValidatedAccuracyReducer(pytorch.MetricReducer):
    """Per-head correct counts on CLS_VALIDATION and TEST; reports the validation-chosen head.

    ``update(split, correct_top1, correct_top5, count)`` with per-head arrays of correct counts
    (``split`` is ``'validation'`` or ``'test'``).
    """

    def __init__(self, learning_rates: Sequence[float]) -> None:
        self.learning_rates = list(learning_rates)
        self.reset()

    def reset(self) -> None:
        heads = len(self.learning_rates)
        self.counts = {
            split: {"top1": np.zeros(heads, np.int64), "top5": np.zeros(heads, np.int64), "n": 0}
            for split in ("validation", "test")
        }

    def update(self, split: str, correct_top1, correct_top5, count: int) -> None:
        entry = self.counts[split]
        entry["top1"] += np.asarray(correct_top1, dtype=np.int64)
        entry["top5"] += np.asarray(correct_top5, dtype=np.int64)
        entry["n"] += int(count)

    def per_slot_reduce(self) -> Dict[str, Any]:
        return {split: {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
                for split, entry in self.counts.items()}

    def cross_slot_reduce(self, per_slot_metrics: List[Dict[str, Any]]) -> Dict[str, float]:
        return validated_accuracy(per_slot_metrics, self.learning_rates)


def validated_accuracy(per_slot_metrics: List[Dict[str, Any]], learning_rates: Sequence[float]) -> Dict[str, float]:
    """Sums per-slot counts, picks the head best on validation top-1, reports its test accuracy."""
    heads = len(learning_rates)
    totals = {split: {"top1": np.zeros(heads), "top5": np.zeros(heads), "n": 0}
              for split in ("validation", "test")}
    for slot in per_slot_metrics:
        for split in totals:
            totals[split]["top1"] += np.asarray(slot[split]["top1"])
            totals[split]["top5"] += np.asarray(slot[split]["top5"])
            totals[split]["n"] += slot[split]["n"]
    metrics: Dict[str, float] = {}
    for split, entry in totals.items():
        n = max(entry["n"], 1)
        for head, lr in enumerate(learning_rates):
            metrics[f"{split}_accuracy_lr{lr:g}"] = float(entry["top1"][head] / n)
    if totals["validation"]["n"] == 0 or totals["test"]["n"] == 0:
        return metrics
    validation_top1 = totals["validation"]["top1"] / totals["validation"]["n"]
    best = int(np.argmax(validation_top1))  # argmax picks the first of equal values
    metrics["validation_accuracy"] = float(validation_top1[best])
    metrics["test_accuracy"] = float(totals["test"]["top1"][best] / totals["test"]["n"])
    metrics["test_top5_accuracy"] = float(totals["test"]["top5"][best] / totals["test"]["n"])
    metrics["best_classifier_lr"] = float(learning_rates[best])
    return metrics
