"""Training curves of a local run: loss, learning rate and accuracy, as one PNG.

On a cluster Determined's web UI draws these from the reported metrics. Off a cluster the trial
records the same metrics with :class:`MetricsHistory` (a harness callback) and runtime/launch.py draws
them next to its metrics file with :func:`write_metrics_plot`. What is drawn follows the paper
(Grill et al. 2020, arXiv 2006.07733): the BYOL loss of eq. (2)/(4) and the schedules of
section 3.3 (learning rate; EMA rate tau) during pretraining, and the linear-evaluation accuracy
of appendix C.1 (plus the kNN read-out, see ``knn.py``) at each validation.

The history is part of the checkpoint (plain floats, loadable with ``weights_only=True``), so a
resumed run draws its whole history.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence

from determined import pytorch

from utils import atomic_output

# online_classifier_accuracy: the reference's online linear classifier on sg(y) (byol.py), scored
# on each pretraining batch's labelled images; drawn with the validation accuracies.
TRAINING_KEYS = ("loss", "lr", "tau", "online_classifier_accuracy")
POINTS_PER_WORKLOAD = 20
ACCURACY_KEYS = ("validation_accuracy", "test_accuracy", "test_top5_accuracy", "knn_accuracy")
LOSS_KEYS = ("validation_byol_loss",)


def _plain_numbers(metrics: Dict[str, Any]) -> Dict[str, float]:
    """The finite-or-NaN numeric scalars of ``metrics`` as Python floats (numpy values included)."""
    plain = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if getattr(value, "ndim", 0):  # arrays are not scalars
            continue
        plain[str(key)] = number
    return plain


class MetricsHistory(pytorch.PyTorchCallback):
    """Records training metrics (binned per workload) and every validation's metrics.

    ``trial`` only needs a ``global_step`` attribute (the x axis).
    """

    def __init__(self, trial) -> None:
        self.trial = trial
        self.training: List[Dict[str, float]] = []
        self.validation: List[Dict[str, float]] = []
        self._last_workload: Dict[str, float] = {}

    def on_training_workload_end(self, avg_metrics: Dict[str, Any], batch_metrics: Any) -> None:
        """Per-batch metrics, averaged over at most ``POINTS_PER_WORKLOAD`` consecutive bins (a
        workload is an epoch or less), so curves show the schedules without a point per step."""
        averages = _plain_numbers({k: v for k, v in (avg_metrics or {}).items() if k in TRAINING_KEYS})
        if averages:
            self._last_workload = averages
        batches = [_plain_numbers({k: v for k, v in (m or {}).items() if k in TRAINING_KEYS})
                   for m in (batch_metrics or [])]
        # The trial's loss is not a per-batch metric (read from the device once per workload, with the
        # other device metrics: reducers.DeviceMeansReducer).
        on_device = getattr(getattr(self.trial, "step_metrics", None), "per_batch", None) or []
        if len(on_device) == len(batches):
            batches = [{**{k: v for k, v in step.items() if k in TRAINING_KEYS}, **m}
                       for m, step in zip(batches, on_device)]
        if not any(batches):
            batches = [_plain_numbers({k: v for k, v in (avg_metrics or {}).items() if k in TRAINING_KEYS})]
        end = self.trial.global_step
        bins = min(POINTS_PER_WORKLOAD, len(batches))
        for b in range(bins):
            lo, hi = len(batches) * b // bins, len(batches) * (b + 1) // bins
            chunk = [m for m in batches[lo:hi] if m]
            keys = sorted({key for m in chunk for key in m})
            if keys:
                record = {key: sum(m[key] for m in chunk if key in m) / sum(key in m for m in chunk) for key in keys}
                self.training.append({"step": float(end - len(batches) + hi), **record})
        # A metric reported only as the workload's average (a reducer) is one point at its end.
        only_averaged = {key: value for key, value in averages.items() if not any(key in m for m in batches)}
        if only_averaged and self.training and self.training[-1]["step"] == float(end):
            self.training[-1].update(only_averaged)

    def last_training(self) -> Dict[str, float]:
        """The last workload's averages (training metrics of the last epoch or period): the
        harness's averages when this process saw them, else the last recorded point."""
        if self._last_workload:
            return dict(self._last_workload)
        return {k: v for k, v in self.training[-1].items() if k != "step"} if self.training else {}

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        record = _plain_numbers(metrics)
        if record:
            self.validation.append({"step": float(self.trial.global_step), **record})

    def state_dict(self) -> Dict[str, Any]:
        return {"training": [dict(r) for r in self.training], "validation": [dict(r) for r in self.validation]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.training = [dict(r) for r in state.get("training", [])]
        self.validation = [dict(r) for r in state.get("validation", [])]


def plot_path(metrics_out: str) -> str:
    """``outputs/metrics.json`` -> ``outputs/metrics.png``."""
    return os.path.splitext(metrics_out)[0] + ".png"


def _series(records: Sequence[Dict[str, float]], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for record in records:
        value = record.get(key)
        if value is not None and math.isfinite(value):
            xs.append(record["step"])
            ys.append(value)
    return xs, ys


def write_metrics_plot(history: MetricsHistory, path: str, title: str = "", kept: str = "") -> str:
    """Draws loss, learning rate (and tau) and accuracy against the global step; returns ``path``.

    Panels with nothing recorded say so instead of staying blank.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in workers and on servers
    import matplotlib.pyplot as plt

    figure, (loss_ax, lr_ax, acc_ax) = plt.subplots(1, 3, figsize=(15, 4))
    panels = (
        (loss_ax, "loss", [("training loss", history.training, "loss"),
                           ("validation BYOL loss", history.validation, "validation_byol_loss")]),
        (lr_ax, "learning rate", [("learning rate", history.training, "lr")]),
        (acc_ax, "accuracy", [(key.replace("_", " "), history.validation, key) for key in ACCURACY_KEYS]
         + [("online classifier accuracy (training)", history.training, "online_classifier_accuracy")]),
    )
    for axis, label, curves in panels:
        drawn = 0
        for name, records, key in curves:
            xs, ys = _series(records, key)
            if xs:
                axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name)
                drawn += 1
        axis.set_xlabel("global step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if drawn:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center", transform=axis.transAxes)
    xs, taus = _series(history.training, "tau")
    if xs:
        tau_ax = lr_ax.twinx()
        tau_ax.plot(xs, taus, color="tab:gray", linestyle="--", label="EMA tau")
        tau_ax.set_ylabel("EMA tau")
        tau_ax.legend(loc="lower right", fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    try:
        with atomic_output(path, "the training curves", kept) as stream:  # no partial PNG on a full disk
            figure.savefig(stream, dpi=100, format="png")
    finally:
        plt.close(figure)
    return path
