"""Tests for the offline Determined config checker (tests/determined_schema.py) and, through it,
for every experiment config in ``config/`` -- the configs that run BYOL pre-training and linear
evaluation (Grill et al. 2020, arXiv 2006.07733, Section 4 and Appendix C).

1. The checker agrees with the Determined master's own schema test cases
   (``shared/determined-schemas/test_cases/v0``): every ``sane_as``/``complete_as`` case passes and
   every ``sanity_errors``/``completeness_errors`` case fails with the expected messages.
2. Every ``config/*.yaml`` is accepted by the master's schema, is complete where the master has no
   defaults (searcher, checkpoint storage) and follows the project's rules for Determined 0.38
   (script entrypoint, no deprecated fields, torch launcher for multi-slot trials).
3. Broken configs are rejected, so the config tests can fail.
"""
import re
from pathlib import Path

import pytest
import yaml

from determined_schema import (
    SCHEMA_ID_PREFIX,
    completeness_errors,
    config_errors,
    find_schema_dir,
    project_rule_errors,
    schema_errors,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = find_schema_dir()
NO_SCHEMAS = "shared determined-schemas not found at <repo>/../shared/determined-schemas"

# Test-case keys this checker covers, and those it leaves to the master (with the reason).
CHECKED_KEYS = {"name", "case", "sane_as", "sanity_errors", "complete_as", "completeness_errors"}
UNCHECKED_KEYS = {
    "default_as": "filling defaults is master-side Go code (WithDefaults), not schema validation",
    "defaulted": "expected result of default filling (see default_as)",
    "merge_as": "merging two configs is master-side Go code (Merge), not schema validation",
    "merge_src": "input of a merge test (see merge_as)",
    "merged": "expected result of a merge test (see merge_as)",
}

SAMPLE_CONFIG = """
name: byol-sample
description: sample config used until config/*.yaml exist
entrypoint: >-
  python3 -m determined.launch.torch_distributed python3 model_def.py --config config/x.yaml
resources:
  slots_per_trial: 8
  shm_size: 4G
searcher:
  name: single
  metric: test_accuracy
  smaller_is_better: false
max_restarts: 2
hyperparameters:
  dataset: {name: cifar10, root: /data, validation_size: 10000}
  model: {backbone: resnet18, projector: [4096, 256], predictor: [4096, 256]}
  optimizer: {name: lars, base_lr: 2.0, weight_decay: 1.5e-6, exclude_bias_and_bn: true}
  views:
    - {blur_p: 1.0, solarize_p: 0.0}
    - {blur_p: 0.1, solarize_p: 0.2}
  global_batch_size: 512
  epochs: 300
  ema: {base: 0.996}
environment:
  image: determinedai/pytorch-ngc:0.38.1
  environment_variables:
    - OMP_NUM_THREADS=4
checkpoint_storage:
  type: shared_fs
  host_path: /mnt/checkpoints
  storage_path: byol
  save_trial_latest: 1
"""


def _sample() -> dict:
    return yaml.safe_load(SAMPLE_CONFIG)


def _need_schemas():
    if SCHEMA_DIR is None:
        pytest.skip(NO_SCHEMAS)


# --------------------------------------------------------------------------------------------
# 1. The checker against Determined's own schema test cases.
# --------------------------------------------------------------------------------------------
def _case_files():
    return sorted((SCHEMA_DIR / "test_cases" / "v0").glob("*.yaml")) if SCHEMA_DIR else []


def _shared_cases():
    params = []
    for path in _case_files():
        for case in yaml.safe_load(path.read_text()) or []:
            for mode, valid_key, errors_key in ((False, "sane_as", "sanity_errors"),
                                                (True, "complete_as", "completeness_errors")):
                expectations = [(sid, None) for sid in case.get(valid_key) or []]
                expectations += list((case.get(errors_key) or {}).items())
                for schema_id, patterns in expectations:
                    kind = (errors_key if patterns is not None else valid_key).split("_")[0]
                    params.append(pytest.param(
                        case["case"], schema_id, mode, patterns,
                        id=f"{path.stem}:{case['name']}:{kind}:{schema_id[len(SCHEMA_ID_PREFIX):]}"))
    return params or [pytest.param(None, None, False, None, id="no-schemas",
                                   marks=pytest.mark.skip(reason=NO_SCHEMAS))]


@pytest.mark.parametrize("instance,schema_id,complete,expected_patterns", _shared_cases())
def test_shared_schema_case(instance, schema_id, complete, expected_patterns):
    errors = schema_errors(instance, schema_id, SCHEMA_DIR, complete=complete)
    if expected_patterns is None:
        assert errors == [], f"valid case rejected: {errors}"
    else:
        assert errors, "invalid case accepted"
        for pattern in expected_patterns:
            assert any(re.search(pattern, e) for e in errors), \
                f"no error matches {pattern!r}; got {errors}"


def test_shared_cases_cover_required_files_and_only_known_keys():
    _need_schemas()
    stems = {p.stem for p in _case_files()}
    assert {"experiment", "hyperparameters", "entrypoint", "searchers", "unions"} <= stems
    for path in _case_files():
        for case in yaml.safe_load(path.read_text()) or []:
            unknown = set(case) - CHECKED_KEYS - set(UNCHECKED_KEYS)
            assert not unknown, f"{path.name}: case {case.get('name')!r} has new keys {unknown}"


# --------------------------------------------------------------------------------------------
# 2. The project's configs.
# --------------------------------------------------------------------------------------------
def _config_params():
    paths = sorted((REPO_ROOT / "config").glob("*.yaml"))
    return [pytest.param(p, id=p.name) for p in paths] or [pytest.param(None, id="no-configs")]


def _load_config(path) -> dict:
    if path is None:
        pytest.fail(f"no experiment configs: expected at least one {REPO_ROOT / 'config'}/*.yaml")
    config = yaml.safe_load(path.read_text())
    assert isinstance(config, dict), f"{path}: top level must be a mapping"
    return config


@pytest.mark.parametrize("path", _config_params())
def test_config_accepted_by_master_schema(path):
    config = _load_config(path)
    _need_schemas()
    assert config_errors(config, SCHEMA_DIR) == []
    assert completeness_errors(config, SCHEMA_DIR) == []


@pytest.mark.parametrize("path", _config_params())
def test_config_follows_project_rules(path):
    assert project_rule_errors(_load_config(path)) == []


def test_sample_config_from_file_is_valid(tmp_path):
    _need_schemas()
    path = tmp_path / "sample.yaml"
    path.write_text(SAMPLE_CONFIG)
    config = yaml.safe_load(path.read_text())
    assert config_errors(config, SCHEMA_DIR) == []
    assert completeness_errors(config, SCHEMA_DIR) == []
    assert project_rule_errors(config) == []


# --------------------------------------------------------------------------------------------
# 3. Broken configs are rejected.
# --------------------------------------------------------------------------------------------
def _set(config, dotted, value):
    *parents, last = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


SCHEMA_BREAKS = [
    ("searcher.name", "nonsense", r"<config>\.searcher: .*'single'"),
    ("hyperparameters.lr", {"type": "bogus", "val": 1}, r"<config>\.hyperparameters\.lr: .*type"),
    ("hyperparameters.model.type", "resnet", r"<config>\.hyperparameters\.model: .*type"),
    ("hyperparameters.wd", {"type": "double", "minval": 1.0, "maxval": 0.1},
     r"minval must be less than maxval"),
    ("hyperparameters.bs", {"type": "categorical"}, r"<config>\.hyperparameters\.bs: 'vals'"),
    ("checkpoint_storage.type", "ftp", r"<config>\.checkpoint_storage: .*shared_fs"),
    ("checkpoint_storage.storage_path", "/elsewhere", r"subdirectory of host_path"),
    ("resources.slots_per_trial", -1, r"<config>\.resources\.slots_per_trial: "),
    ("resources.shm_size", "lots", r"must be a valid memory size"),
    ("max_restarts", "three", r"<config>\.max_restarts: "),
    ("entrypoint", 7, r"<config>\.entrypoint: "),
    ("environment.environment_variables", {"gpuz": ["A=1"]}, r"<config>\.environment\."),
    ("searcher.max_length", {"batches": 10, "epochs": 1}, r"one attribute named"),
    ("epochs", 300, r"<config>: Additional properties .*'epochs'"),
]


@pytest.mark.parametrize("dotted,value,pattern", SCHEMA_BREAKS, ids=[b[0] for b in SCHEMA_BREAKS])
def test_broken_config_rejected_by_schema(dotted, value, pattern):
    _need_schemas()
    config = _sample()
    _set(config, dotted, value)
    errors = config_errors(config, SCHEMA_DIR)
    assert any(re.search(pattern, e) for e in errors), f"expected {pattern!r}; got {errors}"


RULE_BREAKS = [
    ("entrypoint", "model_def:BYOLTrial", "legacy 'module:Class'"),
    ("entrypoint", ["python3", "model_def.py"], "must be a command string"),
    ("entrypoint", "python3 -m determined.launch.torch_distributed python3 train.py",
     "model_def.py"),
    ("entrypoint", "python3 model_def.py", "slots_per_trial=8"),
    ("searcher.max_length", {"epochs": 1}, "searcher.max_length"),
    ("min_validation_period", {"batches": 100}, "min_validation_period"),
    ("optimizations", {"aggregation_frequency": 1}, "optimizations"),
    ("scheduling_unit", 100, "scheduling_unit"),
]


@pytest.mark.parametrize("dotted,value,fragment", RULE_BREAKS,
                         ids=[f"{b[0]}={b[1]!r}" for b in RULE_BREAKS])
def test_broken_config_rejected_by_project_rules(dotted, value, fragment):
    config = _sample()
    _set(config, dotted, value)
    errors = project_rule_errors(config)
    assert any(fragment in e for e in errors), f"expected {fragment!r}; got {errors}"


COMPLETENESS_BREAKS = [
    ("searcher", None, r"<config>\.searcher: required"),
    ("searcher.metric", None, r"<config>\.searcher: metric is a required property"),
    ("checkpoint_storage.host_path", None, r"<config>\.checkpoint_storage: host_path is a required"),
    ("checkpoint_storage", {"type": "gcs"}, r"<config>\.checkpoint_storage: bucket is a required"),
]


@pytest.mark.parametrize("dotted,value,pattern", COMPLETENESS_BREAKS,
                         ids=[f"{b[0]}={b[1]!r}" for b in COMPLETENESS_BREAKS])
def test_incomplete_config_rejected(dotted, value, pattern):
    _need_schemas()
    config = _sample()
    _set(config, dotted, value)
    assert config_errors(config, SCHEMA_DIR) == []  # fine as written, but the master can't run it
    errors = completeness_errors(config, SCHEMA_DIR)
    assert any(re.search(pattern, e) for e in errors), f"expected {pattern!r}; got {errors}"


def test_single_slot_may_run_without_launcher():
    config = _sample()
    config["resources"]["slots_per_trial"] = 1
    config["entrypoint"] = "python3 model_def.py --config config/x.yaml"
    assert project_rule_errors(config) == []


def test_non_mapping_config_rejected():
    assert project_rule_errors(["not", "a", "mapping"])
    _need_schemas()
    assert config_errors(["not", "a", "mapping"], SCHEMA_DIR)
    assert completeness_errors(["not", "a", "mapping"], SCHEMA_DIR)


def test_find_schema_dir_absent_and_present(tmp_path):
    repo = tmp_path / "main"
    repo.mkdir()
    assert find_schema_dir(repo) is None
    schema_file = tmp_path / "shared" / "determined-schemas" / "expconf" / "v0" / "experiment.json"
    schema_file.parent.mkdir(parents=True)
    schema_file.write_text("{}")
    assert find_schema_dir(repo) == tmp_path / "shared" / "determined-schemas"


def test_unknown_schema_id_is_a_clear_error():
    _need_schemas()
    with pytest.raises(ValueError, match="unknown schema id"):
        schema_errors({}, SCHEMA_ID_PREFIX + "nope.json", SCHEMA_DIR)
