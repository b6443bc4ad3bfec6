"""The trial's parts without training: build_trial's choice of class and settings, the state
callback (save/restore only, through the trial's methods), and the linear evaluation's work around
each validation, forwarded by its callback."""
import json
import types

import pytest
import torch

import model_def
from reducers import ValidatedAccuracyReducer, WeightedMeanReducer
from runtime import checkpoints, classifier, linear_eval
from runtime.settings import TrainingMode, parse_settings

DATA = {"dataset": "digits"}


class FakeContext:
    """What build_trial and LinearEvaluation ask of a PyTorchTrialContext."""

    def __init__(self, hparams=None, size=1):
        self.distributed = types.SimpleNamespace(rank=0, size=size)
        self.hparams, self.reducers = hparams or {}, []

    def get_hparams(self):
        return dict(self.hparams)

    def get_data_config(self):
        return dict(DATA)

    def wrap_reducer(self, reducer, name=None, for_training=True, for_validation=True):
        self.reducers.append((name, type(reducer)))
        return reducer


@pytest.mark.parametrize("mode, chosen", [("SELF_SUPERVISED", "BYOLTrial"), ("CLASSIFIER_ONLY", "HeadsTrial"),
                                          ("FINE_TUNE", "HeadsTrial")])
def test_build_trial_chooses_the_class_of_the_mode(monkeypatch, mode, chosen):
    for name in ("BYOLTrial", "HeadsTrial"):
        monkeypatch.setattr(model_def, name, lambda context, settings, name=name: (name, settings))
    hparams = {"training_mode": mode, "global_batch_size": 32,
               "classifier": {"learning_rates": [0.1], "encoder_lr": 0.01}}
    if mode != "SELF_SUPERVISED":  # pretraining refuses the setting it would ignore (settings.check_mode_keys)
        hparams["pretrained_checkpoint"] = "somewhere"
    name, settings = model_def.build_trial(FakeContext(hparams, size=2))
    assert name == chosen and settings.training_mode == TrainingMode(mode)
    assert settings.sync_batch_norm  # on by default with several processes
    assert not model_def.build_trial(FakeContext(hparams, size=1))[1].sync_batch_norm
    given = parse_settings(hparams, DATA)
    assert model_def.build_trial(FakeContext({}), given) == (chosen, given)


def test_a_trial_class_refuses_another_mode():
    settings = parse_settings({"training_mode": "CLASSIFIER_ONLY", "pretrained_checkpoint": "somewhere"}, DATA)
    with pytest.raises(ValueError, match="build_trial"):
        model_def.BYOLTrial(FakeContext(), settings)
    with pytest.raises(ValueError, match="build_trial"):
        model_def.HeadsTrial(FakeContext(), parse_settings({}, DATA))
    assert model_def.BYOLTrial.pretraining and not model_def.HeadsTrial.pretraining


class FakeTrial:
    """The trial's side of TrialStateCallback."""

    def __init__(self):
        self.settings = parse_settings({}, DATA)
        self.info = types.SimpleNamespace(num_classes=10)
        self.rank, self.world_size, self.total_steps = 0, 1, 8
        self.global_step, self.restored, self.written, self.uploaded = 5, [], [], []

    def state_to_save(self):
        return {"global_step": self.global_step, "heads": {"w": torch.ones(2)}}

    def restore_state(self, state):
        self.restored.append(state)

    def checkpoint_written(self, directory):
        self.written.append(directory)

    def checkpoint_uploaded(self, uuid):
        self.uploaded.append(uuid)


