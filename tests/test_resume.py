"""Exact resume: N batches straight equal N/2, a stop, and N/2 more from the checkpoint, bit for bit
(networks, LARS momentum, schedule position, heads), for 1 and 2 processes; only complete,
unchanged, compatible checkpoints are resumed; checkpoint periods in batches or epochs."""
import json
import os
import pickle
import shutil

import pytest
import torch
from determined import pytorch

import model_def
from run_helpers import assert_identical, at_step, complete, load, straight_run, train, training_state, write_config
from runtime import checkpoints, launch
from runtime.settings import Length, parse_settings


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_is_bit_identical(tmp_path, nproc):
    config, straight, _ = straight_run(nproc)
    halfway = at_step(straight, 2)
    resumed = str(tmp_path / "resumed")
    result = train(["--config", config, "--checkpoint-dir", resumed, "--resume-from", halfway], nproc)
    assert "[byol] finished 4 steps" in result.stdout
    steps = [step for step, _ in complete(resumed)]
    assert steps == [3, 4], f"the resumed run should continue at step 3: {steps}"
    for step in (3, 4):
        ours, reference = load(at_step(resumed, step)), load(at_step(straight, step))
        assert_identical(training_state(ours), training_state(reference), f"step {step}")
        with open(os.path.join(at_step(resumed, step), "metadata.json")) as handle:
            assert json.load(handle)["steps_completed"] == step
    # The comparison can fail: the state one step earlier is not the same.
    with pytest.raises(AssertionError):
        assert_identical(training_state(load(at_step(resumed, 4))), training_state(load(at_step(straight, 3))))


@pytest.mark.slow
@pytest.mark.parametrize("override,setting", [("projection_hidden_size=48", "projection_hidden_size"),
                                              ("backbone=resnet18_cifar", "backbone")])
def test_incompatible_checkpoint_names_the_setting(tmp_path, override, setting):
    config, straight, _ = straight_run(1)
    result = train(["--config", config, "--checkpoint-dir", str(tmp_path / "ck"), "--resume-from",
                    at_step(straight, 2), "--set", override], check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: checkpoint") and f"{setting}=" in error, error
    assert override.split("=")[1] in error


def _fake_checkpoint(directory, step=3):
    """The files the harness writes, then the marker, as the trial's callback does."""
    os.makedirs(directory / "code")
    torch.save({"models_state_dict": [{"w": torch.ones(3)}]}, directory / checkpoints.STATE_FILE)
    with open(directory / "trial_state.pkl", "wb") as handle:
        pickle.dump({"trial_id": 0, "batches_trained": step}, handle)
    (directory / "load_data.json").write_text("{}")
    checkpoints.write_complete_marker(str(directory), step)
    return directory


def test_only_complete_unchanged_checkpoints_verify(tmp_path):
    good = _fake_checkpoint(tmp_path / "good", 3)
    assert checkpoints.verify_checkpoint(str(good))["global_step"] == 3
    partial = _fake_checkpoint(tmp_path / "partial", 4)
    os.remove(partial / checkpoints.COMPLETE_FILE)
    with pytest.raises(checkpoints.IncompleteCheckpointError, match="incomplete.*stopped while checkpointing") as info:
        checkpoints.verify_checkpoint(str(partial))
    assert str(good) in str(info.value)  # points at the complete one next to it
    damaged = _fake_checkpoint(tmp_path / "damaged", 5)
    with open(damaged / checkpoints.STATE_FILE, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"xyz")
    with pytest.raises(checkpoints.IncompleteCheckpointError, match="damaged: state_dict.pth differs"):
        checkpoints.verify_checkpoint(str(damaged))
    truncated = _fake_checkpoint(tmp_path / "truncated", 6)
    with open(truncated / checkpoints.STATE_FILE, "r+b") as handle:
        handle.truncate(10)
    with pytest.raises(checkpoints.IncompleteCheckpointError, match="has 10 bytes"):
        checkpoints.verify_checkpoint(str(truncated))
    assert [step for step, _ in checkpoints.complete_checkpoints(str(tmp_path))] == [3, 5, 6]


def test_trial_state_pickle_must_be_plain_data(tmp_path):
    """The harness unpickles trial_state.pkl without weights_only: refuse anything but plain data."""
    ckpt = _fake_checkpoint(tmp_path / "ck")
    with open(ckpt / "trial_state.pkl", "wb") as handle:
        pickle.dump({"trial_id": 0, "hook": os.system}, handle)
    checkpoints.write_complete_marker(str(ckpt), 3)  # even a consistently re-marked one
    with pytest.raises(checkpoints.IncompleteCheckpointError, match="not plain data"):
        checkpoints.verify_checkpoint(str(ckpt))


def test_resume_from_incomplete_checkpoint_is_refused(tmp_path, capsys):
    good = _fake_checkpoint(tmp_path / "ck" / "good")
    partial = tmp_path / "ck" / "partial"
    shutil.copytree(good, partial)
    os.remove(partial / checkpoints.COMPLETE_FILE)
    config = write_config(str(tmp_path))
    code = model_def.main(["--config", config, "--checkpoint-dir", str(tmp_path / "out"),
                           "--resume-from", str(partial)])
    assert code == 2
    error = capsys.readouterr().err
    assert "is incomplete" in error and str(good) in error
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_checkpoint_period_in_batches_or_epochs(tmp_path):
    for period, batches in (({"batches": 3}, 3), ({"epochs": 2}, 2 * 44)):
        settings = parse_settings({"checkpoint_period": period, "validation_period": {"epochs": 1}},
                                  {"dataset": "digits", "root": str(tmp_path)})
        validation, checkpoint = launch.periods(settings, steps_per_epoch=44)
        assert isinstance(checkpoint, pytorch.Batch) and (checkpoint.value, validation.value) == (batches, 44)
    assert Length(epochs=2).to_batches(44) == 88


def test_checkpoint_dir_inside_working_directory_must_be_ignored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".detignore").write_text("checkpoints/\n")
    os.makedirs(tmp_path / "checkpoints" / "run1")
    os.makedirs(tmp_path / "mine")
    launch.check_not_copied_into_itself(str(tmp_path / "checkpoints" / "run1"))
    launch.check_not_copied_into_itself(str(tmp_path.parent))  # outside: fine
    with pytest.raises(launch.ConfigError, match="would copy itself"):
        launch.check_not_copied_into_itself(str(tmp_path / "mine"))


