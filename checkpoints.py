"""What a checkpoint holds beyond the harness's own state, and loading checkpoints safely.

The Determined harness saves the wrapped models, optimisers (LARS momentum) and its RNG states.
:class:`TrialStateCallback` adds what exact resume needs on top: the global step (which fixes the
data position and every schedule), the classifier heads, and a fingerprint of the settings that
decide tensor shapes, so that resuming from an incompatible checkpoint fails with a message naming
the setting instead of a wall of shape errors.

Checkpoints always load with ``torch.load(weights_only=True)``: loading never runs code. The only
non-tensor objects the harness stores are numpy's RNG state arrays, whose reconstruct types are
allowlisted here (never ``weights_only=False``).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from determined import pytorch

STATE_FILE = "state_dict.pth"
FINGERPRINT_KEYS = ("backbone", "projection_size", "projection_hidden_size", "num_classes",
                    "classifier_heads", "training_mode")


def allow_harness_checkpoints() -> None:
    """Allowlists numpy's array types for ``weights_only`` loading of the harness's RNG state."""
    safe = [np.ndarray, np.dtype, np.core.multiarray._reconstruct]
    safe += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]
    torch.serialization.add_safe_globals(safe)


def fingerprint(trial) -> Dict[str, Any]:
    s = trial.settings
    return {"backbone": s.backbone, "projection_size": s.projection_size,
            "projection_hidden_size": s.projection_hidden_size, "num_classes": trial.info.num_classes,
            "classifier_heads": len(s.classifier.learning_rates), "training_mode": s.training_mode.value}


def check_compatible(saved: Dict[str, Any], current: Dict[str, Any], where: str) -> None:
    for key in FINGERPRINT_KEYS:
        if key in saved and saved[key] != current[key]:
            raise ValueError(f"checkpoint {where} was written with {key}={saved[key]!r} but this run has "
                             f"{key}={current[key]!r}: resume with the checkpoint's settings or start fresh")


class TrialStateCallback(pytorch.PyTorchCallback):
    """Saves and restores the trial's own state; trains probe heads before each validation."""

    def __init__(self, trial) -> None:
        self.trial = trial
        self.checkpoint_where = "being loaded"

    def on_trial_startup(self, first_batch_idx: int, checkpoint_uuid: Optional[str]) -> None:
        if checkpoint_uuid:
            self.checkpoint_where = str(checkpoint_uuid)

    def state_dict(self) -> Dict[str, Any]:
        return {"global_step": self.trial.global_step, "heads": self.trial.heads.state_dict(),
                "fingerprint": fingerprint(self.trial)}

    def on_checkpoint_load_start(self, checkpoint: Dict[str, Any]) -> None:
        # Runs before the harness loads the models: compare settings first.
        saved = checkpoint.get("callbacks", {}).get("byol_state", {})
        check_compatible(saved.get("fingerprint", {}), fingerprint(self.trial), self.checkpoint_where)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.trial.global_step = int(state["global_step"])
        self.trial.heads.load_state_dict(state["heads"])

    def on_checkpoint_upload_end(self, uuid: str) -> None:
        self.trial.last_checkpoint = uuid

    def on_validation_start(self) -> None:
        if self.trial.pretraining and self.trial.settings.classifier_validation:
            self.trial.train_probe_heads()

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        self.trial.last_validation = dict(metrics)


def read_checkpoint(directory: str) -> Dict[str, Any]:
    """Loads a trial checkpoint directory's state (weights only, never code)."""
    path = os.path.join(directory, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory!r} is not a checkpoint of this project: it has no {STATE_FILE}")
    allow_harness_checkpoints()
    return torch.load(path, map_location="cpu", weights_only=True)


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
        checkpoint = read_checkpoint(str(directory))
        saved = read_load_data(str(directory)).get("hparams") or {}
    saved_backbone = saved.get("backbone")
    if saved_backbone and saved_backbone != settings.backbone:
        raise ValueError(f"pretrained checkpoint {reference!r} has backbone={saved_backbone!r} but this run "
                         f"has backbone={settings.backbone!r}: set hyperparameters.backbone to {saved_backbone!r}")
    state = encoder_state(checkpoint, reference)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"pretrained checkpoint {reference!r} does not fit backbone {settings.backbone!r}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
