"""What a checkpoint holds beyond the harness's own state, and loading checkpoints safely.

The Determined harness saves the wrapped models, optimisers (LARS momentum) and its RNG states.
:class:`TrialStateCallback` adds what exact resume needs on top, the trial's own state
(``trial.state_to_save()``: the global step, which fixes the data position and every schedule, and
the linear heads), and a fingerprint of the settings that
decide tensor shapes, so that resuming from an incompatible checkpoint fails with a message naming
the setting instead of a wall of shape errors.

Checkpoints always load with ``torch.load(weights_only=True)``: loading never runs code. The only
non-tensor objects the harness stores are numpy's RNG state arrays, whose reconstruct types are
allowlisted here (never ``weights_only=False``); the harness's ``trial_state.pkl`` (read with plain
``pickle``) is checked to hold plain data before a resume.

The harness writes a checkpoint straight into its final directory. Only a checkpoint with the
``byol_complete.json`` marker counts: it is written last, after every file is flushed, and lists the
files' sizes and SHA-256, so a run that died while checkpointing (crash, kill, full disk) can never
be mistaken for a good one (:func:`verify_checkpoint`). Weights that are no longer finite are never
checkpointed (:func:`check_finite`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
from typing import Any, Dict, Optional

import numpy as np
import torch
from determined import pytorch

import backbone as backbones
from utils import InputError

STATE_FILE = "state_dict.pth"
FINGERPRINT_KEYS = ("backbone", "projection_size", "projection_hidden_size", "num_classes",
                    "classifier_heads", "training_mode")


def _numpy_state_types() -> list:
    """The numpy objects in the harness's pickled RNG state (``np.random.get_state()``)."""
    safe = [np.ndarray, np.dtype, np.core.multiarray._reconstruct]
    return safe + [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]


def has_safe_globals() -> bool:
    """torch >= 2.4 has ``torch.serialization.add_safe_globals``; the default cluster image
    (``determinedai/pytorch-ngc:0.38.1``, torch 2.3) does not."""
    return hasattr(torch.serialization, "add_safe_globals")


def allow_harness_checkpoints() -> None:
    """Allowlists numpy's array types for ``weights_only`` loading of the harness's RNG state.

    Without ``add_safe_globals`` (torch < 2.4) there is nothing to register: the harness's own
    ``torch.load`` there defaults to ``weights_only=False``, and this project's readers go through
    :func:`load_state`, which enforces the same allowlist with its own unpickler."""
    if has_safe_globals():
        torch.serialization.add_safe_globals(_numpy_state_types())


class _AllowlistUnpickler(pickle.Unpickler):
    """Resolves only what a checkpoint of this project holds: torch's tensor rebuild functions,
    dtypes and sizes, ordered dicts and numpy's RNG-state arrays. Anything else (code) is refused,
    as ``weights_only=True`` refuses it on newer torch."""

    def find_class(self, module: str, name: str):
        if (module, name) in (("collections", "OrderedDict"), ("_codecs", "encode")):  # encode: bytes in protocol 2
            return super().find_class(module, name)
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return super().find_class(module, name)
        if module == "torch":
            found = getattr(torch, name, None)
            if isinstance(found, torch.dtype) or found is torch.Size:
                return found
        if module.startswith("numpy"):
            found = super().find_class(module, name)
            if found in _numpy_state_types():
                return found
        raise pickle.UnpicklingError(f"weights-only load refused {module}.{name}")