def test_checkpoint_with_code_references_is_not_loaded(tmp_path, capsys):
    """Checkpoints load with torch.load(weights_only=True): a state holding a callable is refused."""
    ckpt = _fake_checkpoint(tmp_path / "ck")
    torch.save({"models_state_dict": [{}], "hook": os.getcwd}, ckpt / checkpoints.STATE_FILE)
    checkpoints.write_complete_marker(str(ckpt), 3)
    code = model_def.main(["--config", write_config(str(tmp_path)), "--checkpoint-dir", str(tmp_path / "out"),
                        "--resume-from", str(ckpt)])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: checkpoint {str(ckpt)!r} holds more than tensors") and "posix.getcwd" in error


@pytest.mark.slow
def test_a_run_keeps_its_files_in_one_output_folder_with_readable_aliases(tmp_path):
    """Checkpoints (UUID folders with latest / step-NNNNNN aliases), metrics.json (with the config,
    the final loss, the online classifier's accuracy and the checkpoint's path), metrics.png and the
    TensorBoard files in one folder; --resume-from takes an alias and continues in the same folder."""
    config = write_config(str(tmp_path), train_length={"batches": 2})
    out = tmp_path / "run"
    result = train(["--config", config, "--output-dir", str(out)])
    first, second = [path for _, path in complete(str(out / "checkpoints"))]
    assert f"[byol] checkpoint at step 2: {second} (also {out / 'checkpoints' / 'step-000002'}, " in result.stdout
    for alias, target in (("step-000001", first), ("step-000002", second), ("latest", second)):
        link = out / "checkpoints" / alias
        assert link.is_symlink() and os.readlink(link) == os.path.basename(target)  # relative: the folder moves
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint_path"] == second and metrics["last_checkpoint"] == os.path.basename(second)
    assert metrics["config"]["hyperparameters"]["projection_size"] == 16 and metrics["config"]["data"]["dataset"]
    assert metrics["final_loss"] > 0 and 0 <= metrics["online_classifier_accuracy"] <= 1
    assert "online classifier accuracy" in result.stdout and f"last checkpoint: {second}" in result.stdout
    assert (out / "metrics.png").is_file()
    assert any(p.name.startswith("events.") for p in (out / "tensorboard").iterdir())
    # The alias is resolved at start; the continued run writes into the resumed run's folder.
    result = train(["--config", config, "--batches", "3", "--resume-from", str(out / "checkpoints" / "latest")])
    assert f"output folder {out}:" in result.stdout
    assert [step for step, _ in complete(str(out / "checkpoints"))] == [1, 2, 3]
    assert os.path.realpath(out / "checkpoints" / "latest") == at_step(str(out / "checkpoints"), 3)
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 3
