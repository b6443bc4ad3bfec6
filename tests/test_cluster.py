"""The cluster path, end to end: each config's exact entrypoint run by Determined 0.38.1's real
harness (prep_container, launch, torch_distributed with torchrun and gloo, the core context's REST
calls) against the stand-in master of ``fake_master.py``, which replaces only the Go master at its
HTTP API. Experiments are submitted through the real SDK (``client.create_experiment``, which
uploads the folder as ``det experiment create`` does, honouring ``.detignore``), shrunk with config
overrides as ``det experiment create --config hyperparameters.KEY=VALUE`` would set them.
"""
import copy
import io
import json
import math
import os
import tarfile

import pytest
import torch
import yaml

import fake_master
from runtime.sampling import ShardSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREEMPT_LOG = os.environ.get("BYOL_PREEMPT_LOG")  # also write the 2-slot preempt-and-resume log here
TIMEOUT = 420  # a hung trial (e.g. ranks waiting on each other) fails the test instead of the suite

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(fake_master.container_support() is not None,
                                 reason=str(fake_master.container_support()))]

# Tiny run: digits, a small CNN, 6 steps (the code path of the real configs, shrunk by overrides).
TINY = {"hyperparameters.backbone": "small_cnn", "hyperparameters.image_size": 16,
        "hyperparameters.global_batch_size": 32, "hyperparameters.projection_size": 16,
        "hyperparameters.projection_hidden_size": 32, "hyperparameters.train_length": {"batches": 6},
        "hyperparameters.warmup_epochs": 0, "hyperparameters.validation_period": {"batches": 3},
        "hyperparameters.checkpoint_period": {"batches": 3}, "hyperparameters.compare_random_init": False,
        "hyperparameters.classifier.learning_rates": [0.1, 0.05], "hyperparameters.classifier.train_epochs": 1,
        "hyperparameters.classifier.batch_size": 64, "hyperparameters.classifier.knn_k": 0,
        "data": {"dataset": "digits", "root": "data", "validation_size": 200, "num_workers": 0}}
# The ImageNet config's setting on 2 slots: BYOL-loss validation (classifier_validation false) on
# a CLS_VALIDATION so small that rank 1's evaluation shard holds none of it.
IMAGENET_LIKE = {**TINY, "resources.slots_per_trial": 2, "hyperparameters.checkpoint_period": {"batches": 2},
                 "data": {**TINY["data"], "validation_size": 20}}


def with_overrides(path: str, overrides: dict) -> dict:
    """The config file with ``--config KEY=VALUE`` overrides applied (dotted keys into mappings)."""
    with open(os.path.join(ROOT, path)) as handle:
        config = yaml.safe_load(handle)
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = copy.deepcopy(value)
    return config


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    with fake_master.stand_in_master(str(tmp_path_factory.mktemp("shared_fs"))) as stand_in:
        yield stand_in
        if os.environ.get("BYOL_STAND_IN_ROUTES"):  # for the record: the calls this module's runs made
            with open(os.environ["BYOL_STAND_IN_ROUTES"], "w") as handle:
                handle.write("\n".join(stand_in.answered_routes()) + "\n")
        assert stand_in.unanswered == [] and stand_in.errors == []


@pytest.fixture(scope="module")
def sdk(master, tmp_path_factory):
    """The real Determined SDK logged in to the stand-in (DET_USER/DET_PASS, a private token store)."""
    from determined.experimental import client

    saved = {key: os.environ.get(key) for key in ("DET_USER", "DET_PASS", "XDG_CONFIG_HOME", "DET_MASTER")}
    os.environ.update(DET_USER="determined", DET_PASS="StandIn-Pass1", DET_MASTER=master.url,
                      XDG_CONFIG_HOME=str(tmp_path_factory.mktemp("det-config")))
    yield client.Determined(master=master.url)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def submit(sdk, master, path: str, overrides: dict):
    experiment = sdk.create_experiment(with_overrides(path, overrides), ROOT)
    return experiment.id, master.new_trial(experiment.id)


