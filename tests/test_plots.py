"""plots.py: the metrics history the trial records, and the PNG drawn from it."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from runtime import plots


class _Trial:
    global_step = 0


def _history():
    trial = _Trial()
    history = plots.MetricsHistory(trial)
    for step in (10, 20, 30):
        trial.global_step = step
        history.on_training_workload_end(
            {"loss": torch.tensor(1.0 / step), "lr": np.float64(0.1 * step), "tau": 0.99,
             "images_per_second": 5.0, "note": "text"}, [])
    trial.global_step = 30
    history.on_validation_end({"test_accuracy": np.float64(0.5), "validation_accuracy": 0.6,
                               "knn_accuracy": 0.4, "validation_byol_loss": float("nan"),
                               "per_head": np.array([1.0, 2.0]), "best": "x"})
    return history


def test_history_records_numbers_per_step():
    history = _history()
    assert [r["step"] for r in history.training] == [10.0, 20.0, 30.0]
    assert history.training[1] == pytest.approx({"step": 20.0, "loss": 0.05, "lr": 2.0, "tau": 0.99})
    assert "images_per_second" not in history.training[0]  # only the curves that are drawn
    (validation,) = history.validation
    assert validation["step"] == 30.0 and validation["test_accuracy"] == 0.5
    assert "per_head" not in validation and "best" not in validation
    assert all(type(v) is float for r in history.training + history.validation for v in r.values())


def test_history_survives_a_weights_only_checkpoint():
    history = _history()
    buffer = io.BytesIO()
    torch.save({"callbacks": {"metrics_history": history.state_dict()}}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["callbacks"]["metrics_history"]
    restored = plots.MetricsHistory(_Trial())
    restored.load_state_dict(state)
    assert restored.training == history.training
    assert restored.validation[0]["test_accuracy"] == 0.5
    assert math.isnan(restored.validation[0]["validation_byol_loss"])


def test_batch_metrics_become_binned_points():
    trial = _Trial()
    history = plots.MetricsHistory(trial)
    trial.global_step = 100 + 45
    batches = [{"loss": float(i), "lr": np.float32(1.0), "images_per_second": 3.0} for i in range(45)]
    history.on_training_workload_end({"loss": 22.0, "lr": 1.0}, batches)
    points = history.training
    assert len(points) == plots.POINTS_PER_WORKLOAD
    assert points[-1]["step"] == 145.0 and points[0]["step"] == 102.0   # bins of 2 or 3 batches
    assert points[0]["loss"] == pytest.approx(0.5)                      # mean of batches 0 and 1
    assert sum(p["loss"] * n for p, n in zip(points, np.diff([100] + [p["step"] for p in points]))) == \
        pytest.approx(sum(range(45)))                                  # every batch counted once
    trial.global_step = 150
    history.on_training_workload_end({}, [{"loss": 1.0}, {"loss": 3.0}])
    assert history.training[-2:] == [{"step": 149.0, "loss": 1.0}, {"step": 150.0, "loss": 3.0}]


def test_series_skips_missing_and_nan():
    records = [{"step": 1.0, "a": 1.0}, {"step": 2.0}, {"step": 3.0, "a": float("nan")}, {"step": 4.0, "a": 2.0}]
    assert plots._series(records, "a") == ([1.0, 4.0], [1.0, 2.0])


def test_plot_path_sits_beside_the_metrics_file():
    assert plots.plot_path("out/run/metrics.json") == "out/run/metrics.png"
    assert plots.plot_path("metrics") == "metrics.png"


def _pixels(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_plot_is_a_png_with_the_curves(tmp_path):
    drawn = plots.write_metrics_plot(_history(), str(tmp_path / "sub" / "metrics.png"), title="tiny")
    empty = plots.write_metrics_plot(plots.MetricsHistory(_Trial()), str(tmp_path / "empty.png"))
    full, blank = _pixels(drawn), _pixels(empty)
    assert full.shape == blank.shape and full.shape[1] > full.shape[0] > 100
    # Coloured curve pixels (matplotlib's default cycle) appear only where something was recorded.
    def coloured(image):
        return int((image.max(axis=2) - image.min(axis=2) > 60).sum())
    assert coloured(full) > 200
    assert coloured(blank) == 0


def test_online_classifier_accuracy_is_recorded_and_the_last_period_kept(tmp_path):
    """The reference's online classifier accuracy (a per-batch training metric) is a curve of its own,
    and the last workload's averages are what the run reports as its final training figures."""
    trial = _Trial()
    history = plots.MetricsHistory(trial)
    assert history.last_training() == {}
    trial.global_step = 4
    batches = [{"loss": 2.0, "online_classifier_accuracy": torch.tensor(a)} for a in (0.25, 0.5, 0.75, 1.0)]
    history.on_training_workload_end({"loss": 2.0, "online_classifier_accuracy": 0.625, "lr": 0.1}, batches)
    assert [p["online_classifier_accuracy"] for p in history.training] == [0.25, 0.5, 0.75, 1.0]
    assert history.last_training() == {"loss": 2.0, "online_classifier_accuracy": 0.625, "lr": 0.1}
    restored = plots.MetricsHistory(trial)  # a resumed run at its end has only the checkpointed points
    restored.load_state_dict(history.state_dict())
    assert restored.last_training() == {"loss": 2.0, "online_classifier_accuracy": 1.0, "lr": 0.1}
    # Drawn in the accuracy panel (the right third), the only accuracy recorded here.
    image = _pixels(plots.write_metrics_plot(history, str(tmp_path / "online.png")))
    right = image[:, 2 * image.shape[1] // 3:]
    assert int((right.max(axis=2) - right.min(axis=2) > 60).sum()) > 50
    # Reported as a reducer (the workload's average only): one point at the workload's end.
    trial.global_step = 8
    history.on_training_workload_end({"loss": 1.0, "online_classifier_accuracy": 0.5},
                                     [{"loss": 1.0, "lr": 0.1} for _ in range(4)])
    assert history.training[-1] == {"step": 8.0, "loss": 1.0, "lr": 0.1, "online_classifier_accuracy": 0.5}
