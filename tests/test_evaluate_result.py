"""evaluate_result.py: the linear protocol and fine-tuning from a checkpoint (locally for real, on a
cluster through the real SDK against the stand-in master of fake_master.py), the kNN read-out during
pretraining (1 and 2 processes), the features / probe commands on a real checkpoint, and encoder export."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
import yaml

import backbone as backbones
import evaluate_result
from runtime import checkpoints, feature_probes, knn
from runtime.settings import parse_settings
from utils import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "config", "local-digits.yaml")
K = 5


# ------------------------------------------------------------------ settings of evaluation runs
def _pretraining_hparams():
    with open(DEFAULT_CONFIG) as handle:
        return yaml.safe_load(handle)


def test_evaluation_hparams_linear_and_fine_tune():
    hp = _pretraining_hparams()["hyperparameters"]
    linear = evaluate_result.evaluation_hparams(hp, "/ck/abc", 80)
    assert linear["training_mode"] == "CLASSIFIER_ONLY" and linear["pretrained_checkpoint"] == "/ck/abc"
    assert linear["train_length"] == {"epochs": 80} and linear["validation_period"] == {"epochs": 20}
    assert linear["checkpoint_period"] == {"epochs": 20}
    assert evaluate_result.evaluation_hparams(hp, "/ck/abc", 80, validate_every=5)["validation_period"] == {"epochs": 5}
    with pytest.raises(evaluate_result.EvaluationError, match="--validate-every must be >= 1"):
        evaluate_result.evaluation_hparams(hp, "/ck/abc", 80, validate_every=0)
    assert linear["classifier"]["learning_rates"] == hp["classifier"]["learning_rates"]
    assert hp["training_mode"] == "SELF_SUPERVISED"  # the input is left alone
    tuned = evaluate_result.evaluation_hparams(hp, "/ck/abc", 3)
    assert tuned["checkpoint_period"] == {"epochs": 1}
    tuned = evaluate_result.evaluation_hparams(hp, "/ck/abc", 30, fine_tune=True)
    assert tuned["training_mode"] == "FINE_TUNE"
    assert tuned["classifier"]["learning_rates"] == [min(hp["classifier"]["learning_rates"])]
    assert tuned["classifier"]["encoder_lr"] == min(hp["classifier"]["learning_rates"])
    tuned = evaluate_result.evaluation_hparams(hp, "/ck/abc", 30, True, head_lr=0.3, encoder_lr=0.01)
    assert tuned["classifier"]["learning_rates"] == [0.3] and tuned["classifier"]["encoder_lr"] == 0.01
    with pytest.raises(evaluate_result.EvaluationError, match="--fine-tune"):
        evaluate_result.evaluation_hparams(hp, "/ck/abc", 30, head_lr=0.3)
    with pytest.raises(evaluate_result.EvaluationError, match="epochs must be >= 1"):
        evaluate_result.evaluation_hparams(hp, "/ck/abc", 0)


def test_fine_tune_needs_one_learning_rate_and_an_encoder_lr():
    base = {"training_mode": "FINE_TUNE", "pretrained_checkpoint": "/ck"}
    with pytest.raises(ConfigError, match="classifier.learning_rates.*exactly one learning rate"):
        parse_settings({**base, "classifier": {"learning_rates": [0.1, 0.2], "encoder_lr": 0.01}})
    with pytest.raises(ConfigError, match="classifier.encoder_lr.*> 0"):
        parse_settings({**base, "classifier": {"learning_rates": [0.1]}})
    settings = parse_settings({**base, "classifier": {"learning_rates": [0.1], "encoder_lr": 0.01}})
    assert settings.classifier.encoder_lr == 0.01


# ------------------------------------------------------------------ the cluster path (real SDK, stand-in master)
@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """The stand-in master (tests/fake_master.py) holding experiment 1 (local-digits.yaml as
    submitted) with one trial and checkpoints at steps 10 (validation 0.9), 20 (0.95, best) and 30
    (0.93, final); the real SDK logs in with DET_USER/DET_PASS and a private token store."""
    import fake_master

    monkeypatch.setenv("DET_USER", "determined")
    monkeypatch.setenv("DET_PASS", "StandIn-Pass1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "det-config"))
    with fake_master.stand_in_master(str(tmp_path / "shared_fs")) as master:
        with open(DEFAULT_CONFIG) as handle:
            submitted = handle.read()
        experiment_id = master.add_experiment(yaml.safe_load(submitted), [], submitted)
        trial_id = master.new_trial(experiment_id)
        for steps, accuracy in ((10, 0.9), (20, 0.95), (30, 0.93)):
            master.record_checkpoint(trial_id, f"ckpt-{steps}-uuid", steps, {"validation_accuracy": accuracy})
        yield master
        assert master.unanswered == [] and master.errors == []


def _run(argv, master, capsys):
    """evaluate_result.main; with a stand-in ``master``, pointed at it."""
    extra = ["--master", master.url, "--model-dir", ROOT] if master is not None else []
    code = evaluate_result.main(argv + extra)
    out, err = capsys.readouterr()
    return code, out, err


def _created(master, experiment_id):
    return yaml.safe_load(master.experiments[experiment_id]["original"])


def test_cluster_path_creates_the_classifier_experiment_of_the_final_checkpoint(cluster, capsys):
    code, out, err = _run(["--experiment-id", "1", "--classifier-train-epochs", "80"], cluster, capsys)
    assert code == 0, err
    assert out.strip() == "2" and "its final checkpoint" in err
    config = _created(cluster, 2)
    hp = config["hyperparameters"]
    assert hp["training_mode"] == "CLASSIFIER_ONLY" and hp["pretrained_checkpoint"] == "ckpt-30-uuid"
    assert hp["train_length"] == {"epochs": 80} and hp["validation_period"] == {"epochs": 20}
    assert config["searcher"] == {"name": "single", "metric": "validation_accuracy", "smaller_is_better": False}
    assert config["name"] == "byol-local-digits-linear-eval-ckpt-30-"
    assert config["data"] == _pretraining_hparams()["data"] and config["entrypoint"].startswith("python3 model_def.py")
    # The submitted config, not the master's expansion (no checkpoint_storage or other defaults).
    assert set(config) == set(_pretraining_hparams())
    import io
    import tarfile

    names = tarfile.open(fileobj=io.BytesIO(cluster.experiments[2]["tgz"])).getnames()
    assert "model_def.py" in names and not [n for n in names if n.startswith(".venv")]
    import determined_schema as schema

    assert schema.project_rule_errors(config) == []
    schema_dir = schema.find_schema_dir()
    if schema_dir is not None:
        assert schema.config_errors(config, schema_dir) == []
        assert schema.completeness_errors(config, schema_dir) == []


def test_cluster_path_best_and_chosen_checkpoint(cluster, capsys):
    code, out, err = _run(["--experiment-id", "1", "--best"], cluster, capsys)
    assert code == 0, err
    assert _created(cluster, 2)["hyperparameters"]["pretrained_checkpoint"] == "ckpt-20-uuid"
    code, out, err = _run(["--experiment-id", "1", "--checkpoint-uuid", "ckpt-10-uuid"], cluster, capsys)
    assert code == 0, err
    assert _created(cluster, 3)["hyperparameters"]["pretrained_checkpoint"] == "ckpt-10-uuid"


def test_cluster_path_fine_tune(cluster, capsys):
    code, out, err = _run(["--experiment-id", "1", "--fine-tune", "--encoder-lr", "0.01",
                           "--classifier-train-epochs", "5"], cluster, capsys)
    assert code == 0, err
    config = _created(cluster, 2)
    hp = config["hyperparameters"]
    assert hp["training_mode"] == "FINE_TUNE" and hp["classifier"]["encoder_lr"] == 0.01
    assert hp["classifier"]["learning_rates"] == [0.05]
    assert config["name"].endswith("fine-tune-ckpt-30-")


@pytest.mark.parametrize("argv, message", [
    (["--experiment-id", "8"], "experiment 8 was not found"),
    (["--experiment-id", "1", "--checkpoint-uuid", "nope"], "checkpoint nope was not found"),
    (["--experiment-id", "3"], r"experiment 3 \(state ACTIVE\) has no completed checkpoint"),
    (["--experiment-id", "4"], "written in CLASSIFIER_ONLY mode.*SELF_SUPERVISED.*0123-source"),
])
def test_cluster_path_errors(cluster, argv, message, capsys):
    import re

    config = _pretraining_hparams()
    cluster.new_trial(cluster.add_experiment(config, [], yaml.safe_dump(config)))  # 2: another experiment
    cluster.new_trial(cluster.add_experiment(config, [], yaml.safe_dump(config)))  # 3: no checkpoint yet
    config["hyperparameters"].update(training_mode="CLASSIFIER_ONLY", pretrained_checkpoint="0123-source")
    trial = cluster.new_trial(cluster.add_experiment(config, [], yaml.safe_dump(config)))  # 4: a classifier run
    cluster.record_checkpoint(trial, "classifier-uuid", 5, {"validation_accuracy": 0.5})
    count = len(cluster.experiments)
    code, out, err = _run(argv, cluster, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and re.search(message, err), err
    assert len(cluster.experiments) == count  # nothing created


def test_cluster_path_checkpoint_of_another_experiment(cluster, capsys):
    config = _pretraining_hparams()
    trial = cluster.new_trial(cluster.add_experiment(config, [], yaml.safe_dump(config)))
    cluster.record_checkpoint(trial, "other-uuid", 5, {"validation_accuracy": 0.5})
    code, out, err = _run(["--experiment-id", "1", "--checkpoint-uuid", "other-uuid"], cluster, capsys)
    assert code == 2 and "belongs to experiment 2, not 1: pass --experiment-id 2" in err


def test_cluster_path_rejects_local_only_options(capsys):
    with pytest.raises(SystemExit):
        evaluate_result.main(["--experiment-id", "7", "--export-encoder", "x.pt"])
    assert "need --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_result.main(["--checkpoint", "dir", "--best"])
    assert "choose a checkpoint of --experiment-id" in capsys.readouterr().err


# ------------------------------------------------------------------ export and checkpoint checks
def _fake_checkpoint(directory, backbone, written_as=None, mode="SELF_SUPERVISED"):
    """A checkpoint directory in the harness's format holding a BYOL learner's online encoder."""
    torch.manual_seed(1)
    net = backbones.build_backbone(backbone)
    state = {f"online_encoder.net.{k}": v for k, v in net.state_dict().items()}
    state.update({f"target_encoder.net.{k}": torch.zeros_like(v) for k, v in net.state_dict().items()})
    os.makedirs(directory, exist_ok=True)
    torch.save({"models_state_dict": [state]}, os.path.join(directory, checkpoints.STATE_FILE))
    hparams = {"backbone": written_as or backbone, "training_mode": mode}
    with open(os.path.join(directory, "load_data.json"), "w") as handle:
        json.dump({"hparams": hparams, "experiment_config": {"hyperparameters": hparams}}, handle)
    checkpoints.write_complete_marker(str(directory), 0)  # complete, as a run writes it
    return net


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_export_of_torchvision_resnets_loads_strictly_into_torchvision_and_timm(tmp_path, capsys, name):
    import timm

    net = _fake_checkpoint(tmp_path / "ck", name)
    out = tmp_path / "export" / "encoder.pt"
    code, printed, err = _run(["--checkpoint", str(tmp_path / "ck"), "--export-encoder", str(out)], None, capsys)
    assert code == 0, err
    assert "fc.* are zeros" in printed and str(tmp_path / "export" / "encoder.json") in printed
    state = torch.load(out, weights_only=True)
    for model in (getattr(torchvision.models, name)(), timm.create_model(name, pretrained=False)):
        model.load_state_dict(state, strict=True)
        assert torch.equal(model.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
        assert not model.fc.weight.any() and not model.fc.bias.any()
    # ... and into our backbone through its weights loader (which drops fc).
    backbones.build_backbone(name, str(out))
    metadata = json.loads((tmp_path / "export" / "encoder.json").read_text())
    assert metadata["backbone"] == name and metadata["input_size"] == [3, 32, 32]
    assert metadata["source_checkpoint"] == str(tmp_path / "ck") and metadata["source_step"] == 0
    assert metadata["loads_into"]["timm"] == f"timm.create_model('{name}')" and metadata["format"] == "pt"
    card = (tmp_path / "export" / "encoder.md").read_text()
    assert f"# BYOL encoder: {name}" in card and "are zeros" in card and str(tmp_path / "ck") in card


@pytest.mark.parametrize("name", ["small_cnn", "resnet18_cifar", "resnet50_cifar"])
def test_export_of_our_architectures_loads_into_build_backbone_only(tmp_path, name):
    net = _fake_checkpoint(tmp_path / "ck", name)
    out = tmp_path / "encoder.pt"
    state = evaluate_result.export_encoder(str(tmp_path / "ck"), str(out))
    assert "fc.weight" not in state
    rebuilt = backbones.build_backbone(name)
    rebuilt.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))
    with pytest.raises(RuntimeError):
        torchvision.models.resnet18().load_state_dict(torch.load(out, weights_only=True), strict=True)
    metadata = json.loads((tmp_path / "encoder.json").read_text())
    assert set(metadata["loads_into"]) == {"byol"} and not metadata["zero_classifier"]


@pytest.mark.parametrize("argv_format", [[], ["--format", "safetensors"]])
def test_export_as_safetensors_carries_its_metadata(tmp_path, capsys, argv_format):
    from safetensors import safe_open
    from safetensors.torch import load_file

    net = _fake_checkpoint(tmp_path / "ck", "resnet18")
    out = tmp_path / ("encoder.safetensors" if not argv_format else "encoder.bin")
    code, _, err = _run(["--checkpoint", str(tmp_path / "ck"), "--export-encoder", str(out), *argv_format],
                        None, capsys)
    assert code == 0, err
    model = torchvision.models.resnet18()
    model.load_state_dict(load_file(str(out)), strict=True)
    assert torch.equal(model.conv1.weight, net.conv1.weight)
    with safe_open(str(out), framework="pt") as handle:
        header = handle.metadata()
    assert header["backbone"] == "resnet18" and header["format"] == "safetensors"
    assert json.loads(header["input_size"]) == [3, 32, 32] and header["source_checkpoint"] == str(tmp_path / "ck")


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "ck", "small_cnn", written_as="resnet18")
    code, out, err = _run(["--checkpoint", str(tmp_path / "ck"), "--export-encoder", str(tmp_path / "x.pt")],
                          None, capsys)
    assert code == 2
    assert "does not fit backbone 'resnet18'" in err and "missing" in err
    assert not (tmp_path / "x.pt").exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(["--checkpoint", str(tmp_path / "missing")], None, capsys)
    assert code == 2 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["--checkpoint", str(tmp_path / "empty")], None, capsys)
    assert code == 2 and "not a checkpoint of this project" in err


def test_local_path_rejects_a_classifier_checkpoint_before_any_work(tmp_path, capsys):
    _fake_checkpoint(tmp_path / "ck", "small_cnn", mode="CLASSIFIER_ONLY")
    code, _, err = _run(["--checkpoint", str(tmp_path / "ck")], None, capsys)
    assert code == 2 and "written in CLASSIFIER_ONLY mode" in err


# ------------------------------------------------------------------ end to end on digits
def _tiny_config(tmp_path):
    config = _pretraining_hparams()
    hp = config["hyperparameters"]
    hp.update({"image_size": 16, "global_batch_size": 32, "projection_size": 32, "projection_hidden_size": 64,
               "train_length": {"batches": 4}, "validation_period": {"batches": 4},
               "checkpoint_period": {"batches": 4}, "compare_random_init": False, "warmup_epochs": 0})
    hp["classifier"].update({"train_epochs": 2, "batch_size": 64, "learning_rates": [0.4, 0.1], "knn_k": K})
    config["data"].update({"num_workers": 0, "validation_size": 100, "root": str(tmp_path / "data")})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _checkpoints_in(directory):
    return sorted(p for p in directory.iterdir() if (p / checkpoints.STATE_FILE).is_file() and not p.is_symlink())


def _evaluate(checkpoint, work, name, *extra, processes=1):
    """Runs the linear protocol for 1 epoch in this process or under torchrun; returns its metrics."""
    (work / "cwd").mkdir(exist_ok=True)
    argv = ["--checkpoint", str(checkpoint), "--classifier-train-epochs", "1", "--checkpoint-dir",
            str(work / name), "--metrics-out", str(work / f"{name}.json"), *extra]
    if processes == 1:
        cwd = os.getcwd()
        os.chdir(work / "cwd")
        try:
            assert evaluate_result.main(argv) == 0
        finally:
            os.chdir(cwd)
    else:
        env = {**os.environ, "USE_TORCH_DISTRIBUTED": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 str(processes), os.path.join(ROOT, "evaluate_result.py"), *argv],
                                cwd=work / "cwd", env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"{processes} process(es)" in result.stdout
    return json.loads((work / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 4-batch BYOL run on digits with kNN validation: (checkpoint dir, metrics, work dir)."""
    import model_def

    work = tmp_path_factory.mktemp("byol")
    (work / "cwd").mkdir()
    cwd = os.getcwd()
    os.chdir(work / "cwd")  # local mode copies the working directory into checkpoints, writes ./runs
    try:
        code = model_def.main(["--config", str(_tiny_config(work)), "--checkpoint-dir", str(work / "pretrain"),
                            "--metrics-out", str(work / "pretrain.json")])
    finally:
        os.chdir(cwd)
    assert code == 0
    (checkpoint,) = _checkpoints_in(work / "pretrain")
    return checkpoint, json.loads((work / "pretrain.json").read_text()), work