def model_state(master, uuid: str) -> dict:
    state = torch.load(os.path.join(master.checkpoint_dir(uuid), "state_dict.pth"), weights_only=False)
    return state["models_state_dict"][0]


@pytest.fixture(scope="module")
def one_slot(sdk, master):
    """config/local-digits.yaml's entrypoint on 1 slot, to its end."""
    experiment_id, trial_id = submit(sdk, master, "config/local-digits.yaml", TINY)
    done = master.launch(trial_id, timeout=TIMEOUT)
    return experiment_id, trial_id, done


def test_upload_honours_detignore(one_slot, master):
    names = tarfile.open(fileobj=io.BytesIO(master.experiments[one_slot[0]]["tgz"])).getnames()
    assert "model_def.py" in names and "config/local-digits.yaml" in names
    assert not [n for n in names if n.startswith((".venv", "outputs/", "data/")) or n.endswith(".pt")]


def test_one_slot_trains_validates_checkpoints_and_exits(one_slot, master):
    experiment_id, trial_id, done = one_slot
    assert done.returncode == 0, done.stdout[-4000:]
    assert [m["steps"] for m in master.training_metrics(trial_id)] == [3, 6]
    validations = master.training_metrics(trial_id, "validation")
    assert [v["steps"] for v in validations] == [3, 6]
    assert all(0 <= v["metrics"]["validation_accuracy"] <= 1 for v in validations)  # the searcher metric
    checkpoints = master.trial_checkpoints(trial_id)
    assert [c.metadata["steps_completed"] for c in checkpoints] == [3, 6]
    load_data = json.load(open(os.path.join(master.checkpoint_dir(checkpoints[-1].uuid), "load_data.json")))
    assert load_data["hparams"] == master.trials[trial_id].hparams  # pytorch.init(hparams=...)
    assert load_data["experiment_config"]["searcher"]["metric"] == "validation_accuracy"
    import evaluate_result  # a downloaded cluster checkpoint evaluates locally (`det checkpoint download`)

    hparams, config = evaluate_result.checkpoint_config(master.checkpoint_dir(checkpoints[-1].uuid))
    assert hparams["train_length"] == {"batches": 6} and config["data"]["dataset"] == "digits"
    assert ("GET", f"/api/v1/allocations/{trial_id}.1/signals/preemption") in master.requests


def test_best_and_final_checkpoint_choice(one_slot, sdk, master):
    import evaluate_result

    experiment_id, trial_id, _ = one_slot
    by_steps = master.trial_checkpoints(trial_id)
    _, final = evaluate_result.experiment_checkpoint(sdk, experiment_id)
    assert final.uuid == by_steps[-1].uuid
    _, best = evaluate_result.experiment_checkpoint(sdk, experiment_id, best=True)
    metric = {c.uuid: c.training.searcherMetric for c in by_steps}
    assert metric[best.uuid] == max(metric.values())
    _, chosen = evaluate_result.experiment_checkpoint(sdk, experiment_id, checkpoint_uuid=by_steps[0].uuid)
    assert chosen.uuid == by_steps[0].uuid
    with pytest.raises(evaluate_result.EvaluationError, match="not found"):
        evaluate_result.experiment_checkpoint(sdk, experiment_id, checkpoint_uuid="no-such-uuid")


