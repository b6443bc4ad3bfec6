"""Evaluating a BYOL result: the linear protocol, fine-tuning, feature probes and export.

Linear evaluation (Grill et al. 2020, arXiv 2006.07733, section 4.1 and appendix C.1): linear
heads, one per learning rate, are trained on the frozen encoder of a BYOL checkpoint (SGD with
Nesterov momentum 0.9, cosine schedule, optional logit clipping / regularisation, the
``classifier.augmentation`` of choice); the head best on CLS_VALIDATION is reported on TEST,
top-1 and top-5. Fine-tuning follows the paper's semi-supervised protocol (appendix C.2 of arXiv
v3, after SimCLR): encoder and one head trained together on a labelled subset of CLS_TRAIN
(``--set classifier.label_list=FILE``, a file naming the images as SimCLR's 1% / 10% lists, or
``--set classifier.label_fraction=0.01``, a seeded fraction of each class), 30 epochs for 1% and 50
otherwise unless ``--classifier-train-epochs`` says, one run per learning rate of the paper's grid
(0.01, 0.02, 0.05, 0.1, 0.005, the same rate for encoder and head) unless ``--head-lr`` /
``--encoder-lr`` fix one; the run best on CLS_VALIDATION is reported on TEST.

    python evaluate_result.py --experiment-id N [--checkpoint-uuid UUID | --best]
            [--classifier-train-epochs 80] [--fine-tune]
        On a Determined cluster (Determined SDK; DET_MASTER or --master, `det user login` or
        DET_USER/DET_PASS): the experiment's final checkpoint (or the given one, or with --best the
        best by its searcher metric), evaluated by a new experiment (the submitted configuration,
        CLASSIFIER_ONLY or FINE_TUNE, validation every quarter or --validate-every N epochs). Prints
        the new experiment's id.
    python evaluate_result.py --checkpoint DIR [--classifier-train-epochs 80] [--fine-tune
            [--encoder-lr X] [--head-lr Y]] [--validate-every N] [--output-dir OUT] [--resume] [--set K=V]
        The same locally from a checkpoint directory (a local run's, an alias such as
        .../checkpoints/latest, or one fetched with ``det checkpoint download``); also under
        ``USE_TORCH_DISTRIBUTED=1 torchrun``. Written under the run's folder
        (``evaluations/linear-step-NNNNNN``); ``--resume`` continues an interrupted evaluation. Without
        augmentation the heads train on features extracted once (model_def.HeadsTrial).
    python evaluate_result.py --checkpoint DIR --export-encoder OUT.pt|OUT.safetensors
        The encoder as a plain ``state_dict`` with its metadata and model card (see ``export_encoder``
        for what loads it where).
    python evaluate_result.py features --checkpoint DIR --out FEATURES.pt
    python evaluate_result.py probe --features FEATURES.pt [--k 20]
        Fast iteration (``runtime/feature_probes.py``): frozen features of the classifier splits, then a weighted
        cosine kNN (``runtime/knn.py``) and logistic regression, beside the same probes on PCA of pixels.
"""
from __future__ import annotations

import sys

from runtime import cli

if __name__ == "__main__":  # the command line first: --help and usage errors answer before torch loads
    cli.parse_evaluate_args(sys.argv[1:])
    cli.announce_imports("eval")

import argparse
import contextlib
import copy
import functools
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

import backbone as backbones
import data
import model_def
from runtime import checkpoints, faults, feature_probes, launch
from runtime.checkpoints import checkpoint_config, load_encoder
from runtime.cli import FINE_TUNE_LEARNING_RATES
from runtime.faults import CheckpointWrites
from runtime.settings import PRETRAINING_ONLY_KEYS, Settings, TrainingMode, apply_overrides, parse_settings
from utils import (
    InputError,
    atomic_output,
    check_not_input,
    check_output_dir,
    check_output_file,
    run_command,
    write_bytes_atomically,
    write_json_atomically,
)

LINEAR_EPOCHS = 80


def default_epochs(fine_tune: bool, label_fraction: Optional[float]) -> int:
    """Linear protocol: 80 epochs; semi-supervised fine-tuning: 30 on 1% of the labels, else 50."""
    if not fine_tune:
        return LINEAR_EPOCHS
    return 30 if label_fraction is not None and label_fraction <= 0.01 else 50
TORCHVISION_BACKBONES = ("resnet18", "resnet50")  # the names torchvision.models has, fc replaced


