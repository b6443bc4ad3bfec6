"""Tests of runtime/settings.py: the typed experiment settings and their one-line config errors."""
import copy
import os

import pytest
import yaml

import augment
from runtime import settings as settings_module
from runtime.settings import Length, TrainingMode, load_settings, parse_settings
from utils import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "config", "local-digits.yaml")


@pytest.fixture(scope="module")
def digits_config() -> dict:
    with open(DIGITS) as handle:
        return yaml.safe_load(handle)


def test_local_digits_config_loads():
    settings = load_settings(DIGITS)
    assert settings.training_mode is TrainingMode.SELF_SUPERVISED
    assert settings.backbone == "small_cnn"
    assert settings.global_batch_size == 128
    assert settings.train_length == Length(epochs=40)
    assert settings.train_length.to_batches(10) == 400
    assert settings.validation_period == Length(epochs=20)
    assert settings.classifier.learning_rates == (0.4, 0.2, 0.1, 0.05)
    assert settings.data.dataset == "digits"
    assert settings.augmentation["view1"]["crop_scale"] == [0.3, 1.0]
    hparams = settings.as_hparams()
    assert hparams["training_mode"] == "SELF_SUPERVISED"
    yaml.safe_dump(hparams)  # plain data, loggable


def test_parse_settings_defaults_follow_the_paper(digits_config):
    settings = parse_settings({}, {}, slots=1)
    assert settings.base_lr == 0.2 and settings.weight_decay == 1.5e-6 and settings.tau_base == 0.996
    assert settings.lars_eta == 1e-3 and settings.projection_size == 256
    assert settings.projection_hidden_size == 4096
    same = parse_settings(digits_config["hyperparameters"], digits_config["data"], slots=2)
    assert same.global_batch_size == 128