def test_state_callback_saves_and_restores_through_the_trial(monkeypatch, capsys, tmp_path):
    trial = FakeTrial()
    callback = checkpoints.TrialStateCallback(trial)
    state = callback.state_dict()
    assert list(state) == ["global_step", "heads", "fingerprint"]
    assert state["fingerprint"] == checkpoints.fingerprint(trial)
    monkeypatch.setattr(checkpoints, "is_warm_start", lambda: False)
    callback.load_state_dict(state)
    assert trial.restored[-1]["global_step"] == 5 and torch.equal(trial.restored[-1]["heads"]["w"], torch.ones(2))
    monkeypatch.setattr(checkpoints, "is_warm_start", lambda: True)
    callback.load_state_dict(state)  # another trial's checkpoint: its weights, this trial's steps from 0
    assert trial.restored[-1]["global_step"] == 0
    assert "warm start" in capsys.readouterr().out

    (tmp_path / checkpoints.STATE_FILE).write_bytes(b"weights")
    callback.on_checkpoint_write_end(str(tmp_path))
    assert trial.written == [str(tmp_path)]
    assert json.loads((tmp_path / checkpoints.COMPLETE_FILE).read_text())["global_step"] == 5
    callback.on_checkpoint_upload_end("uuid-1")
    assert trial.uploaded == ["uuid-1"]


def evaluation(context, knn_k=0, classifier_validation=True, pretraining=True):
    settings = parse_settings({"classifier_validation": classifier_validation,
                               "classifier": {"learning_rates": [0.1, 0.2], "knn_k": knn_k}}, DATA)
    heads = classifier.LinearHeads(4, 3, 2)
    readout = ({"learner": torch.nn.Identity(), "heads": heads} if pretraining
               else {"model": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))})
    return linear_eval.LinearEvaluation(
        settings=settings, context=context, device=torch.device("cpu"), rank=0, world_size=1, dataset=[],
        normalize=torch.nn.Identity(), augmentations=(), num_classes=3, global_step=lambda: 7,
        seeded=None, **readout)


def test_linear_evaluation_registers_only_the_reducers_it_reports():
    context = FakeContext()
    evaluation(context, knn_k=5)
    assert context.reducers == [(None, ValidatedAccuracyReducer), ("knn_accuracy", WeightedMeanReducer)]
    context = FakeContext()
    evaluation(context, classifier_validation=False)
    assert context.reducers == [("validation_byol_loss", WeightedMeanReducer)]
    context = FakeContext()
    evaluation(context, knn_k=5, classifier_validation=False, pretraining=False)  # heads: scored, no kNN
    assert context.reducers == [(None, ValidatedAccuracyReducer)]
    with pytest.raises(ValueError, match="either"):
        linear_eval.LinearEvaluation(
            settings=parse_settings({}, DATA), context=FakeContext(), device=torch.device("cpu"), rank=0,
            world_size=1, dataset=[], normalize=None, augmentations=(), num_classes=3, global_step=lambda: 0,
            seeded=None, model=torch.nn.Identity(), learner=torch.nn.Identity())


def test_callback_forwards_validation_start_and_end(capsys):
    calls = []
    target = types.SimpleNamespace(prepare=lambda: calls.append("prepare"),
                                   finish=lambda metrics: calls.append(("finish", metrics)))
    callback = linear_eval.LinearEvaluationCallback(target)
    callback.on_validation_start()
    callback.on_validation_end({"test_accuracy": 0.5})
    assert calls == ["prepare", ("finish", {"test_accuracy": 0.5})]

    heads_evaluation = evaluation(FakeContext(), pretraining=False)
    heads_evaluation.prepare()  # outside pretraining the harness trains the heads: nothing to prepare
    heads_evaluation.knn_bank = object()
    heads_evaluation.finish({"test_accuracy": 0.25, "loss_curve": [1, 2], "knn_accuracy": 0.5})
    assert heads_evaluation.last_validation["test_accuracy"] == 0.25 and heads_evaluation.knn_bank is None
    assert "[validate] step 7: knn_accuracy 0.5000, test_accuracy 0.2500" in capsys.readouterr().out
    with pytest.raises(ValueError, match="pretraining only"):
        heads_evaluation.compare_representations()
