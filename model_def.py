"""The BYOL experiment as a Determined PyTorchTrial, and the script that runs it.

Modes (``hyperparameters.training_mode``):
  SELF_SUPERVISED  BYOL pretraining (section 3): LARS, cosine learning rate and EMA schedules; before
                   each validation fresh linear heads are trained on frozen features (appendix C.1).
  CLASSIFIER_ONLY  linear heads on a frozen encoder loaded from a BYOL checkpoint (appendix C.1).
  FINE_TUNE        encoder and head trained together (appendix C.2).

Run it locally (Determined's Trainer in local mode) or on a cluster (the experiment's entrypoint):
    python model_def.py --config config/local-digits.yaml [--epochs N | --batches N]
        [--checkpoint-dir DIR] [--resume-from DIR] [--metrics-out FILE] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import time
from typing import Any, Dict, Iterator, Optional

import torch
from determined import pytorch

import augment
import backbone as backbones
from runtime import classifier
import data
from runtime import loaders
import optim
from runtime import checkpoints, launch
from runtime import faults
from runtime import jpeg_decode
from runtime import knn
from runtime import nonfinite
from runtime import performance
from runtime import plots
from runtime import preflight
from runtime import replicas
from runtime import stops
from runtime import sync_batchnorm
from byol import BYOL, cosine_ema_tau
from runtime.sampling import GlobalBatchSampler, mix_seed
from reducers import DeviceLossReducer
from runtime.settings import Settings, TrainingMode, parse_settings
from utils import ConfigError
from runtime.linear_eval import ValidationMixin

# Seed streams of the trial's randomness (mix_seed(seed, step, stream)); validation.py has its own.
VIEW1_STREAM, VIEW2_STREAM, VARIANT_STREAM = 1, 2, 4

checkpoints.allow_harness_checkpoints()


class EncoderWithHeads(torch.nn.Module):
    """Encoder f followed by linear heads; the encoder is frozen unless fine-tuning."""

    def __init__(self, encoder: torch.nn.Module, heads: classifier.LinearHeads, train_encoder: bool):
        super().__init__()
        self.encoder, self.heads, self.train_encoder = encoder, heads, train_encoder
        if not train_encoder:
            for parameter in encoder.parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_encoder:
            self.encoder.eval()  # frozen: batch-norm statistics stay those of pretraining
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            features = self.encoder(images)
        return self.heads(features)


class BatchesUntil:
    """A :class:`GlobalBatchSampler` that stops before global step ``stop`` (same ``len``: the
    steps per epoch)."""

    def __init__(self, sampler: GlobalBatchSampler, stop: int):
        self.sampler, self.stop = sampler, stop

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), max(self.stop - self.sampler.start_step, 0))


class BYOLTrial(ValidationMixin, pytorch.PyTorchTrial):
    """BYOL pretraining, or linear heads / fine-tuning on its encoder (see the module docstring).

    Exact resume: everything random (data order, crops, photometric views) is a pure function of
    ``(seed, global step, sample)``, and the global step travels in the checkpoint
    (``checkpoints.TrialStateCallback``); the harness's own ``batch_idx`` is not used.
    """

    def __init__(self, context: pytorch.PyTorchTrialContext, settings: Optional[Settings] = None) -> None:
        self.context = context
        self.rank = context.distributed.rank
        self.world_size = context.distributed.size
        # sync_batch_norm defaults to on for several processes (global-batch statistics, section 3.3).
        self.settings = settings or parse_settings({"sync_batch_norm": self.world_size > 1, **context.get_hparams()},
                                                   context.get_data_config(), self.world_size)
        s = self.settings
        context.experimental.disable_dataset_reproducibility_checks()  # our own resumable sampler
        # Batches reach the device through our own non-blocking copies (loaders.prefetch_to_device
        # and train_batch), not the harness's blocking one.
        context.experimental.disable_auto_to_device()
        self.device = context.device
        performance.configure_device(self.device)
        self.channels_last = performance.use_channels_last(s.channels_last, self.device)
        self.finite_watch = nonfinite.NonFiniteWatch(s.finite_check_period)
        self.info = data.dataset_info(s.data.dataset, s.data.root)
        self.pretraining = s.training_mode == TrainingMode.SELF_SUPERVISED
        # Datasets are built (and checked) here, before any training work starts.
        # ReadGuard: an undecodable image ends the run with its file name (faults.py).
        self.train_dataset = faults.ReadGuard(loaders.training_dataset(s, s.image_size, self.pretraining))
        self.eval_dataset = faults.ReadGuard(loaders.evaluation_dataset(s, s.image_size))
        # Every split's image files open (a header check) before the first step (preflight.py).
        preflight.check_image_headers([self.train_dataset, self.eval_dataset], self.rank, self.world_size)
        note = preflight.dataset_classes_note(self.info.num_classes, f"dataset {s.data.dataset!r}")
        if note and self.rank == 0:
            print(note, flush=True)
        try:
            self.steps_per_epoch = len(self._sampler(0))
        except ValueError as error:  # fewer images than one global batch
            key = "global_batch_size" if self.pretraining else "classifier.batch_size"
            raise ConfigError(f"config key 'hyperparameters.{key}': {error}") from None
        self.total_steps = s.train_length.to_batches(self.steps_per_epoch)
        self.global_step = 0
        self.last_checkpoint: Optional[str] = None
        self.last_checkpoint_path: Optional[str] = None  # chief: directory of the last complete checkpoint
        self.last_validation: Dict[str, Any] = {}
        self.knn_bank: Optional[knn.FeatureBank] = None  # CLS_TRAIN features, during validation only
        self._view_parameters: tuple = (None, None)  # (step, per-view parameters for the evaluation set)
        self._last_print = self._last_time = time.time()

        torch.manual_seed(s.seed)  # identical initial weights on every rank
        encoder = backbones.build_backbone(s.backbone, s.backbone_weights)
        feature_size = backbones.feature_size(s.backbone)
        self.heads = classifier.LinearHeads(feature_size, self.info.num_classes,
                                            len(s.classifier.learning_rates), s.classifier.logit_clip)
        if self.pretraining:
            # The reference's online classifier on sg(y): a training metric at every step (byol.py).
            learner = BYOL(encoder, s.image_size, hidden_layer=None, projection_size=s.projection_size,
                           projection_hidden_size=s.projection_hidden_size, feature_size=feature_size,
                           num_classes=self.info.num_classes)
            if self.synced_batch_norm:
                # Global-batch statistics in encoder, projector and predictor (online and target):
                # one all_reduce per layer, on every device (sync_batchnorm.py).
                learner = sync_batchnorm.convert_sync_batchnorm(learner)
            if self.channels_last:
                learner = performance.to_channels_last(learner)
            self.model = context.wrap_model(learner)
            self.heads.to(self.device)
            self.peak_lr = optim.scaled_learning_rate(s.base_lr, s.global_batch_size)
            groups = optim.lars_param_groups(
                ((n, p) for n, p in learner.named_parameters() if not n.startswith("target_")), s.weight_decay)
            self.optimizer = context.wrap_optimizer(
                optim.LARS(groups, lr=self.peak_lr, momentum=s.momentum, weight_decay=s.weight_decay, eta=s.lars_eta))
        else:
            checkpoints.load_pretrained_encoder(encoder, s, context)
            fine_tune = s.training_mode == TrainingMode.FINE_TUNE
            if fine_tune and self.synced_batch_norm:  # a frozen encoder (CLASSIFIER_ONLY) keeps eval-mode BN
                encoder = sync_batchnorm.convert_sync_batchnorm(encoder)
            if self.channels_last:
                encoder = performance.to_channels_last(encoder)
            self.model = context.wrap_model(EncoderWithHeads(encoder, self.heads, fine_tune))
            encoder_lr = optim.scaled_learning_rate(s.classifier.encoder_lr, s.classifier.batch_size)
            extra = ([{"params": list(encoder.parameters()), "lr": encoder_lr, "initial_lr": encoder_lr}]
                     if fine_tune else [])
            self.optimizer = context.wrap_optimizer(classifier.heads_optimizer(
                self.heads, s.classifier.learning_rates, s.classifier.batch_size, s.classifier.momentum,
                s.classifier.weight_decay, extra))
        view1, view2 = loaders.view_augmentations(s)
        self.augment1 = self._photometric(view1)
        self.augment2 = self._photometric(view2)
        self.normalize = augment.Normalize(self.info.mean, self.info.std).to(self.device)
        # Optional torch.compile (``compile: true``) of the forward pass and the augmentations; the
        # uncompiled modules stay what checkpoints hold.
        self.model_call = performance.maybe_compile(self.model, s.compile)
        self._augment_calls = {module: performance.maybe_compile(module, s.compile)
                               for module in (self.augment1, self.augment2)}
        self.register_reducers()
        # The training loss stays on the device and is read once per reporting period (reducers.py).
        self.loss_reducer = context.wrap_reducer(DeviceLossReducer(), name="loss", for_training=True,
                                                 for_validation=False)

    # ----------------------------------------------------------------- helpers
    @property
    def synced_batch_norm(self) -> bool:
        return self.settings.sync_batch_norm and self.world_size > 1

    def _photometric(self, view) -> torch.nn.Module:
        return augment.PhotometricAugment(view, self.info.mean, self.info.std, self.settings.image_size).to(self.device)

    def _sampler(self, start_step: int) -> GlobalBatchSampler:
        s = self.settings
        batch = s.global_batch_size if self.pretraining else s.classifier.batch_size
        return GlobalBatchSampler(len(self.train_dataset), batch, self.rank, self.world_size,
                                  seed=s.seed, start_step=start_step)

    @property
    def learner(self) -> BYOL:
        return getattr(self.model, "module", self.model)

    @contextlib.contextmanager
    def seeded(self, stream: int) -> Iterator[None]:
        """Randomness as a pure function of (seed, global step, stream), the same on every rank;
        the global RNG is left as it was."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(mix_seed(self.settings.seed, self.global_step, stream))
            yield

    def augment_global(self, augment, images: torch.Tensor, stream: int) -> torch.Tensor:
        """Photometric parameters drawn for the whole global batch, this rank's rows applied: the
        same image gets the same view whatever the number of processes (the sampler gives rank r
        rows r*B..(r+1)*B-1 of each global batch)."""
        per_rank = images.shape[0]
        with self.seeded(stream):
            params = augment.sample_parameters(per_rank * self.world_size)  # on the CPU (augment.py)
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        views = self._augment_calls.get(augment, augment)(images, augment.select(params, rows))
        return performance.images_channels_last(views) if self.channels_last else views

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Non-blocking host-to-device copy (pinned batches; a no-op for batches already there)."""
        return tensor.to(self.device, non_blocking=True)

    # ----------------------------------------------------------------- data
    def build_training_data_loader(self):
        # The data ends at the last step: in local mode the harness counts its period boundaries from
        # 0 again after a resume, and would otherwise train on to the next one past max_length.
        encoded = self.pretraining and self.settings.data.decode == "device"  # workers deliver JPEG bytes
        return loaders.LazyTrainingLoader(self.train_dataset,
                                          lambda: BatchesUntil(self._sampler(self.global_step), self.total_steps),
                                          self.settings.data.num_workers, self.device,
                                          jpeg_decode.collate_encoded if encoded else None)

    def build_callbacks(self) -> Dict[str, pytorch.PyTorchCallback]:
        self.metrics_history = plots.MetricsHistory(self)  # drawn by the runner (plots.py)
        return {"finite_check": nonfinite.FiniteCheckCallback(self), "byol_state": checkpoints.TrialStateCallback(self),
                "metrics_history": self.metrics_history}

    # ----------------------------------------------------------------- training
    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        # batch_idx restarts at 0 after a local resume; self.global_step is restored from checkpoints.
        s = self.settings
        step = self.global_step
        if self.pretraining:
            views, labels = batch
            if isinstance(views, jpeg_decode.EncodedBatch):  # data.decode: device (jpeg_decode.py)
                views = views.decode(s.image_size, self.device)
            view1, view2 = views
            lr = optim.warmup_cosine_lr(step, self.total_steps, round(s.warmup_epochs * self.steps_per_epoch),
                                        self.peak_lr)
            optim.set_learning_rate(self.optimizer, lr)
            view1 = self.augment_global(self.augment1, self.to_device(view1), VIEW1_STREAM)
            view2 = self.augment_global(self.augment2, self.to_device(view2), VIEW2_STREAM)
            with performance.autocast(self.device, s.precision):
                loss, classifier_loss, classifier_accuracy = self.model_call(view1, view2,
                                                                             labels=self.to_device(labels))
        else:
            images, labels = batch
            classifier.set_cosine_lr(self.optimizer, step, self.total_steps)
            lr = self.optimizer.param_groups[0]["lr"]
            images = self.to_device(images)
            if s.classifier.augmentation == "variant":  # appendix C.1: the pretraining augmentations
                images = self.augment_global(self.augment1, images, VARIANT_STREAM)
            else:
                images = self.normalize(images)
                images = performance.images_channels_last(images) if self.channels_last else images
            with performance.autocast(self.device, s.precision):
                logits = self.model_call(images)
            loss = classifier.heads_loss(logits.float(), self.to_device(labels), s.classifier.logit_regularization)
        # The loss is read on the host only every finite_check_period steps and at the end of each
        # training workload (before any validation or checkpoint), together with a stop request
        # (SIGTERM/SIGINT, stops.py): nonfinite.py. One process needs no agreement to stop.
        self.finite_watch.record(loss, step)
        if self.finite_watch.due(step) or (self.world_size == 1 and stops.REQUEST.requested):
            self.check_finite_loss()  # before this step's update: every rank stops at the same step
        # The online classifier's loss trains only the classifier (its input is sg(y)).
        self.context.backward(loss + classifier_loss if self.pretraining else loss)
        self.context.step_optimizer(self.optimizer)
        self.loss_reducer.update(loss)
        metrics = {"lr": lr}
        if self.pretraining:
            # Accuracy on this training batch's labelled images (STL-10's unlabeled ones are skipped).
            metrics["online_classifier_accuracy"] = classifier_accuracy.detach()
            metrics["online_classifier_loss"] = classifier_loss.detach()
            tau = cosine_ema_tau(step, self.total_steps, s.tau_base)
            self.learner.update_moving_average(tau)
            if self.world_size > 1 and not self.synced_batch_norm:
                # Per-process batch statistics: keep rank 0's, so replicas stay identical (replicas.py).
                replicas.broadcast_buffers(self.learner)
            metrics["tau"] = tau
        self.global_step += 1
        metrics["images_per_second"] = self._throughput(loss)
        return metrics

    def check_finite_loss(self) -> None:
        """Raises :class:`nonfinite.NonFiniteLossError` naming the first step whose loss was not finite, on every
        rank at once (a collective with several processes); a stop asked of any rank is agreed here."""
        bad, stop = self.finite_watch.agree(self.rank, self.world_size, stops.REQUEST.requested)
        if bad:
            self._non_finite(min(first for _, first in bad), [rank for rank, _ in bad])
        if stop and not self.context.get_stop_requested():  # agreed by every rank: checkpoint after this step
            self.context.set_stop_requested(True)

    def check_finite_loss_local(self, first_bad_step: int) -> None:
        """Chief only, as a checkpoint starts (no collective): its own record."""
        self._non_finite(first_bad_step, [self.rank])

    def _non_finite(self, step: int, ranks: list) -> None:
        where = f" on rank(s) {ranks}" if self.world_size > 1 else ""
        raise nonfinite.NonFiniteLossError(
            f"loss is not finite at global step {step}{where}: training stopped; the last good checkpoint "
            f"({self.last_checkpoint_path or self.last_checkpoint or 'none written yet'}) "
            f"is intact. Lower the learning rate (base_lr) or check the input data.")

    def check_replicas(self, checkpoint: str) -> None:
        """After each checkpoint: every rank's networks and heads equal rank 0's (replicas.py)."""
        if self.world_size > 1:
            replicas.check_trial(self.context, self.heads, f"checkpoint {checkpoint} at step {self.global_step}")

    def _throughput(self, loss: torch.Tensor) -> float:
        now = time.time()
        batch = self.settings.global_batch_size if self.pretraining else self.settings.classifier.batch_size
        rate = batch / max(now - self._last_time, 1e-9)
        self._last_time = now
        if self.rank == 0 and (now - self._last_print > 5 or self.global_step in (1, self.total_steps)):
            self._last_print = now
            print(f"[train] step {self.global_step}/{self.total_steps} "
                  f"(epoch {self.global_step / self.steps_per_epoch:.2f}) loss {loss.item():.4f} "
                  f"{rate:.0f} images/s", flush=True)
        return rate

def build_trial(context: pytorch.PyTorchTrialContext, settings: Optional[Settings] = None) -> BYOLTrial:
    """The trial for ``context`` (and ``settings``, or those of its hyperparameters)."""
    return BYOLTrial(context, settings)


def main(argv=None) -> int:
    return launch.main(argv, build_trial)


if __name__ == "__main__":
    sys.exit(main())