@pytest.fixture(scope="module")
def linear_eval(pretrained):
    """The linear protocol (1 epoch) on the pretraining checkpoint, in this process."""
    checkpoint, _, work = pretrained
    return _evaluate(checkpoint, work, "linear"), work


def _encoder(directory):
    return checkpoints.encoder_state(checkpoints.read_checkpoint(str(directory)), str(directory))


@pytest.mark.slow
def test_pretraining_reports_knn_accuracy_and_draws_curves(pretrained):
    checkpoint, metrics, work = pretrained
    assert 0.0 < metrics["knn_accuracy"] <= 1.0
    assert (work / "pretrain.png").stat().st_size > 10_000
    # The kNN accuracy equals that computed independently from the checkpoint's features.
    content = feature_probes.extract_feature_file(str(checkpoint), str(work / "features.pt"), batch_size=64)
    train, test = content["splits"]["cls_train"], content["splits"]["test"]
    independent = knn.knn_accuracy(train["features"], train["labels"], test["features"], test["labels"], K, 10)
    assert metrics["knn_accuracy"] == pytest.approx(independent, abs=1.5 / len(test["labels"]))


@pytest.mark.slow
def test_knn_accuracy_exact_on_two_processes(tmp_path):
    """Each rank classifies its TEST shard against the CLS_TRAIN bank gathered from both ranks:
    the reported accuracy is that of the whole TEST set, as one process computes it."""
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, "USE_TORCH_DISTRIBUTED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "model_def.py"), "--config", str(_tiny_config(tmp_path)), "--set",
         "classifier_validation=false", "--checkpoint-dir", str(tmp_path / "ck"), "--metrics-out",
         str(tmp_path / "m.json")], cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert "test_accuracy" not in metrics  # no probe heads: the kNN read-out alone
    (checkpoint,) = _checkpoints_in(tmp_path / "ck")
    content = feature_probes.extract_feature_file(str(checkpoint), str(tmp_path / "f.pt"), batch_size=64)
    train, test = content["splits"]["cls_train"], content["splits"]["test"]
    independent = knn.knn_accuracy(train["features"], train["labels"], test["features"], test["labels"], K, 10)
    assert metrics["knn_accuracy"] == pytest.approx(independent, abs=1.5 / len(test["labels"]))


