"""End to end through the real Determined harness (Trainer API, local mode): a few
SELF_SUPERVISED batches with classifier validation on a tiny generated ImageFolder, a checkpoint,
then CLASSIFIER_ONLY from that checkpoint."""
import json
import os

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import model_def
from run_helpers import train_in_process
from runtime import checkpoints

CLASSES = ("circle", "square", "stripes")


def _draw(kind: str, rng: np.random.Generator) -> Image.Image:
    size = 24
    canvas = np.full((size, size, 3), rng.integers(0, 60), dtype=np.uint8)
    colour = rng.integers(120, 255, size=3)
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - 12) ** 2 + (xx - 12) ** 2 < rng.integers(20, 60)
    elif kind == "square":
        lo = rng.integers(3, 8)
        mask = (yy > lo) & (yy < size - lo) & (xx > lo) & (xx < size - lo)
    else:
        mask = (xx // 3) % 2 == 0
    canvas[mask] = colour
    return Image.fromarray(canvas)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("val", 12)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(count):
                _draw(kind, rng).save(folder / f"{i}.png")
    return root


def write_config(tmp_path, image_folder, **overrides):
    with open(os.path.join(os.path.dirname(__file__), "..", "config", "local-digits.yaml")) as handle:
        config = yaml.safe_load(handle)
    hp = config["hyperparameters"]
    hp.update({"image_size": 16, "global_batch_size": 16, "projection_size": 16, "projection_hidden_size": 32,
               "train_length": {"batches": 4}, "validation_period": {"batches": 4},
               "checkpoint_period": {"batches": 2}, "compare_random_init": False})
    hp["classifier"].update({"train_epochs": 2, "batch_size": 32, "learning_rates": [0.1, 0.05]})
    hp.update(overrides)
    config["data"] = {"dataset": "custom", "root": str(image_folder), "validation_size": 20, "num_workers": 0}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def only_checkpoint(directory):
    found = sorted(p for p in directory.iterdir() if (p / "state_dict.pth").exists() and not p.is_symlink())
    assert found, f"no checkpoint written in {directory}"
    return max(found, key=lambda p: json.loads((p / "metadata.json").read_text())["steps_completed"])


@pytest.mark.slow
def test_pretrain_then_classifier_only(tmp_path, image_folder):
    config = write_config(tmp_path, image_folder)
    metrics = train_in_process(config, tmp_path, "ckpt")
    assert metrics["global_step"] == 4
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["best_classifier_lr"] in (0.1, 0.05)
    for lr in ("0.1", "0.05"):
        assert f"validation_accuracy_lr{lr}" in metrics

    ckpt = only_checkpoint(tmp_path / "ckpt")
    state = checkpoints.read_checkpoint(str(ckpt))  # weights_only=True
    assert state["callbacks"]["byol_state"]["global_step"] == 4
    model = state["models_state_dict"][0]
    assert any(k.startswith("target_encoder.") for k in model)
    assert any(k.startswith("online_predictor.") for k in model)
    assert state["optimizers_state_dict"][0]["state"], "LARS momentum missing from the checkpoint"

    classify = write_config(tmp_path, image_folder, training_mode="CLASSIFIER_ONLY",
                            pretrained_checkpoint=str(ckpt), train_length={"batches": 3},
                            validation_period={"batches": 3})
    classified = train_in_process(classify, tmp_path, "ckpt2")
    assert 0.0 <= classified["test_accuracy"] <= 1.0
    # The frozen encoder of the classifier checkpoint equals the pretrained online encoder.
    new_state = checkpoints.read_checkpoint(str(only_checkpoint(tmp_path / "ckpt2")))
    pretrained = checkpoints.encoder_state(state, "pretrain")
    frozen = checkpoints.encoder_state(new_state, "classify")
    assert pretrained.keys() == frozen.keys()
    for key in pretrained:
        assert torch.equal(pretrained[key], frozen[key]), key


@pytest.mark.slow
def test_classifier_only_rejects_other_backbone(tmp_path, image_folder, capsys):
    config = write_config(tmp_path, image_folder, train_length={"batches": 1}, validation_period=None,
                          checkpoint_period=None, classifier_validation=False)
    assert model_def.main(["--config", str(config), "--checkpoint-dir", str(tmp_path / "ckpt")]) == 0
    ckpt = only_checkpoint(tmp_path / "ckpt")
    other = write_config(tmp_path, image_folder, training_mode="CLASSIFIER_ONLY", backbone="resnet18_cifar",
                         pretrained_checkpoint=str(ckpt))
    # Refused before any work, in one line naming both backbones (checkpoints.check_pretrained_backbone).
    assert model_def.main(["--config", str(other), "--checkpoint-dir", str(tmp_path / "ckpt2")]) == 2
    err = capsys.readouterr().err
    assert "backbone='small_cnn'" in err and "backbone='resnet18_cifar'" in err, err
    assert not (tmp_path / "ckpt2").exists() or not os.listdir(tmp_path / "ckpt2")


def test_bad_config_fails_before_work(tmp_path, image_folder, capsys):
    config = write_config(tmp_path, image_folder, backbone="resnet9000")
    assert model_def.main(["--config", str(config)]) == 2
    assert "resnet9000" in capsys.readouterr().err


def test_missing_dataset_files_fail_before_training(tmp_path, image_folder, capsys):
    config = write_config(tmp_path, image_folder)
    code = model_def.main(["--config", str(config), "--checkpoint-dir", str(tmp_path / "ckpt"),
                        "--set", "data.dataset=cifar10", "--set", f"data.root={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "cifar-10-batches-py" in err and "data.download: true" in err
    assert not any((tmp_path / "ckpt").iterdir()), "nothing should be trained or written"