class _AllowlistPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler is :class:`_AllowlistUnpickler`."""

    Unpickler = _AllowlistUnpickler
    load = staticmethod(lambda handle, **kwargs: _AllowlistUnpickler(handle, **kwargs).load())
    __name__ = "byol_allowlist_pickle"


def load_state(path: str, force_fallback: bool = False) -> Any:
    """``torch.load`` of a checkpoint file that never runs code: ``weights_only=True`` with the numpy
    allowlist on torch >= 2.4, or the same allowlist through :class:`_AllowlistUnpickler` on older
    torch (``force_fallback`` tests that path on any torch)."""
    if has_safe_globals() and not force_fallback:
        allow_harness_checkpoints()
        return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_AllowlistPickle)


def fingerprint(trial) -> Dict[str, Any]:
    s = trial.settings
    return {"backbone": s.backbone, "projection_size": s.projection_size,
            "projection_hidden_size": s.projection_hidden_size, "num_classes": trial.info.num_classes,
            "classifier_heads": len(s.classifier.learning_rates), "training_mode": s.training_mode.value}


class IncompatibleCheckpointError(InputError):
    """The checkpoint was written with settings that give other tensor shapes than this run's."""


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str) -> None:
    for key in FINGERPRINT_KEYS:
        if key in saved and saved[key] != current[key]:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} was written with {key}={saved[key]!r} but this run has "
                f"{key}={current[key]!r}: resume with the checkpoint's settings or start fresh")


class TrialStateCallback(pytorch.PyTorchCallback):
    """Saves and restores the trial's own state (``trial.state_to_save()`` / ``trial.restore_state``)
    with a fingerprint of its settings, checked before a checkpoint's models load; refuses to
    checkpoint non-finite weights, marks each written checkpoint complete, and tells the trial where
    its checkpoints are (``trial.checkpoint_written`` / ``trial.checkpoint_uploaded``, which checks the
    replicas). A warm start (another trial's checkpoint) restores its weights at global step 0."""

    def __init__(self, trial) -> None:
        self.trial = trial
        self.checkpoint_where = "being loaded"

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: Optional[str]) -> None:
        if checkpoint_uuid:
            self.checkpoint_where = str(checkpoint_uuid)
            if os.path.isdir(str(checkpoint_uuid)):  # local resume: the last good checkpoint until a new one
                self.trial.checkpoint_written(str(checkpoint_uuid))

    def state_dict(self) -> Dict[str, Any]:
        return {**self.trial.state_to_save(), "fingerprint": fingerprint(self.trial)}

    def on_checkpoint_load_start(self, checkpoint: Dict[str, Any]) -> None:
        # Runs before the harness loads the models: compare settings first.
        saved = checkpoint.get("callbacks", {}).get("byol_state", {})
        check_compatible(saved.get("fingerprint", {}), fingerprint(self.trial), self.checkpoint_where)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saved_step = int(state["global_step"])
        # Another trial's checkpoint (searcher.source_checkpoint_uuid / source_trial_id): its
        # weights are the starting point, but this trial trains its own full length from step 0,
        # as the master counts it (resuming at saved_step would end the data at once while the
        # harness keeps asking for batches up to its max_length).
        warm_start = saved_step > 0 and is_warm_start()
        self.trial.restore_state({**state, "global_step": 0 if warm_start else saved_step})
        if warm_start and self.trial.rank == 0:
            print(f"[byol] warm start from checkpoint {self.checkpoint_where} (trained {saved_step} steps): "
                  f"its weights, this trial's schedule from step 0", flush=True)

    def on_checkpoint_save_start(self, checkpoint: Dict[str, Any]) -> None:
        # Chief only, before anything is written: a diverged run must not replace good checkpoints.
        check_finite(checkpoint, self.trial.global_step)

    def on_checkpoint_write_end(self, checkpoint_dir: str) -> None:
        # Chief only, after the harness wrote every file: from here on the checkpoint counts.
        write_complete_marker(checkpoint_dir, self.trial.global_step,
                              {"settings": self.trial.settings.as_hparams(), "total_steps": self.trial.total_steps,
                               "processes": self.trial.world_size})
        self.trial.checkpoint_written(checkpoint_dir)
        if is_local():  # on a cluster the master names checkpoints (and the folder may be a staging one)
            aliases = write_aliases(checkpoint_dir, self.trial.global_step)
            print(f"[byol] checkpoint at step {self.trial.global_step}: {os.path.abspath(checkpoint_dir)} "
                  f"(also {', '.join(aliases)})", flush=True)

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self.trial.checkpoint_uploaded(uuid)  # every rank: records it and checks the replicas