class EvaluationError(InputError):
    """The experiment or checkpoint cannot be evaluated; the message says why and what to do."""


# ------------------------------------------------------------------ what is evaluated
def check_pretraining_checkpoint(hparams: Dict[str, Any], where: str) -> None:
    """Only BYOL pretraining checkpoints are evaluated (a classifier's encoder is not a new result)."""
    mode = hparams.get("training_mode", TrainingMode.SELF_SUPERVISED.value)
    if mode != TrainingMode.SELF_SUPERVISED.value:
        source = hparams.get("pretrained_checkpoint")
        raise EvaluationError(f"checkpoint {where} was written in {mode} mode; evaluation needs a BYOL pretraining "
                              f"(SELF_SUPERVISED) checkpoint" + (f", e.g. the one it started from: {source}"
                                                                  if source else ""))


def evaluation_hparams(hparams: Dict[str, Any], reference: str, epochs: int, fine_tune: bool = False,
                       head_lr: Optional[float] = None, encoder_lr: Optional[float] = None,
                       validate_every: Optional[int] = None) -> Dict[str, Any]:
    """The pretraining run's hyperparameters turned into those of its evaluation run."""
    if epochs < 1:
        raise EvaluationError(f"--classifier-train-epochs must be >= 1, got {epochs}")
    if validate_every is not None and validate_every < 1:
        raise EvaluationError(f"--validate-every must be >= 1 (epochs), got {validate_every}")
    hparams = copy.deepcopy(hparams)
    classifier = dict(hparams.get("classifier") or {})
    # backbone_weights only initialised pretraining: the encoder now comes from the checkpoint.
    # The pretraining periods count pretraining batches: evaluation runs validate (default) and
    # checkpoint every quarter of their length, and both at the end; the head reported is chosen
    # on CLS_VALIDATION at the end.
    quarter = max(1, -(-epochs // 4))
    hparams.update(pretrained_checkpoint=reference, train_length={"epochs": epochs},
                   validation_period={"epochs": validate_every or quarter}, checkpoint_period={"epochs": quarter},
                   backbone_weights=None, compare_random_init=False)
    # What only pretraining reads (its optimiser, EMA, projector; the kNN read-out) does nothing in a
    # heads run, which would refuse or list it (settings.check_mode_keys, mode_notes).
    for key in PRETRAINING_ONLY_KEYS:
        hparams.pop(key, None)
    classifier.pop("knn_k", None)
    if fine_tune:
        rates = classifier.get("learning_rates") or [0.1]
        head = head_lr if head_lr is not None else min(rates)  # the most conservative configured rate
        configured = classifier.get("encoder_lr") or 0.0
        classifier.update(learning_rates=[head],
                          encoder_lr=encoder_lr if encoder_lr is not None else (configured or head))
        hparams["training_mode"] = TrainingMode.FINE_TUNE.value
    else:
        if head_lr is not None or encoder_lr is not None:
            raise EvaluationError("--head-lr and --encoder-lr apply to --fine-tune; the linear protocol trains one "
                                  "head per hyperparameters.classifier.learning_rates")
        hparams["training_mode"] = TrainingMode.CLASSIFIER_ONLY.value
    hparams["classifier"] = classifier
    return hparams


# ------------------------------------------------------------------ encoders
EXPORT_FORMATS = cli.EXPORT_FORMATS
# timm's ResNets name their tensors as torchvision's (conv1, bn1, layer1..4, fc): the same export loads.
TIMM_MODELS = {"resnet18": "resnet18", "resnet50": "resnet50"}


def export_format_of(out: str, export_format: Optional[str] = None) -> str:
    """``--format``, else from the file name (``.safetensors``), else ``pt``."""
    return export_format or ("safetensors" if out.endswith(".safetensors") else "pt")


def export_encoder(directory: str, out: str, backbone_name: Optional[str] = None,
                   export_format: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Writes the checkpoint's encoder (any mode) as a plain ``state_dict`` to ``out`` (``torch.save``,
    or safetensors with the metadata in its header), its metadata beside it (``OUT.json``: backbone,
    input size, mean/std, source checkpoint and step, where it loads) and a short model card
    (``OUT.md``).

    * ``resnet18`` / ``resnet50``: loads with ``strict=True`` into ``torchvision.models.<name>()`` and
      ``timm.create_model("<name>")``. Our backbone has no classifier (``fc`` is an Identity), so the
      export adds ``fc.weight`` / ``fc.bias`` for 1000 classes **set to zero**: they make strict
      loading possible and are visibly untrained (every logit 0), never a fake classifier. Replace
      or train ``fc`` before using the model's outputs; everything else is the BYOL encoder.
    * ``resnet18_cifar``, ``resnet50_cifar`` (3x3 stride-1 stem, no max-pool) and ``small_cnn`` are
      neither torchvision nor timm architectures (timm's ResNet stems are 7x7 or three 3x3 convs,
      always with a max-pool): they load only into ``backbone.build_backbone(name)``, strictly, or
      through ``hyperparameters.backbone_weights`` of a new run.
    The claim is checked by loading the export before it is written.
    """
    check_not_input(out, "--export-encoder", {"the checkpoint read (--checkpoint)": directory})  # first: nothing made
    check_output_file(out, "--export-encoder")
    export_format = export_format_of(out, export_format)
    directory = os.path.realpath(directory)  # an alias names its UUID folder
    checkpoints.verify_checkpoint(directory, "--checkpoint")  # complete and unchanged, before anything else
    hparams, config = checkpoint_config(directory)
    backbone_name = backbone_name or hparams.get("backbone", Settings().backbone)
    state = load_encoder(directory, backbone_name).state_dict()  # verified against its marker first
    if backbone_name in TORCHVISION_BACKBONES:
        import torchvision

        target = getattr(torchvision.models, backbone_name)(weights=None)
        state["fc.weight"] = torch.zeros_like(target.fc.weight)
        state["fc.bias"] = torch.zeros_like(target.fc.bias)
    else:
        target = backbones.build_backbone(backbone_name)
    target.load_state_dict(state, strict=True)
    metadata = export_metadata(directory, hparams, config, backbone_name, state, export_format)
    stem = os.path.splitext(out)[0]
    kept = f"the encoder is still in checkpoint {directory!r}"
    if export_format == "safetensors":
        from safetensors.torch import save  # the optional export format only

        header = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
        write_bytes_atomically(out, save({k: v.contiguous() for k, v in state.items()}, metadata=header),
                               "--export-encoder", kept)
    else:
        with atomic_output(out, "--export-encoder", kept) as stream:
            torch.save(state, stream)
    write_json_atomically(stem + ".json", metadata, "the export's metadata", kept)
    write_bytes_atomically(stem + ".md", model_card(metadata, os.path.basename(out)).encode("utf-8"),
                           "the export's model card", kept)
    return state


def export_metadata(directory: str, hparams: Dict[str, Any], config: Dict[str, Any], backbone_name: str,
                    state: Dict[str, torch.Tensor], export_format: str) -> Dict[str, Any]:
    """What a user of the exported weights needs: architecture, input, normalisation, provenance."""
    marker = checkpoints.verify_checkpoint(directory)
    dataset = (hparams.get("data") or config.get("data") or {}).get("dataset", "unknown")
    try:
        info = data.dataset_info(dataset)
        mean, std = list(info.mean), list(info.std)
    except (ValueError, FileNotFoundError):
        mean = std = None
    image_size = int(hparams.get("image_size", Settings().image_size))
    loads_into = {"byol": f"backbone.build_backbone({backbone_name!r})"}
    if backbone_name in TORCHVISION_BACKBONES:
        loads_into.update(torchvision=f"torchvision.models.{backbone_name}()",
                          timm=f"timm.create_model({TIMM_MODELS[backbone_name]!r})")
    return {"format": export_format, "backbone": backbone_name, "feature_size": backbones.feature_size(backbone_name),
            "input_size": [3, image_size, image_size], "input_range": "RGB in [0, 1], then (x - mean) / std",
            "mean": mean, "std": std, "dataset": dataset, "source_checkpoint": directory,
            "source_step": int(marker.get("global_step", 0)), "training_mode": hparams.get("training_mode"),
            "tensors": len(state), "zero_classifier": "fc.weight" in state, "loads_into": loads_into,
            "method": "BYOL, Grill et al. 2020, arXiv 2006.07733"}


def model_card(metadata: Dict[str, Any], file_name: str) -> str:
    """A short model card (markdown) for an exported encoder."""
    loads = "\n".join(f"- {where}: `{how}.load_state_dict(state, strict=True)`"
                       for where, how in metadata["loads_into"].items())
    fc = ("\n`fc.weight` / `fc.bias` are zeros: a placeholder that makes strict loading possible, not a "
          "classifier. Replace or train `fc` before using the model's outputs.\n"
          if metadata["zero_classifier"] else "")
    return (f"# BYOL encoder: {metadata['backbone']}\n\n"
            f"Self-supervised encoder ({metadata['method']}), pretrained without labels on "
            f"`{metadata['dataset']}` ({metadata['training_mode']}), exported from checkpoint "
            f"`{metadata['source_checkpoint']}` at global step {metadata['source_step']}.\n\n"
            f"- file: `{file_name}` ({metadata['format']}, {metadata['tensors']} tensors); metadata beside it "
            f"(`.json`)\n- input: {metadata['input_size']} ({metadata['input_range']}), mean {metadata['mean']}, "
            f"std {metadata['std']}\n- output: the {metadata['feature_size']}-dimensional average-pooled "
            f"representation\n\nLoads into:\n{loads}\n{fc}\n"
            f"Intended use: features for linear probes, fine-tuning or retrieval on images like the training "
            f"data. Not evaluated beyond the linear protocol of this project (`evaluate_result.py`).\n")


# ------------------------------------------------------------------ the protocol, locally
def evaluation_folder(directory: str, fine_tune: bool, lr: Optional[float] = None) -> str:
    """Where an evaluation of checkpoint ``directory`` goes by default, grouped under the run it
    evaluates: ``<run folder>/evaluations/linear-step-000200`` (``fine-tune-lr0.01-step-...``)."""
    step = int(checkpoints.verify_checkpoint(directory).get("global_step", 0))
    name = (f"fine-tune-lr{lr:g}" if fine_tune else "linear") + f"-{checkpoints.step_alias(step)}"
    return os.path.join(checkpoints.run_folder(directory), "evaluations", name)


def evaluate_checkpoint(directory: str, epochs: Optional[int] = None, fine_tune: bool = False,
                        head_lr: Optional[float] = None, encoder_lr: Optional[float] = None, sets: Sequence[str] = (),
                        checkpoint_dir: Optional[str] = None, metrics_out: Optional[str] = None,
                        output_dir: Optional[str] = None, resume: bool = False,
                        validate_every: Optional[int] = None) -> Dict[str, Any]:
    """Runs the linear protocol (or fine-tuning) on a local checkpoint; returns the final metrics.
    Fine-tuning without a given learning rate runs the paper's grid and keeps the run best on
    CLS_VALIDATION (each rate in its own folder). ``resume``: continue interrupted evaluations from
    their newest checkpoints."""
    directory = os.path.realpath(directory)  # an alias (latest) is resolved: the evaluation names the UUID folder
    checkpoints.verify_checkpoint(directory, "--checkpoint")  # complete and unchanged, before anything else
    hparams, config = checkpoint_config(directory)
    check_pretraining_checkpoint(hparams, repr(directory))
    if epochs is None:
        overridden = copy.deepcopy(hparams)
        apply_overrides(overridden, {}, sets)
        epochs = default_epochs(fine_tune, (overridden.get("classifier") or {}).get("label_fraction"))
    run = functools.partial(_evaluate_once, directory, hparams, config, epochs, sets=sets, resume=resume,
                            validate_every=validate_every)
    if not fine_tune or head_lr is not None or encoder_lr is not None:
        out = output_dir or evaluation_folder(directory, fine_tune, head_lr if head_lr is not None else encoder_lr)
        return run(fine_tune, head_lr, encoder_lr, output_dir=out, checkpoint_dir=checkpoint_dir,
                   metrics_out=metrics_out)
    results = []
    for lr in FINE_TUNE_LEARNING_RATES:  # one folder per rate, so each run's checkpoints stay apart
        out = os.path.join(output_dir, f"lr{lr:g}") if output_dir else evaluation_folder(directory, True, lr)
        metrics = run(True, lr, lr, output_dir=out,
                      checkpoint_dir=os.path.join(checkpoint_dir, f"lr{lr:g}") if checkpoint_dir else None,
                      metrics_out=None)
        results.append((metrics.get("validation_accuracy", float("-inf")), lr, metrics))
    _, lr, best = max(results, key=lambda item: item[0])  # ties: the first of the grid
    best = {**best, "fine_tune_lr": lr}
    print(f"[eval] fine-tuning grid {', '.join(f'{r:g}' for r in FINE_TUNE_LEARNING_RATES)}: lr {lr:g} chosen on "
          f"CLS_VALIDATION {best.get('validation_accuracy', float('nan')):.4f}: TEST top-1 "
          f"{best.get('test_accuracy', float('nan')):.4f}", flush=True)
    # The grid's choice beside its runs' folders.
    if not metrics_out:
        grid = os.path.basename(evaluation_folder(directory, True, lr)).replace(f"-lr{lr:g}-", "-grid-")
        metrics_out = (os.path.join(output_dir, "metrics.json") if output_dir
                       else os.path.join(checkpoints.run_folder(directory), "evaluations", grid + ".json"))
    write_json_atomically(metrics_out, best, "--metrics-out", "the results are in the lines printed above")
    print(f"[eval] grid metrics written to {os.path.abspath(metrics_out)}", flush=True)
    return best


def _evaluate_once(directory: str, hparams: Dict[str, Any], config: Dict[str, Any], epochs: int, fine_tune: bool,
                   head_lr: Optional[float], encoder_lr: Optional[float], sets: Sequence[str] = (),
                   checkpoint_dir: Optional[str] = None, metrics_out: Optional[str] = None,
                   output_dir: Optional[str] = None, resume: bool = False,
                   validate_every: Optional[int] = None) -> Dict[str, Any]:
    hparams = evaluation_hparams(hparams, directory, epochs, fine_tune, head_lr, encoder_lr, validate_every)
    data_section = dict(hparams.pop("data", None) or config.get("data") or {})
    apply_overrides(hparams, data_section, sets)
    distributed = launch.distributed_context()
    settings = parse_settings(hparams, data_section, distributed.get_size() if distributed else 1)
    load_encoder(directory, settings.backbone)  # a wrong checkpoint fails here, before any work
    output_dir = os.path.abspath(output_dir or evaluation_folder(directory, fine_tune, head_lr))
    out = os.path.abspath(checkpoint_dir or os.path.join(output_dir, "checkpoints"))
    metrics_out = metrics_out or os.path.join(output_dir, "metrics.json")
    launch.check_outputs({"--checkpoint-dir": out, "--metrics-out": metrics_out}, hparams, data_section,
                         {"the checkpoint read (--checkpoint)": directory})
    check_output_dir(out, "--checkpoint-dir")
    launch.check_not_copied_into_itself(out)
    check_output_file(metrics_out, "--metrics-out")
    latest = resume_point(out, resume)
    name = "fine-tune" if fine_tune else "linear-eval"
    exp_conf = {**config, "name": f"{config.get('name', 'byol')}-{name}", "hyperparameters": hparams,
                "data": data_section, "searcher": evaluation_searcher()}
    rank = distributed.get_rank() if distributed else 0
    if rank == 0:
        print(f"[eval] output folder {output_dir}: checkpoints in {out}, metrics {metrics_out}"
              + (f"; continuing from {latest}" if latest else ""), flush=True)
    writes = CheckpointWrites(latest, rank)
    with writes.explained():  # faults end with one clear message (faults.py)
        return launch.train_and_report(model_def.build_trial, exp_conf, settings, distributed, out, latest,
                                       time.time(), metrics_out, writes, result_line=result_line,
                                       tensorboard_dir=os.path.join(output_dir, launch.TENSORBOARD_FOLDER))


def resume_point(storage: str, resume: bool) -> Optional[str]:
    """With ``--resume``: the newest complete checkpoint of the interrupted evaluation in ``storage``.
    Without it, a folder that already holds an evaluation's checkpoints is refused (nothing is mixed
    with or written over an earlier evaluation)."""
    found = checkpoints.complete_checkpoints(storage)
    if resume:
        if not found:
            raise EvaluationError(f"--resume: there is no complete evaluation checkpoint in {storage!r} to "
                                  f"continue from; run without --resume to start the evaluation")
        return found[-1][1]
    if found:
        raise EvaluationError(f"{storage!r} already holds the checkpoints of an evaluation (newest at step "
                              f"{found[-1][0]}): continue it with --resume, or choose another --output-dir")
    return None


def result_line(settings: Settings, metrics: Dict[str, Any]) -> str:
    c = settings.classifier
    if settings.training_mode == TrainingMode.FINE_TUNE:
        how = f"fine-tuned encoder (encoder lr {c.encoder_lr:g}, head lr {c.learning_rates[0]:g})"
    else:
        how = f"frozen encoder, {len(c.learning_rates)} heads (lr {', '.join(f'{r:g}' for r in c.learning_rates)})"
    if "test_accuracy" not in metrics:
        return f"[eval] {how}: no validation result (metrics: {sorted(metrics)})"
    chosen = ("" if len(c.learning_rates) == 1 else f", head lr {metrics['best_classifier_lr']:g} chosen on")
    return (f"[eval] {how}{chosen or ','} CLS_VALIDATION {metrics['validation_accuracy']:.4f}: "
            f"TEST top-1 {metrics['test_accuracy']:.4f}, top-5 {metrics['test_top5_accuracy']:.4f}")


def evaluation_searcher() -> Dict[str, Any]:
    """Evaluation runs rank their checkpoints by CLS_VALIDATION accuracy: TEST picks nothing."""
    return {"name": "single", "metric": "validation_accuracy", "smaller_is_better": False}


# ------------------------------------------------------------------ the protocol, on a cluster
def default_client(master: Optional[str] = None):
    """The Determined SDK client (master from ``--master``, ``DET_MASTER`` or ``det`` login)."""
    from determined.common.api import errors
    from determined.experimental import client

    try:
        return client.Determined(master=master)
    except (errors.MasterNotFoundException, errors.UnauthenticatedException) as error:
        raise EvaluationError(f"cannot use the Determined master {master or '(DET_MASTER)'}: {error}; "
                              f"pass --master URL or run `det user login`") from None
    except ValueError as error:  # a malformed address (the SDK's canonicalize_master_url)
        raise EvaluationError(f"the Determined master address {master or os.environ.get('DET_MASTER')!r} is not a "
                              f"URL ({error}): give --master http://host:8080 or set DET_MASTER") from None


def experiment_checkpoint(client, experiment_id: int, checkpoint_uuid: Optional[str] = None, best: bool = False):
    """``(experiment, checkpoint)``: by default the experiment's final checkpoint (most batches
    trained); ``best``: the best by the experiment's searcher metric (which, in this project's
    configs, is measured on held-out training images, never TEST); ``checkpoint_uuid``: that one,
    which must belong to the experiment."""
    from determined.common.api import errors
    from determined.experimental import client as sdk

    try:
        experiment = client.get_experiment(experiment_id)
    except errors.NotFoundException:
        raise EvaluationError(f"experiment {experiment_id} was not found on the Determined master "
                              f"(check the id with `det experiment list`)") from None
    if checkpoint_uuid:
        try:
            checkpoint = client.get_checkpoint(checkpoint_uuid)
        except errors.NotFoundException:
            raise EvaluationError(f"checkpoint {checkpoint_uuid} was not found on the Determined master "
                                  f"(list them with `det experiment list-checkpoints {experiment_id}`)") from None
        owner = getattr(checkpoint.training, "experiment_id", None) if checkpoint.training else None
        if owner != experiment_id:
            raise EvaluationError(f"checkpoint {checkpoint_uuid} belongs to experiment {owner}, not {experiment_id}: "
                                  f"pass --experiment-id {owner}")
    else:
        if best:  # sorted by the searcher metric, best first (the SDK's default order)
            found = experiment.list_checkpoints(max_results=1)
        else:
            found = experiment.list_checkpoints(sort_by=sdk.CheckpointSortBy.BATCH_NUMBER,
                                                order_by=sdk.OrderBy.DESCENDING, max_results=1)
        if not found:
            state = (getattr(getattr(experiment, "state", None), "value", None) or "unknown").replace("STATE_", "")
            raise EvaluationError(f"experiment {experiment_id} (state {state}) has no completed checkpoint"
                                  + (" with a validation" if best else "") + " yet: wait for its first checkpoint")
        checkpoint = found[0]
    if checkpoint.training is None:
        raise EvaluationError(f"checkpoint {checkpoint.uuid} of experiment {experiment_id} has no training "
                              f"metadata (hparams): it was not written by a trial")
    return experiment, checkpoint


def submitted_config(client, experiment) -> Dict[str, Any]:
    """The experiment's config as it was submitted (``originalConfig``). The SDK's
    ``experiment.config`` is the master's expanded config, which carries fields Determined 0.38
    deprecates (``searcher.max_length``, ``min_validation_period``, ``optimizations``...) and every
    default; resubmitting the submitted one keeps the new experiment's config what a user would
    write. The SDK has no accessor for it, so it is read from the same GetExperiment answer."""
    import yaml
    from determined.common.api import bindings

    response = bindings.get_GetExperiment(client._session, experimentId=experiment.id)
    original = yaml.safe_load(response.experiment.originalConfig or "") or {}
    if not isinstance(original, dict):
        raise EvaluationError(f"experiment {experiment.id}'s submitted config is not a mapping")
    return original


def evaluate_experiment(client, experiment_id: int, epochs: int, fine_tune: bool = False,
                        head_lr: Optional[float] = None, encoder_lr: Optional[float] = None,
                        model_dir: Optional[str] = None, checkpoint_uuid: Optional[str] = None,
                        best: bool = False, validate_every: Optional[int] = None) -> int:
    """Creates the evaluation experiment of one of ``experiment_id``'s checkpoints (see
    :func:`experiment_checkpoint`); returns its id."""
    experiment, checkpoint = experiment_checkpoint(client, experiment_id, checkpoint_uuid, best)
    hparams = copy.deepcopy(checkpoint.training.hparams)
    check_pretraining_checkpoint(hparams, f"{checkpoint.uuid} (experiment {experiment_id})")
    hparams = evaluation_hparams(hparams, checkpoint.uuid, epochs, fine_tune, head_lr, encoder_lr, validate_every)
    config = submitted_config(client, experiment)
    data_section = hparams.get("data") or config.get("data")
    parse_settings(hparams, None if "data" in hparams else data_section,
                   int((config.get("resources") or {}).get("slots_per_trial", 1)))  # fail here, not on the cluster
    name = "fine-tune" if fine_tune else "linear-eval"
    config.update(name=f"{config.get('name', 'byol')}-{name}-{checkpoint.uuid[:8]}", hyperparameters=hparams,
                  searcher=evaluation_searcher())
    with contextlib.redirect_stdout(sys.stderr):  # the SDK's upload progress; stdout is the new id only
        created = client.create_experiment(config, model_dir or os.path.dirname(os.path.abspath(__file__)),
                                           project_id=getattr(experiment, "project_id", None))
    chosen = ("chosen by --checkpoint-uuid" if checkpoint_uuid else "best by its searcher metric" if best
              else "its final checkpoint")
    print(f"[eval] experiment {created.id} evaluates checkpoint {checkpoint.uuid} of experiment {experiment_id} "
          f"({chosen})", file=sys.stderr, flush=True)
    return created.id


# ------------------------------------------------------------------ command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The arguments (``runtime/cli.py``, which loads nothing heavy); ``command``: ``features``,
    ``probe`` or None (an evaluation protocol)."""
    return cli.parse_evaluate_args(argv)


