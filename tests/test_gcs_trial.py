"""The trial streaming ImageNet-layout images from a real storage server (gcp-storage-emulator):
pretraining batches with classifier validation through the real Determined harness."""
import os

import pytest
import yaml

from run_helpers import train_in_process


@pytest.mark.slow
def test_trial_streams_from_cloud_storage(tmp_path, gcs_env, imagenet_bucket):  # noqa: F811
    with open(os.path.join(os.path.dirname(__file__), "..", "config", "distributed-imagenet.yaml")) as handle:
        config = yaml.safe_load(handle)
    config["resources"]["slots_per_trial"] = 1
    hp = config["hyperparameters"]
    hp.update({"backbone": "small_cnn", "image_size": 16, "global_batch_size": 8, "projection_size": 16,
               "projection_hidden_size": 32, "train_length": {"batches": 2}, "sync_batch_norm": False,
               "validation_period": {"batches": 2}, "checkpoint_period": {"batches": 2},
               "classifier_validation": True})
    hp["classifier"].update({"train_epochs": 1, "batch_size": 8, "augmentation": "none"})
    config["data"] = {
        "dataset": "imagenet", "root": str(tmp_path / "unused"), "validation_size": 6, "num_workers": 2,
        "decode": "device",  # the config's: workers fetch bytes, the batch decodes in the trial
        "gcs": {"bucket": imagenet_bucket.name, "train_blob_list": imagenet_bucket.train_list,
                "val_blob_list": imagenet_bucket.val_list, "cache_dir": str(tmp_path / "cache"),
                "max_in_flight": 8},
    }
    path = tmp_path / "gcs.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = train_in_process(path, tmp_path)
    assert metrics["global_step"] == 2
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".part")]
    assert len(cached) >= len(imagenet_bucket.val), "streamed images were not cached"