def is_local() -> bool:
    """Off a cluster (Determined's local mode)."""
    import determined as det

    return det.get_cluster_info() is None


def is_warm_start() -> bool:
    """Whether the checkpoint being loaded starts a new trial rather than continuing this one: on a
    cluster the master hands a trial's own latest checkpoint with the steps it completed, and another
    trial's checkpoint (warm start) with ``steps_completed = 0``. Local runs only ever resume."""
    import determined as det

    info = det.get_cluster_info()
    return info is not None and info.task_type == "TRIAL" and int(info.trial._steps_completed) == 0


class NonFiniteWeightsError(FloatingPointError):
    """The weights about to be checkpointed hold NaN or infinite values."""


def check_finite(checkpoint: Dict[str, Any], step: int) -> None:
    """Raises :class:`NonFiniteWeightsError` naming the first model tensor with NaN/inf values."""
    for state in checkpoint.get("models_state_dict", []):
        for name, tensor in state.items():
            if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteWeightsError(
                    f"weights {name!r} are not finite after global step {step}: training diverged, so this "
                    f"state is not checkpointed and earlier checkpoints are kept as they are. Lower the "
                    f"learning rate (base_lr) or check the input data.")


# ----------------------------------------------------------------------------- complete checkpoints
# The harness writes a checkpoint's files straight into its final directory, so a run that dies while
# checkpointing (crash, kill, full disk) leaves a directory that looks like a checkpoint. This file is
# written last, after everything else is flushed to disk, and lists each file's size and SHA-256:
# a checkpoint counts only with it, and only while its files still match it.
COMPLETE_FILE = "byol_complete.json"
_HASHED_FILES = (STATE_FILE, "trial_state.pkl", "load_data.json")