def error_for(config: dict, slots: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(config["hyperparameters"], config.get("data"), slots=slots)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def edited(config: dict, **changes) -> dict:
    config = copy.deepcopy(config)
    for path, value in changes.items():
        section, *keys = path.split("__")
        target = config[section]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return config


def test_unknown_dataset(digits_config):
    message = error_for(edited(digits_config, data__dataset="mnistt"))
    assert "data.dataset" in message and "'mnistt'" in message and "cifar10" in message


def test_unknown_backbone_lists_known(digits_config):
    message = error_for(edited(digits_config, hyperparameters__backbone="resnet7"))
    assert "hyperparameters.backbone" in message and "'resnet7'" in message
    for name in ("resnet18", "resnet18_cifar", "resnet50", "resnet50_cifar", "small_cnn"):
        assert name in message


def test_crop_scale_that_disagrees(digits_config):
    message = error_for(edited(digits_config, hyperparameters__augmentation__view2__crop_scale=[0.9, 0.2]))
    assert "augmentation.view2" in message and "crop_scale" in message
    assert "0.9" in message and "0.2" in message


def test_unknown_augmentation_setting(digits_config):
    message = error_for(edited(digits_config, hyperparameters__augmentation__view1__blurr_p=0.5))
    assert "augmentation.view1" in message and "blurr_p" in message


@pytest.mark.parametrize("rates, word", [([], "non-empty"), ([0.1, 0.2, 0.1], "repeat"), ([0.1, -1], "positive")])
def test_bad_classifier_learning_rates(digits_config, rates, word):
    message = error_for(edited(digits_config, hyperparameters__classifier__learning_rates=rates))
    assert "hyperparameters.classifier.learning_rates" in message and repr(rates) in message and word in message


def test_global_batch_size_not_divisible_by_slots(digits_config):
    message = error_for(digits_config, slots=3)
    assert "hyperparameters.global_batch_size" in message and "128" in message and "3" in message
    # 128 divides by 2 and 4
    parse_settings(digits_config["hyperparameters"], digits_config["data"], slots=4)


def test_negative_epochs_in_train_length(digits_config):
    message = error_for(edited(digits_config, hyperparameters__train_length={"epochs": -3}))
    assert "hyperparameters.train_length.epochs" in message and "-3" in message
    message = error_for(edited(digits_config, hyperparameters__train_length={"steps": 3}))
    assert "hyperparameters.train_length" in message and "batches" in message


def test_unknown_hyperparameter_key(digits_config):
    message = error_for(edited(digits_config, hyperparameters__learning_rate=0.1))
    assert "hyperparameters.learning_rate" in message and "0.1" in message and "base_lr" in message
    message = error_for(edited(digits_config, hyperparameters__classifier__epochs=3))
    assert "hyperparameters.classifier.epochs" in message and "train_epochs" in message


def test_bad_training_mode(digits_config):
    message = error_for(edited(digits_config, hyperparameters__training_mode="PRETRAIN"))
    assert "hyperparameters.training_mode" in message and "'PRETRAIN'" in message
    assert "CLASSIFIER_ONLY" in message


def test_classifier_only_needs_pretrained_checkpoint(digits_config):
    config = edited(digits_config, hyperparameters__training_mode="CLASSIFIER_ONLY")
    message = error_for(config)
    assert "hyperparameters.pretrained_checkpoint" in message and "None" in message
    assert "CLASSIFIER_ONLY" in message
    config["hyperparameters"]["pretrained_checkpoint"] = "checkpoints/abc"
    settings = parse_settings(config["hyperparameters"], config["data"])
    assert settings.training_mode is TrainingMode.CLASSIFIER_ONLY


def test_wrong_types(digits_config):
    message = error_for(edited(digits_config, hyperparameters__base_lr="fast"))
    assert "hyperparameters.base_lr" in message and "'fast'" in message
    message = error_for(edited(digits_config, hyperparameters__tau_base=1.5))
    assert "hyperparameters.tau_base" in message and "1.5" in message


def test_missing_backbone_weights_file(digits_config, tmp_path):
    missing = str(tmp_path / "nope.pt")
    message = error_for(edited(digits_config, hyperparameters__backbone_weights=missing))
    assert "hyperparameters.backbone_weights" in message and missing in message


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("hyperparameters:\n  seed: [0, 1\n  backbone: small_cnn\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    message = str(info.value)
    assert str(path) in message and "yaml" in message and "\n" not in message


def test_config_without_hyperparameters(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("name: x\n")
    with pytest.raises(ConfigError, match="hyperparameters"):
        load_settings(str(path))


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert path in str(info.value) and "does not exist" in str(info.value)


def test_slots_come_from_resources(digits_config, tmp_path):
    config = edited(digits_config, resources__slots_per_trial=3)
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(config))
    assert settings_module.slots_of(config) == 3
    with pytest.raises(ConfigError, match="slots"):
        load_settings(str(path))
    assert load_settings(str(path), slots=2).global_batch_size == 128


def test_fine_tune_needs_one_head_and_an_encoder_lr(digits_config):
    base = edited(digits_config, hyperparameters__training_mode="FINE_TUNE",
                  hyperparameters__pretrained_checkpoint="checkpoints/abc")
    message = error_for(base)  # four head learning rates in the digits config
    assert "hyperparameters.classifier.learning_rates" in message and "FINE_TUNE" in message
    one_head = edited(base, hyperparameters__classifier__learning_rates=[0.1])
    message = error_for(one_head)  # encoder_lr defaults to 0
    assert "hyperparameters.classifier.encoder_lr" in message and "0.0" in message
    ok = edited(one_head, hyperparameters__classifier__encoder_lr=0.01)
    assert parse_settings(ok["hyperparameters"], ok["data"]).training_mode is TrainingMode.FINE_TUNE


def test_labelled_subset_settings_are_checked(tmp_path):
    listing = tmp_path / "1percent.txt"
    listing.write_text("a.JPEG\n")
    ok = parse_settings({"classifier": {"label_fraction": 0.01}})
    assert ok.classifier.label_fraction == 0.01 and ok.classifier.label_list is None
    assert parse_settings({"classifier": {"label_list": str(listing)}}).classifier.label_list == str(listing)
    with pytest.raises(ConfigError, match="label_fraction.*<= 1"):
        parse_settings({"classifier": {"label_fraction": 1.5}})
    with pytest.raises(ConfigError, match="label_fraction.*> 0"):
        parse_settings({"classifier": {"label_fraction": 0}})
    with pytest.raises(ConfigError, match="label_list.*existing file"):
        parse_settings({"classifier": {"label_list": str(tmp_path / "missing.txt")}})
    with pytest.raises(ConfigError, match="not both"):
        parse_settings({"classifier": {"label_list": str(listing), "label_fraction": 0.1}})


def test_sync_batch_norm_defaults_on_for_several_processes_in_one_place():
    """The default is set by parse_settings alone (section 3.3: batch statistics of the global
    batch); an explicit value wins."""
    assert parse_settings({}, None, slots=1).sync_batch_norm is False
    assert parse_settings({"global_batch_size": 8}, None, slots=2).sync_batch_norm is True
    assert parse_settings({"global_batch_size": 8, "sync_batch_norm": False}, None, slots=2).sync_batch_norm is False


def test_view_augmentations_are_parsed_once_with_each_views_defaults():
    """settings.views is table 6 with the config's overrides, keeping view 2's own defaults
    (blur 0.1, solarize 0.2) for keys the config does not give."""
    settings = parse_settings({"augmentation": {"view2": {"flip_p": 0.0}}})
    view1, view2 = settings.views
    paper1, paper2 = augment.paper_view_augmentations()
    assert view1 == paper1
    assert (view2.flip_p, view2.blur_p, view2.solarize_p) == (0.0, paper2.blur_p, paper2.solarize_p)
    assert "views" not in settings.as_hparams()
    with pytest.raises(ConfigError, match=r"augmentation\.view1'.*unknown augmentation setting"):
        parse_settings({"augmentation": {"view1": {"blurr_p": 0.5}}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_settings({"views": []})


def test_initialisation_is_reference_by_default_and_checked(digits_config):
    assert parse_settings({}, {}).init == "reference"
    assert parse_settings({"init": "torchvision"}, {}).init == "torchvision"
    message = error_for(edited(digits_config, hyperparameters__init="kaiming"))
    assert "hyperparameters.init" in message and "'kaiming'" in message
    assert "reference, torchvision" in message