@pytest.mark.slow
def test_linear_protocol_from_a_local_checkpoint(pretrained, linear_eval):
    checkpoint, _, _ = pretrained
    metrics, work = linear_eval
    assert metrics["best_classifier_lr"] in (0.4, 0.1)
    assert metrics["validation_accuracy"] == metrics[f"validation_accuracy_lr{metrics['best_classifier_lr']:g}"]
    assert 0.1 < metrics["test_accuracy"] <= metrics["test_top5_accuracy"] <= 1.0
    assert metrics["global_step"] == 1338 // 64  # one epoch of CLS_TRAIN (1438 - 100 images)
    assert (work / "linear.png").is_file()
    final = max(_checkpoints_in(work / "linear"),
                key=lambda p: json.loads((p / "metadata.json").read_text())["steps_completed"])
    saved = json.loads((final / "load_data.json").read_text())["hparams"]
    assert saved["training_mode"] == "CLASSIFIER_ONLY" and saved["pretrained_checkpoint"] == str(checkpoint)
    # Frozen: every encoder tensor (batch-norm statistics included) is the pretrained one.
    before, after = _encoder(checkpoint), _encoder(final)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
@pytest.mark.parametrize("augmentation", ["none", "crop_flip", "variant"])
def test_linear_protocol_same_on_two_processes(pretrained, linear_eval, tmp_path, augmentation):
    """Heads see the same global batches, crops and flips (per-sample seeds) and photometric views
    (drawn per global batch) on 1 and 2 processes."""
    checkpoint, _, _ = pretrained
    option = ("--set", f"classifier.augmentation={augmentation}")
    one = linear_eval[0] if augmentation == "none" else _evaluate(checkpoint, tmp_path, "one", *option)
    two = _evaluate(checkpoint, tmp_path, "two", *option, processes=2)
    compared = [key for key in one if "accuracy" in key or key in ("best_classifier_lr", "global_step")]
    assert len(compared) >= 8
    assert {key: two[key] for key in compared} == {key: one[key] for key in compared}


