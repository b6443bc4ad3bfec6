"""Determined's hyperparameter search: config/search-digits.yaml (adaptive_asha over base_lr, tau_base
and weight_decay, ranked on validation_accuracy, never on TEST), the stand-in master's sampling of a
search space as the Go master samples it, and the trial reading the concrete values the master hands
(a float with an integral value arrives as an integer, as Go writes JSON). The trial-by-trial run
through Determined's harness is in tests/test_cluster.py (slow)."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml

import fake_master
from runtime import launch
from runtime.settings import SEARCH_TYPES, local_values, parse_settings, slots_of
from utils import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SEARCH_CONFIG = ROOT / "config" / "search-digits.yaml"
SEARCHED = ("base_lr", "tau_base", "weight_decay")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def search_spaces(hparams: dict, prefix: str = "") -> dict:
    """``{dotted key: space}`` of every searched hyperparameter."""
    found = {}
    for key, value in hparams.items():
        if isinstance(value, dict) and value.get("type") in SEARCH_TYPES:
            found[prefix + key] = value
        elif isinstance(value, dict):
            found.update(search_spaces(value, f"{prefix}{key}."))
    return found


def within(value, space: dict) -> bool:
    kind = space["type"]
    if kind == "int":
        return isinstance(value, int) and space["minval"] <= value < space["maxval"]
    if kind == "double":
        return space["minval"] <= value <= space["maxval"]
    if kind == "log":
        return space["minval"] - 1e-9 <= math.log(value, space["base"]) <= space["maxval"] + 1e-9
    if kind == "categorical":
        return value in space["vals"]
    return value == space["val"]


def test_the_search_config_searches_on_validation_never_on_test():
    config = load(SEARCH_CONFIG)
    searcher = config["searcher"]
    assert searcher["name"] == "adaptive_asha"
    assert searcher["metric"] == "validation_accuracy" and searcher["smaller_is_better"] is False
    assert sorted(search_spaces(config["hyperparameters"])) == sorted(SEARCHED)
    # ASHA's rungs are lengths in the unit the harness adds to every validation; the whole length
    # must be the Trainer's max_length (the trial's train_length), or the harness warns.
    hparams = config["hyperparameters"]
    assert searcher["time_metric"] == "batches" and searcher["max_time"] == hparams["train_length"]["batches"]
    period = hparams["validation_period"]["batches"]
    rungs = [searcher["max_time"] / searcher["divisor"] ** k for k in range(searcher["max_rungs"])]
    assert all(rung % period == 0 or rung < period for rung in rungs), (rungs, period)


def test_the_schema_test_covers_the_search_config():
    import test_determined_schema

    assert SEARCH_CONFIG in [param.values[0] for param in test_determined_schema._config_params()]


@pytest.mark.parametrize("seed", range(20))
def test_the_stand_in_samples_every_type_in_its_range(seed):
    space = {"i": {"type": "int", "minval": 2, "maxval": 5}, "d": {"type": "double", "minval": 0.5, "maxval": 0.9},
             "l": {"type": "log", "base": 10, "minval": -6, "maxval": -3},
             "c": {"type": "categorical", "vals": [16, "a", [1, 2]]}, "k": {"type": "const", "val": 3},
             "nested": {"d": {"type": "double", "minval": 1.0, "maxval": 2.0}, "plain": 4.0}, "plain": [0.3, 1.0]}
    sample = fake_master.sample_hyperparameters(space, random.Random(seed))
    for key, value in search_spaces(space).items():
        *parents, last = key.split(".")
        node = sample
        for parent in parents:
            node = node[parent]
        assert within(node[last], value), (key, node[last])
    assert sample["nested"]["plain"] == 4 and isinstance(sample["nested"]["plain"], int)  # as Go writes 4.0
    assert sample["plain"] == [0.3, 1] and isinstance(sample["plain"][1], int)


def test_the_stand_in_samples_differ_between_trials():
    space = load(SEARCH_CONFIG)["hyperparameters"]
    first, second = (fake_master.sample_hyperparameters(space, random.Random(seed)) for seed in (0, 1))
    assert all(first[key] != second[key] for key in SEARCHED)


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_parses_the_values_the_master_hands(path):
    """What a trial of each config receives on a cluster (sampled, integral floats as integers)
    parses, and the searched keys reach the settings unchanged."""
    config = load(path)
    spaces = search_spaces(config["hyperparameters"])
    for seed in range(5):
        hparams = fake_master.sample_hyperparameters(config["hyperparameters"], random.Random(seed))
        settings = parse_settings(hparams, config.get("data"), slots_of(config))
        for key in spaces:
            assert getattr(settings, key) == pytest.approx(hparams[key]) and within(hparams[key], spaces[key])
        if not spaces:  # plain values: the same settings as the yaml's own floats
            assert settings == parse_settings(config["hyperparameters"], config.get("data"), slots_of(config))


def test_a_local_run_of_a_search_config_asks_for_one_value():
    config = launch.load_config(str(SEARCH_CONFIG))

    def args(*sets):
        return launch.parse_args(["--config", str(SEARCH_CONFIG), *[f"--set={item}" for item in sets]])

    with pytest.raises(ConfigError, match=r"'hyperparameters\.base_lr' is a search space \(type log\).*--set base_lr="):
        launch.overridden(config, args())
    with pytest.raises(ConfigError, match=r"hyperparameters\.weight_decay"):
        launch.overridden(config, args("base_lr=1.0", "tau_base=0.99"))
    hparams, data = launch.overridden(config, args("base_lr=1.0", "tau_base=0.99", "weight_decay=1.5e-6"))
    settings = parse_settings(hparams, data)
    assert (settings.base_lr, settings.tau_base, settings.weight_decay) == (1.0, 0.99, 1.5e-6)
    assert local_values({"a": {"type": "const", "val": 3}, "b": {"c": 1}}) == {"a": 3, "b": {"c": 1}}