def test_evaluate_result_experiment_id_through_the_sdk(one_slot, sdk, master, capsys):
    """evaluate_result.py --experiment-id creates the CLASSIFIER_ONLY experiment of the final
    checkpoint through the real SDK; its trial then loads that checkpoint's encoder on the cluster."""
    import determined_schema as schema
    import evaluate_result

    experiment_id, trial_id, _ = one_slot
    final = master.trial_checkpoints(trial_id)[-1]
    assert evaluate_result.main(["--experiment-id", str(experiment_id), "--classifier-train-epochs", "1",
                                 "--master", master.url, "--model-dir", ROOT]) == 0
    new_id = int(capsys.readouterr().out.strip())
    created = yaml.safe_load(master.experiments[new_id]["original"])
    assert created["hyperparameters"]["training_mode"] == "CLASSIFIER_ONLY"
    assert created["hyperparameters"]["pretrained_checkpoint"] == final.uuid
    assert created["searcher"]["metric"] == "validation_accuracy" and "checkpoint_storage" not in created
    assert schema.project_rule_errors(created) == []
    schema_dir = schema.find_schema_dir()
    if schema_dir is not None:
        assert schema.config_errors(created, schema_dir) == []
    eval_trial = master.new_trial(new_id)
    done = master.launch(eval_trial, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "validation_accuracy" in master.training_metrics(eval_trial, "validation")[-1]["metrics"]
    pretrained = model_state(master, final.uuid)
    evaluated = model_state(master, master.trial_checkpoints(eval_trial)[-1].uuid)
    encoder = {k[len("encoder."):]: v for k, v in evaluated.items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(v, pretrained["online_encoder.net." + k]) for k, v in encoder.items())


def test_warm_start_trains_its_own_length_and_ends(one_slot, sdk, master):
    """searcher.source_checkpoint_uuid: the master hands another trial's checkpoint with
    steps_completed = 0; the trial trains its full (here shorter) length from those weights."""
    _, source_trial, _ = one_slot
    source = master.trial_checkpoints(source_trial)[-1]  # trained 6 steps
    overrides = {**TINY, "hyperparameters.train_length": {"batches": 4},
                 "hyperparameters.checkpoint_period": {"batches": 4}, "searcher.source_checkpoint_uuid": source.uuid}
    _, trial_id = submit(sdk, master, "config/local-digits.yaml", overrides)
    done = master.launch(trial_id, latest_checkpoint=source.uuid, steps_completed=0, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "warm start from checkpoint" in done.stdout
    assert [m["steps"] for m in master.training_metrics(trial_id)] == [3, 4]  # validation at 3
    # checkpoint policy "all": one after each validation
    assert [c.metadata["steps_completed"] for c in master.trial_checkpoints(trial_id)] == [3, 4]


def rank_shards_without_validation(config: dict) -> list:
    """Ranks whose evaluation shard (CLS_VALIDATION then TEST, contiguous) has no CLS_VALIDATION image."""
    from data import Split, build_dataset

    validation = config["data"]["validation_size"]
    test = len(build_dataset("digits", Split.TEST, root="data", transform=None, validation_size=validation))
    slots = config["resources"]["slots_per_trial"]
    return [rank for rank in range(slots) if ShardSampler(validation + test, rank, slots).start >= validation]


def test_two_slots_imagenet_setting_preempt_and_resume_bit_identical(sdk, master):
    """distributed-imagenet.yaml's entrypoint (torch_distributed, gloo) with BYOL-loss validation and
    a rank without CLS_VALIDATION images: an uninterrupted run, and a run preempted by the master
    after its first checkpoint then relaunched from its latest checkpoint, end with equal weights."""
    config = with_overrides("config/distributed-imagenet.yaml", IMAGENET_LIKE)
    assert rank_shards_without_validation(config) == [1]
    _, straight = submit(sdk, master, "config/distributed-imagenet.yaml", IMAGENET_LIKE)
    done = master.launch(straight, timeout=TIMEOUT, log_path=PREEMPT_LOG)
    assert done.returncode == 0, done.stdout[-4000:]
    losses = master.training_metrics(straight, "validation")
    assert [v["steps"] for v in losses] == [3, 6] and all(v["metrics"]["validation_byol_loss"] > 0 for v in losses)
    assert "test_accuracy" not in losses[-1]["metrics"]

    _, trial_id = submit(sdk, master, "config/distributed-imagenet.yaml", IMAGENET_LIKE)
    master.preempt_after_checkpoints = 1
    try:
        first = master.launch(trial_id, timeout=TIMEOUT, log_path=PREEMPT_LOG)
    finally:
        master.preempt_after_checkpoints = None
    assert first.returncode == 0, first.stdout[-4000:]
    assert master.acknowledged[-1] == f"{trial_id}.1"
    stopped = master.trial_checkpoints(trial_id)[-1]
    assert stopped.metadata["steps_completed"] < 6
    second = master.launch(trial_id, latest_checkpoint=stopped.uuid, timeout=TIMEOUT, log_path=PREEMPT_LOG)
    assert second.returncode == 0, second.stdout[-4000:]
    assert master.trials[trial_id].state == "COMPLETED"
    resumed_final = master.trial_checkpoints(trial_id)[-1]
    straight_final = master.trial_checkpoints(straight)[-1]
    assert resumed_final.metadata["steps_completed"] == straight_final.metadata["steps_completed"] == 6
    a, b = model_state(master, straight_final.uuid), model_state(master, resumed_final.uuid)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed_losses = [v for v in master.training_metrics(trial_id, "validation") if v["steps"] == 6]
    assert resumed_losses[-1]["metrics"]["validation_byol_loss"] == losses[-1]["metrics"]["validation_byol_loss"]


def test_search_config_runs_trial_by_trial_with_sampled_hyperparameters(sdk, master):
    """config/search-digits.yaml (adaptive_asha over base_lr, tau_base, weight_decay) submitted through
    the SDK; two trials, each with its own values sampled from the config's search space as the master
    samples them, run through the harness: each trains with its values (its checkpoint's hparams, LARS
    groups and EMA schedule), and reports what ASHA and the WebUI read (the searcher metric with the
    time metric ``batches`` at each validation, the training curves)."""
    import optim

    overrides = {**TINY, "searcher.max_time": 6}  # the searcher's length is the trial's train_length
    config = with_overrides("config/search-digits.yaml", overrides)
    spaces = {key: config["hyperparameters"][key] for key in ("base_lr", "tau_base", "weight_decay")}
    assert all(isinstance(space, dict) and "type" in space for space in spaces.values())
    experiment = sdk.create_experiment(config, ROOT)
    trials = [master.new_trial(experiment.id, seed=seed) for seed in (1, 2)]
    hparams = [master.trials[trial].hparams for trial in trials]
    assert all(first != second for first, second in zip(*(
        [h[key] for key in spaces] for h in hparams)))  # each trial has its own values
    for trial_id, values in zip(trials, hparams):
        assert spaces["base_lr"]["minval"] <= math.log10(values["base_lr"]) <= spaces["base_lr"]["maxval"]
        assert spaces["tau_base"]["minval"] <= values["tau_base"] <= spaces["tau_base"]["maxval"]
        done = master.launch(trial_id, timeout=TIMEOUT)
        assert done.returncode == 0, done.stdout[-4000:]
        assert "does not match `searcher.max_time`" not in done.stdout  # harness: fit()'s length is the searcher's
        last = master.trial_checkpoints(trial_id)[-1]
        load_data = json.load(open(os.path.join(master.checkpoint_dir(last.uuid), "load_data.json")))
        assert load_data["hparams"] == values
        state = torch.load(os.path.join(master.checkpoint_dir(last.uuid), "state_dict.pth"), weights_only=False)
        decayed = state["optimizers_state_dict"][0]["param_groups"][0]
        assert decayed["weight_decay"] == values["weight_decay"]
        assert decayed["initial_lr"] == pytest.approx(optim.scaled_learning_rate(values["base_lr"], 32))
        training = master.training_metrics(trial_id)
        assert {"loss", "online_classifier_accuracy", "lr", "tau"} <= set(training[0]["metrics"])
        expected_tau = sum(optim.cosine_schedule(step, 6, values["tau_base"], 1.0) for step in range(3)) / 3
        assert training[0]["metrics"]["tau"] == pytest.approx(expected_tau, rel=1e-6)
        validations = master.training_metrics(trial_id, "validation")
        assert [v["metrics"]["batches"] for v in validations] == [3, 6]  # ASHA's time_metric
        assert all(0 <= v["metrics"]["validation_accuracy"] <= 1 for v in validations)