@pytest.mark.slow
def test_fine_tune_trains_the_encoder(pretrained, tmp_path, capsys, monkeypatch):
    checkpoint, _, _ = pretrained
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code = evaluate_result.main(["--checkpoint", str(checkpoint), "--fine-tune", "--encoder-lr", "0.05",
                                 "--classifier-train-epochs", "1", "--checkpoint-dir", str(tmp_path / "ck"),
                                 "--set", "classifier.label_fraction=0.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert "FINE_TUNE" in out and "fine-tuned encoder (encoder lr 0.05, head lr 0.1)" in out
    (final,) = [p for p in _checkpoints_in(tmp_path / "ck")]
    assert json.loads((final / "load_data.json").read_text())["hparams"]["training_mode"] == "FINE_TUNE"
    before, after = _encoder(checkpoint), _encoder(final)
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])


@pytest.mark.slow
def test_evaluating_a_classifier_checkpoint_is_refused(linear_eval, capsys):
    _, work = linear_eval
    classifier_checkpoint = _checkpoints_in(work / "linear")[0]
    code = evaluate_result.main(["--checkpoint", str(classifier_checkpoint), "--classifier-train-epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "written in CLASSIFIER_ONLY mode" in err and "SELF_SUPERVISED" in err


@pytest.mark.slow
def test_features_probe_and_export_commands(pretrained, tmp_path, capsys):
    checkpoint, _, _ = pretrained
    code = evaluate_result.main(["features", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "f.pt")])
    out = capsys.readouterr().out
    assert code == 0 and "cls_train (1338, 256)" in out and "test (359, 256)" in out
    code = evaluate_result.main(["probe", "--features", str(tmp_path / "f.pt"), "--k", "10"])
    out = capsys.readouterr().out
    assert code == 0 and "pca256_pixels" in out
    code = evaluate_result.main(["--checkpoint", str(checkpoint), "--export-encoder", str(tmp_path / "e.pt")])
    assert code == 0
    net = backbones.build_backbone("small_cnn")
    net.load_state_dict(torch.load(tmp_path / "e.pt", weights_only=True), strict=True)
    assert torch.equal(net.state_dict()["features.0.weight"], _encoder(checkpoint)["features.0.weight"])


def test_fine_tune_defaults_follow_the_semi_supervised_protocol(monkeypatch, tmp_path):
    """No learning rate given: one run per rate of the paper's grid, the best on CLS_VALIDATION is
    reported (TEST never chooses); 30 epochs on 1% of the labels, 50 otherwise, 80 for linear."""
    assert evaluate_result.default_epochs(False, None) == 80
    assert evaluate_result.default_epochs(True, 0.01) == 30 and evaluate_result.default_epochs(True, 0.1) == 50
    calls = []
    validation = {0.01: 0.5, 0.02: 0.7, 0.05: 0.7, 0.1: 0.6, 0.005: 0.1}

    def fake(directory, hparams, config, epochs, fine_tune, head_lr, encoder_lr, sets=(), output_dir=None, **_):
        calls.append((epochs, head_lr, encoder_lr))
        assert output_dir.endswith(f"evaluations/fine-tune-lr{head_lr:g}-step-000007")
        return {"validation_accuracy": validation[head_lr], "test_accuracy": 1.0 - validation[head_lr]}

    monkeypatch.setattr(evaluate_result, "_evaluate_once", fake)
    monkeypatch.setattr(evaluate_result, "checkpoint_config", lambda d: (_pretraining_hparams()["hyperparameters"], {}))
    monkeypatch.setattr(evaluate_result.checkpoints, "verify_checkpoint",
                        lambda d, what="checkpoint": {"global_step": 7})
    best = evaluate_result.evaluate_checkpoint(str(tmp_path), fine_tune=True, sets=["classifier.label_fraction=0.01"],
                                               metrics_out=str(tmp_path / "m.json"))
    assert [lr for _, lr, _ in calls] == list(evaluate_result.FINE_TUNE_LEARNING_RATES)
    assert all(epochs == 30 and head == enc for epochs, head, enc in calls)
    assert best["fine_tune_lr"] == 0.02 and best["test_accuracy"] == pytest.approx(0.3)
    assert json.loads((tmp_path / "m.json").read_text())["fine_tune_lr"] == 0.02


@pytest.mark.slow
def test_interrupted_evaluation_resumes_exactly(pretrained, tmp_path, capsys, monkeypatch):
    """An evaluation that stopped after its epoch-2 checkpoint continues with --resume and ends with
    the heads (and their optimiser state) of the evaluation that never stopped; the same command
    without --resume refuses to mix a new evaluation into the folder."""
    import shutil

    from run_helpers import assert_identical, load, training_state

    checkpoint, _, _ = pretrained
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    argv = ["--checkpoint", str(checkpoint), "--classifier-train-epochs", "4", "--output-dir", str(tmp_path / "eval")]
    assert evaluate_result.main(argv) == 0
    storage = str(tmp_path / "eval" / "checkpoints")
    found = checkpoints.complete_checkpoints(storage)
    steps = [step for step, _ in found]
    assert len(steps) == 4 and "CLS_TRAIN features" in capsys.readouterr().err  # cached once: no augmentation
    straight = training_state(load(found[-1][1]))
    for _, path in found[2:]:  # as if stopped after the second epoch's checkpoint
        shutil.rmtree(path)
    for name in ("latest", checkpoints.step_alias(steps[2]), checkpoints.step_alias(steps[3])):
        os.remove(os.path.join(storage, name))
    assert evaluate_result.main(argv) == 2
    assert "already holds the checkpoints of an evaluation" in capsys.readouterr().err
    assert evaluate_result.main(argv + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert f"continuing from {found[1][1]}" in out
    resumed = checkpoints.complete_checkpoints(storage)
    assert [step for step, _ in resumed] == steps
    assert_identical(training_state(load(resumed[-1][1])), straight, "final evaluation checkpoint")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["global_step"] == steps[-1]


def test_resume_without_an_evaluation_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(evaluate_result.EvaluationError, match="no complete evaluation checkpoint"):
        evaluate_result.resume_point(str(tmp_path), resume=True)
    assert evaluate_result.resume_point(str(tmp_path), resume=False) is None
