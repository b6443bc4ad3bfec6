"""On a cluster only the master's experiment config decides the run: local-only flags in an
entrypoint are refused with one line pointing at `det experiment create --config`."""
from types import SimpleNamespace

import pytest

import model_def
from runtime import launch


@pytest.mark.parametrize("argv, named", [
    (["--set", "base_lr=0.1"], "--set"), (["--epochs", "3"], "--epochs"), (["--batches", "3"], "--batches"),
    (["--checkpoint-dir", "/x", "--metrics-out", "m.json"], "--checkpoint-dir, --metrics-out"),
])
def test_local_only_flags_are_refused_on_a_cluster(argv, named, monkeypatch, capsys):
    monkeypatch.setattr(launch.det, "get_cluster_info", lambda: SimpleNamespace(task_type="TRIAL"))
    assert model_def.main(["--config", "config/local-digits.yaml"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: {named} in the entrypoint would be ignored on a cluster")
    assert "det experiment create --config hyperparameters.KEY=VALUE" in err


def test_plain_entrypoint_is_accepted():
    assert launch.cluster_flag_error(launch.parse_args(["--config", "config/distributed-imagenet.yaml"])) is None