def main(argv: Optional[Sequence[str]] = None, make_client: Callable = default_client) -> int:
    # One error path (utils.run_command): 'error: ...' on one line, exit 2 for bad input, --debug for the traceback.
    return run_command(lambda args: _main(args, make_client), argv)


@faults.process_group_torn_down()  # a multi-process run's process group, before the interpreter exits
def _main(argv: Sequence[str], make_client: Callable) -> int:
    args = parse_args(argv)
    if args.command is not None:
        return feature_probes.main(args)
    if args.experiment_id is not None:
        epochs = args.classifier_train_epochs or default_epochs(args.fine_tune, None)
        new_id = evaluate_experiment(make_client(args.master), args.experiment_id, epochs,
                                     args.fine_tune, args.head_lr, args.encoder_lr, args.model_dir,
                                     args.checkpoint_uuid, args.best, args.validate_every)
        print(new_id, flush=True)
    elif args.export_encoder:
        state = export_encoder(args.checkpoint, args.export_encoder, export_format=args.format)
        written = [args.export_encoder, *(os.path.splitext(args.export_encoder)[0] + ext for ext in (".json", ".md"))]
        print(f"[export] {len(state)} tensors -> {', '.join(os.path.abspath(p) for p in written)}" +
              (" (fc.* are zeros: a placeholder for strict loading into torchvision and timm, not a classifier)"
               if "fc.weight" in state else ""), flush=True)
    else:
        evaluate_checkpoint(args.checkpoint, args.classifier_train_epochs, args.fine_tune, args.head_lr,
                            args.encoder_lr, args.set, args.checkpoint_dir, args.metrics_out, args.output_dir,
                            args.resume, args.validate_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