class IncompleteCheckpointError(InputError):
    """A checkpoint directory that was never completely written, or was changed since."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_complete_marker(directory: str, global_step: int, run: Optional[Dict[str, Any]] = None) -> str:
    """Flushes the checkpoint's files, then atomically writes :data:`COMPLETE_FILE` listing them
    (and ``run``: the writing run's settings and length, compared on resume by :func:`check_resume`)."""
    files = {}
    for name in _HASHED_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            _fsync(path)
            files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    if STATE_FILE not in files:
        raise IncompleteCheckpointError(f"checkpoint {directory!r} has no {STATE_FILE} after writing")
    marker = os.path.join(directory, COMPLETE_FILE)
    temporary = marker + ".tmp"
    with open(temporary, "w") as handle:
        json.dump({"global_step": int(global_step), "files": files, **(run or {})}, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, marker)
    _fsync(directory)
    return marker


def complete_checkpoints(parent: str) -> list:
    """``(global_step, path)`` of the complete checkpoints directly under ``parent``, oldest first
    (marker present; files are verified by :func:`verify_checkpoint`; aliases are not counted)."""
    found = []
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if os.path.islink(os.path.join(parent, name)):
                continue  # an alias (write_aliases) of a checkpoint listed under its own name
            marker = os.path.join(parent, name, COMPLETE_FILE)
            try:
                with open(marker) as handle:
                    found.append((int(json.load(handle)["global_step"]), os.path.join(parent, name)))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return sorted(found, key=lambda item: (item[0], os.path.getmtime(item[1])))


# ----------------------------------------------------------------------------- names a person can find
# Determined's local mode names checkpoint folders by UUID. Beside them, local runs keep relative
# symbolic links: ``latest`` and ``step-000200`` -> ``<uuid>``, each replaced atomically (a new link
# under a temporary name, then ``os.replace``), so a reader never sees a missing or half-made alias.
LATEST_ALIAS = "latest"


def step_alias(step: int) -> str:
    return f"step-{int(step):06d}"


def write_aliases(checkpoint_dir: str, global_step: int) -> list:
    """Points ``step-NNNNNN`` and ``latest`` in the checkpoint's storage folder at it; returns their paths."""
    storage, name = os.path.split(os.path.abspath(checkpoint_dir))
    written = []
    for alias in (step_alias(global_step), LATEST_ALIAS):
        path = os.path.join(storage, alias)
        temporary = os.path.join(storage, f".{alias}.{os.getpid()}.tmp")
        if os.path.lexists(temporary):
            os.remove(temporary)
        os.symlink(name, temporary)
        os.replace(temporary, path)
        written.append(path)
    return written


def run_folder(checkpoint_dir: str) -> str:
    """The output folder of the run that wrote ``checkpoint_dir`` (aliases resolved): the folder above
    its storage folder when that is named ``checkpoints`` (``<output-dir>/checkpoints/<uuid>``), else
    the storage folder itself."""
    storage = os.path.dirname(os.path.realpath(checkpoint_dir))
    return os.path.dirname(storage) if os.path.basename(storage) == "checkpoints" else storage


def _alternatives(directory: str) -> str:
    parent = os.path.dirname(os.path.abspath(directory))
    good = [path for _, path in complete_checkpoints(parent) if os.path.abspath(path) != os.path.abspath(directory)]
    if not good:
        return f"there is no complete checkpoint in {parent!r}"
    return f"the newest complete checkpoint in {parent!r} is {good[-1]!r}"


def verify_checkpoint(directory: str, what: str = "checkpoint") -> Dict[str, Any]:
    """Checks that ``directory`` is a complete, unchanged checkpoint; returns its marker.

    Raises FileNotFoundError (no such directory) or :class:`IncompleteCheckpointError` saying what
    is wrong and which checkpoint next to it (or, for the folder holding checkpoints, inside it) is
    complete. ``what`` names the option or key that gave ``directory``."""
    if not isinstance(directory, str) or not directory.strip():
        raise IncompleteCheckpointError(f"{what} {directory!r} is empty: give a checkpoint directory")
    if not os.path.isdir(directory):
        kind = "a file" if os.path.isfile(directory) else "missing"
        raise FileNotFoundError(f"{what} {directory!r} is not a directory ({kind}): give a checkpoint directory "
                                f"(<checkpoint-dir>/<uuid>) written by model_def.py or fetched with `det checkpoint "
                                f"download`")
    marker_path = os.path.join(directory, COMPLETE_FILE)
    inside = complete_checkpoints(directory)
    if not os.path.isfile(marker_path) and inside:  # the folder that holds the checkpoints
        raise IncompleteCheckpointError(
            f"{what} {directory!r} is the folder holding {len(inside)} checkpoint(s), not a checkpoint: give one "
            f"of them, e.g. the newest complete one {inside[-1][1]!r} (global step {inside[-1][0]})")
    if not os.path.isfile(marker_path):
        what = ("the run that wrote it stopped while checkpointing" if os.path.exists(os.path.join(directory, "code"))
                or os.path.exists(os.path.join(directory, STATE_FILE)) else "it is not a checkpoint of this project")
        raise IncompleteCheckpointError(
            f"checkpoint {directory!r} is incomplete: it has no {COMPLETE_FILE}, which is written after all "
            f"its other files ({what}); {_alternatives(directory)}")
    try:
        with open(marker_path) as handle:
            marker = json.load(handle)
        files = dict(marker["files"])
    except (ValueError, KeyError, TypeError) as error:
        raise IncompleteCheckpointError(f"checkpoint {directory!r}: {COMPLETE_FILE} is unreadable ({error}); "
                                        f"{_alternatives(directory)}") from None
    for name, expected in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problem = "is missing"
        elif os.path.getsize(path) != expected["bytes"]:
            problem = f"has {os.path.getsize(path)} bytes, {expected['bytes']} when written"
        elif _sha256(path) != expected["sha256"]:
            problem = "differs from what was written (SHA-256 mismatch)"
        else:
            continue
        raise IncompleteCheckpointError(f"checkpoint {directory!r} is damaged: {name} {problem}; "
                                        f"{_alternatives(directory)}")
    _check_plain_pickle(os.path.join(directory, "trial_state.pkl"))
    return marker


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refers to {module}.{name}")


def _check_plain_pickle(path: str) -> None:
    """The harness reads its ``trial_state.pkl`` with plain ``pickle.load``; before letting it, make
    sure the file holds only plain data (numbers, strings, dicts), never code references."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, "rb") as handle:
            _PlainDataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise IncompleteCheckpointError(f"{path!r} is not plain data ({error}): refusing to load it") from None


def read_checkpoint(directory: str) -> Dict[str, Any]:
    """Loads a trial checkpoint directory's state (weights only, never code), after
    :func:`verify_checkpoint`: every reader (export, features, probes, evaluation, fine-tuning) gets
    only a complete, unchanged checkpoint."""
    path = os.path.join(directory, STATE_FILE)
    verify_checkpoint(directory)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a checkpoint of this project: it has no {STATE_FILE}")
    return load_state(path)


def read_load_data(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, "load_data.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def encoder_state(checkpoint: Dict[str, Any], where: str) -> Dict[str, torch.Tensor]:
    """The plain backbone ``state_dict`` from any mode's checkpoint (BYOL online encoder, or the
    encoder of a classifier / fine-tuning checkpoint)."""
    state = checkpoint["models_state_dict"][0]
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    for prefix in ("online_encoder.net.", "encoder."):
        found = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if found:
            return found
    raise ValueError(f"checkpoint {where} holds no encoder weights (keys start with {sorted(state)[:3]})")


# Settings that may differ on resume without changing what the resumed steps compute: how often to
# validate or checkpoint, the linear evaluation's read-out, where the data lives and how it is loaded.
# "init" decides only the weights of step 0, which a resume replaces (and checkpoints written before
# it existed have none).
RESUME_FREE_KEYS = ("train_length", "validation_period", "checkpoint_period", "classifier_validation",
                    "compare_random_init", "classifier", "data.root", "data.download", "data.num_workers",
                    "data.image_check", "data.gcs.cache_dir", "data.gcs.max_in_flight", "data.gcs.retry_deadline",
                    "init")


def _flatten(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key != "augmentation":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_resume(directory: str, settings, total_steps: int, pretraining: bool = True,
                 processes: int = 1) -> Optional[str]:
    """Before the first step of a resumed run: its settings equal those the checkpoint was written
    with (seed, batch, data, schedule, ...), so the resumed steps are those of the original run, and
    its length is not shorter. A longer length is allowed and said (the schedules then follow the
    new length); the same length only validates, and says so. Returns a note to print, or None;
    raises :class:`IncompatibleCheckpointError`."""
    marker = verify_checkpoint(directory)
    saved = marker.get("settings")
    step = int(marker.get("global_step", 0))
    if saved is not None:
        _check_same_settings(directory, settings, processes, saved, int(marker.get("processes", 1)), pretraining)
    if total_steps < step:
        raise IncompatibleCheckpointError(
            f"checkpoint {directory!r} is at global step {step} but this run ends at step {total_steps} "
            f"({settings.train_length}): it is past the end. Give a longer length (e.g. --batches "
            f"{step + max(step, 1)}) or use the checkpoint as it is (evaluate_result.py --checkpoint {directory})")
    if total_steps == step:
        return (f"note: checkpoint {directory!r} is at step {step}, the end of this run: nothing to train, "
                f"validating only")
    saved_total = marker.get("total_steps")
    if saved_total is not None and total_steps != saved_total:
        return (f"note: this run is longer than the one that wrote the checkpoint ({total_steps} steps, was "
                f"{saved_total}): the learning-rate and EMA schedules now follow the new length, so the result "
                f"differs from an uninterrupted {saved_total}-step run")
    return None


def _check_same_settings(directory: str, settings, processes: int, saved: Dict[str, Any], saved_processes: int,
                         pretraining: bool) -> None:
    """Raises :class:`IncompatibleCheckpointError` naming the settings that differ (beyond
    :data:`RESUME_FREE_KEYS`). Checkpoints written before their marker held the settings are
    compared on shapes only, when loaded (:func:`check_compatible`)."""
    current = _flatten(settings.as_hparams())
    saved = _flatten(saved)
    # Batch norm over the global batch is the same computation in one process as synchronised over
    # several: compare what is computed, not the switch.
    current["sync_batch_norm"] = bool(current.get("sync_batch_norm")) or processes == 1
    saved["sync_batch_norm"] = bool(saved.get("sync_batch_norm")) or saved_processes == 1
    free = tuple(key for key in RESUME_FREE_KEYS if key != "classifier" or pretraining)
    changed = [key for key in sorted(set(current) | set(saved))
               if not any(key == f or key.startswith(f + ".") for f in free) and current.get(key) != saved.get(key)]
    if changed:
        described = ", ".join(f"{key}={current.get(key)!r} (checkpoint: {saved.get(key)!r})" for key in changed[:4])
        raise IncompatibleCheckpointError(
            f"checkpoint {directory!r} was written with other settings than this run's: {described}. Exact "
            f"resume needs the checkpoint's settings; drop the --set/config changes or start a new run")


def resolve_checkpoint_dir(reference: str, context=None):
    """A local directory as it is, or a Determined storage id fetched through the core context."""
    if os.path.isdir(reference):
        return contextlib.nullcontext(reference)
    if context is None:
        raise FileNotFoundError(f"checkpoint {reference!r} is not a directory (and there is no cluster to ask)")
    return context._core.checkpoint.restore_path(reference)


def load_pretrained_encoder(encoder: torch.nn.Module, settings, context=None) -> None:
    """Loads the BYOL encoder of ``settings.pretrained_checkpoint`` strictly into ``encoder``."""
    reference = settings.pretrained_checkpoint
    with resolve_checkpoint_dir(reference, context) as directory:
        checkpoint = read_checkpoint(str(directory))  # verified against its marker first
        check_pretrained_backbone(str(directory), reference, settings.backbone)
    backbones.load_weights(encoder, settings.backbone, encoder_state(checkpoint, reference),
                           f"the encoder of pretrained checkpoint {reference!r}")


def check_pretrained_backbone(directory: str, reference: str, backbone_name: str) -> None:
    """The pretrained checkpoint at ``directory`` was written with ``backbone_name`` (checked before
    any work, when it is local)."""
    saved_backbone = (read_load_data(directory).get("hparams") or {}).get("backbone")
    if saved_backbone and saved_backbone != backbone_name:
        raise IncompatibleCheckpointError(
            f"pretrained checkpoint {reference!r} has backbone={saved_backbone!r} but this run has "
            f"backbone={backbone_name!r}: set hyperparameters.backbone to {saved_backbone!r}")


def checkpoint_config(directory: str) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """``(hparams, experiment_config)`` saved with a trial checkpoint directory."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint {directory!r} is not a directory: pass a directory written by "
                                f"model_def.py (<checkpoint-dir>/<uuid>) or fetched with `det checkpoint download`")
    load_data = read_load_data(directory)
    if not load_data.get("hparams") or not os.path.isfile(os.path.join(directory, STATE_FILE)):
        raise FileNotFoundError(f"{directory!r} is not a checkpoint of this project's trial: it needs "
                                f"load_data.json (with hparams) and {STATE_FILE}")
    return copy.deepcopy(load_data["hparams"]), copy.deepcopy(load_data.get("experiment_config") or {})


def load_encoder(directory: str, backbone_name: str) -> torch.nn.Module:
    """The checkpoint's encoder in ``backbone.build_backbone(backbone_name)``; a clear error names
    missing, unexpected and wrongly shaped tensors instead of loading partially."""
    net = backbones.build_backbone(backbone_name)
    state = encoder_state(read_checkpoint(directory), repr(directory))
    try:
        backbones.load_weights(net, backbone_name, state, f"the encoder of checkpoint {directory!r}")
    except ValueError as error:
        raise IncompatibleCheckpointError(f"{error}; was it written with another hyperparameters.backbone?") from None
    return net
