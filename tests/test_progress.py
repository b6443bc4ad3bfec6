"""Progress of long steps (runtime/progress.py): on a terminal a tqdm bar; in a log or a pipe plain
lines, without escape codes even for nested bars, each with the time left; the representation
comparison (the phase after the last validation) and the ``[train]`` lines show it too."""
from __future__ import annotations

import io
import json
import re
import subprocess
import time

import numpy as np
import pytest

from run_helpers import command, environment, write_config
from runtime import feature_probes, progress

ESTIMATE = re.compile(r"about \d\d:\d\d left")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def every_update(monkeypatch):
    """Log lines at every update instead of every LOG_INTERVAL_S seconds."""
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)


def test_nested_bars_in_a_log_are_plain_lines_with_the_time_left(every_update):
    log = io.StringIO()
    for _ in progress.progress(range(3), "outer", unit="epoch", enabled=True, stream=log):
        for _ in progress.progress(range(4), "inner", unit="batch", enabled=True, stream=log):
            pass
    text = log.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert any(line.startswith("outer: 3/3 epoch (100%)") for line in lines)
    assert any(line.startswith("inner: 2/4 batch (50%)") and ESTIMATE.search(line) for line in lines), lines
    assert all(line.startswith(("outer: ", "inner: ")) for line in lines)


def test_unknown_total_says_the_rate(every_update):
    log = io.StringIO()
    for _ in progress.progress(iter(range(3)), "listing", unit="page", enabled=True, stream=log):
        pass
    assert log.getvalue().splitlines()[-1].startswith("listing: 3 page, 00:00 elapsed (")


def test_a_terminal_gets_a_bar_and_a_disabled_rank_nothing():
    terminal = Terminal()
    for _ in progress.progress(range(3), "steps", enabled=True, stream=terminal):
        pass
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    quiet = io.StringIO()
    for _ in progress.progress(range(3), "steps", enabled=False, stream=quiet):
        pass
    assert quiet.getvalue() == ""


def test_remaining_estimates_from_the_mean_step_time():
    now = [100.0]
    remaining = progress.Remaining(total=100, done=10, clock=lambda: now[0])
    assert remaining.text(10) == "about ? left"
    now[0] += 20.0  # 10 steps in 20 s: 80 steps left take 160 s
    assert remaining.text(20) == "about 02:40 left"
    assert remaining.text(100) == "about 00:00 left"


def test_the_representation_comparison_reports_progress(every_update, capsys):
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % 3
        return rng.normal(size=(n, 4)) + labels[:, None], labels

    splits = {"cls_train": split(60), "cls_validation": split(30), "test": split(30)}
    splits = {name: splits[key] for name, key in zip(
        [s.value for s in (feature_probes.data.Split.CLS_TRAIN, feature_probes.data.Split.CLS_VALIDATION,
                           feature_probes.data.Split.TEST)], splits)}
    results = feature_probes.compare_representations({"a": splits, "b": splits}, shots=(2,), draws=2)
    assert set(results) == {"a", "b"}
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("representation comparison")]
    assert lines[-1].startswith("representation comparison: 6/6 probe fit (100%)"), lines
    assert any(ESTIMATE.search(line) for line in lines[1:])


@pytest.mark.slow
def test_a_real_run_into_a_pipe_has_plain_progress_lines_with_the_time_left(tmp_path):
    """model_def.py with its output into a pipe (as `make run | tee log` or a cluster's log): no escape
    codes, the training and the representation comparison after the last validation say the time
    left, and wall_seconds covers the whole command."""
    config = write_config(str(tmp_path), classifier_validation=True, compare_random_init=True,
                          train_length={"batches": 3}, checkpoint_period={"batches": 3})
    started = time.time()
    result = subprocess.run(command(["--config", config, "--checkpoint-dir", str(tmp_path / "ck"),
                                     "--metrics-out", str(tmp_path / "metrics.json")]),
                            env=environment(), capture_output=True, text=True, timeout=600)
    took = time.time() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "\x1b" not in output and "\r" not in output
    assert re.search(r"\[train\] step 3/3 .*, about \d\d:\d\d left", result.stdout), result.stdout[-2000:]
    comparison = [line for line in result.stderr.splitlines() if line.startswith("representation comparison: ")]
    assert comparison and comparison[-1].startswith("representation comparison: 33/33 probe fit (100%)")
    assert all(ESTIMATE.search(line) or "about ? left" in line for line in comparison)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 < metrics["training_seconds"] < metrics["wall_seconds"] <= took + 1
    assert metrics["representation_probe_seconds"] < metrics["wall_seconds"] - metrics["training_seconds"]
