"""The BYOL experiment as a Determined PyTorchTrial, and the script that runs it.

Modes (``hyperparameters.training_mode``):
  SELF_SUPERVISED  BYOL pretraining (section 3): LARS, cosine learning rate and EMA schedules; before
                   each validation fresh linear heads are trained on frozen features (appendix C.1).
  CLASSIFIER_ONLY  linear heads on a frozen encoder loaded from a BYOL checkpoint (appendix C.1).
  FINE_TUNE        encoder and head trained together (appendix C.2).

Run it locally (Determined's Trainer in local mode) or on a cluster (the experiment's entrypoint):
    python model_def.py --config config/local-digits.yaml [--epochs N | --batches N]
        [--checkpoint-dir DIR] [--resume-from DIR] [--metrics-out FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch
from determined import pytorch

import backbone as backbones
import classifier
import data
import loaders
import optim
import checkpoints
import faults
import knn
import plots
import replicas
import sync_batchnorm
from byol import BYOL, cosine_ema_tau
from reducers import ValidatedAccuracyReducer, WeightedMeanReducer
from sampling import GlobalBatchSampler, ShardSampler, mix_seed
from utils import Settings, TrainingMode, parse_settings

checkpoints.allow_harness_checkpoints()


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is left untouched."""


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


class BYOLTrial(pytorch.PyTorchTrial):
    def __init__(self, context: pytorch.PyTorchTrialContext, settings: Optional[Settings] = None) -> None:
        self.context = context
        self.rank = context.distributed.rank
        self.world_size = context.distributed.size
        # sync_batch_norm defaults to on for several processes (global-batch statistics, section 3.3).
        self.settings = settings or parse_settings({"sync_batch_norm": self.world_size > 1, **context.get_hparams()},
                                                   context.get_data_config(), self.world_size)
        s = self.settings
        context.experimental.disable_dataset_reproducibility_checks()  # our own resumable sampler
        self.device = context.device
        self.info = data.dataset_info(s.data.dataset, s.data.root)
        self.pretraining = s.training_mode == TrainingMode.SELF_SUPERVISED
        # Datasets are built (and checked) here, before any training work starts.
        # ReadGuard: an undecodable image ends the run with its file name (faults.py).
        self.train_dataset = faults.ReadGuard(loaders.training_dataset(s, s.image_size, self.pretraining))
        self.eval_dataset = faults.ReadGuard(loaders.evaluation_dataset(s, s.image_size))
        self.steps_per_epoch = len(self._sampler(0))
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
            learner = BYOL(encoder, s.image_size, hidden_layer=None, projection_size=s.projection_size,
                           projection_hidden_size=s.projection_hidden_size, feature_size=feature_size)
            if self.synced_batch_norm:
                # Global-batch statistics in encoder, projector and predictor (online and target):
                # nn.SyncBatchNorm on CUDA; on CPU/gloo, where it refuses to run, an all_reduce one.
                learner = sync_batchnorm.convert_sync_batchnorm(learner, self.device)
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
                encoder = sync_batchnorm.convert_sync_batchnorm(encoder, self.device)
            self.model = context.wrap_model(EncoderWithHeads(encoder, self.heads, fine_tune))
            extra = ([{"params": list(encoder.parameters()), "lr": s.classifier.encoder_lr,
                       "initial_lr": s.classifier.encoder_lr}] if fine_tune else [])
            self.optimizer = context.wrap_optimizer(classifier.heads_optimizer(
                self.heads, s.classifier.learning_rates, s.classifier.momentum, s.classifier.weight_decay, extra))
        view1, view2 = loaders.view_augmentations(s)
        self.augment1 = self._photometric(view1)
        self.augment2 = self._photometric(view2)
        self.normalize = self._to_device(data_normalize(self.info))
        self._reducers()

    # ----------------------------------------------------------------- helpers
    @property
    def synced_batch_norm(self) -> bool:
        return self.settings.sync_batch_norm and self.world_size > 1

    def _to_device(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def _photometric(self, view) -> torch.nn.Module:
        import augment

        return self._to_device(augment.PhotometricAugment(view, self.info.mean, self.info.std, self.settings.image_size))

    def _sampler(self, start_step: int) -> GlobalBatchSampler:
        s = self.settings
        batch = s.global_batch_size if self.pretraining else s.classifier.batch_size
        return GlobalBatchSampler(len(self.train_dataset), batch, self.rank, self.world_size,
                                  seed=s.seed, start_step=start_step)

    @property
    def learner(self) -> BYOL:
        return getattr(self.model, "module", self.model)

    def _seeded(self, *parts: int):
        """Augmentation randomness as a pure function of (seed, step, rank): exact resume."""
        return self._seeded_global(self.rank, *parts)

    def _seeded_global(self, *parts: int):
        """Randomness as a pure function of (seed, step, parts), the same on every rank."""
        devices = [self.device] if self.device.type == "cuda" else []
        state = torch.random.fork_rng(devices=devices)
        state.__enter__()
        torch.manual_seed(mix_seed(self.settings.seed, self.global_step, *parts))
        return state

    # ----------------------------------------------------------------- data
    def build_training_data_loader(self):
        # The data ends at the last step: in local mode the harness counts its period boundaries from
        # 0 again after a resume, and would otherwise train on to the next one past max_length.
        return loaders.LazyTrainingLoader(self.train_dataset,
                                          lambda: BatchesUntil(self._sampler(self.global_step), self.total_steps),
                                          self.settings.data.num_workers, self.device.type == "cuda")

    @property
    def _evaluation_batch(self) -> int:
        return max(self.settings.classifier.batch_size // self.world_size, 1)

    def build_validation_data_loader(self):
        return loaders.sharded_loader(self.eval_dataset, self._evaluation_batch, self.rank, self.world_size,
                                      self.settings.data.num_workers, self.device.type == "cuda")

    def _evaluation_positions(self, batch_idx: int, size: int) -> torch.Tensor:
        """Where this rank's validation batch lies in the whole evaluation set (contiguous shards)."""
        first = ShardSampler(len(self.eval_dataset), self.rank, self.world_size).start
        first += batch_idx * self._evaluation_batch
        return torch.arange(first, first + size)

    def _evaluation_views(self, images: torch.Tensor, positions: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Photometric views whose random parameters are drawn once per validation for the whole
        evaluation set (seeded by seed and step) and picked by each image's position in it, so the
        validation BYOL loss is the same for any number of processes (reducers.py)."""
        if self._view_parameters[0] != self.global_step:
            fork = self._seeded_global(-3)  # -3: never a rank, so never a training seed
            try:
                drawn = [augment.sample_parameters(len(self.eval_dataset), self.device)
                         for augment in (self.augment1, self.augment2)]
            finally:
                fork.__exit__(None, None, None)
            self._view_parameters = (self.global_step, drawn)
        index = torch.as_tensor(positions, device=self.device)
        views = []
        for augment, drawn in zip((self.augment1, self.augment2), self._view_parameters[1]):
            chosen = {key: value[index] for key, value in drawn.items()}

            def given(batch: int, device, chosen=chosen) -> dict:
                assert batch == len(positions), "PhotometricAugment drew for another batch size"
                return chosen

            augment.sample_parameters = given  # this call only: the parameters picked above
            try:
                views.append(augment(images))
            finally:
                del augment.sample_parameters
        return views[0], views[1]

    def build_callbacks(self) -> Dict[str, pytorch.PyTorchCallback]:
        self.metrics_history = plots.MetricsHistory(self)  # drawn by the runner (plots.py)
        return {"byol_state": checkpoints.TrialStateCallback(self), "metrics_history": self.metrics_history}

    # ----------------------------------------------------------------- training
    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        # batch_idx restarts at 0 after a local resume; self.global_step is restored from checkpoints.
        s = self.settings
        step = self.global_step
        if self.pretraining:
            (view1, view2), _labels = batch
            lr = optim.warmup_cosine_lr(step, self.total_steps, round(s.warmup_epochs * self.steps_per_epoch),
                                        self.peak_lr)
            optim.set_learning_rate(self.optimizer, lr)
            fork = self._seeded(1)
            try:
                view1 = self.augment1(view1.to(self.device, non_blocking=True))
                view2 = self.augment2(view2.to(self.device, non_blocking=True))
            finally:
                fork.__exit__(None, None, None)
            loss = self.model(view1, view2)
        else:
            images, labels = batch
            classifier.set_cosine_lr(self.optimizer, step, self.total_steps)
            lr = self.optimizer.param_groups[0]["lr"]
            images = images.to(self.device, non_blocking=True)
            if s.classifier.augmentation == "variant":
                fork = self._seeded(2)
                try:
                    images = self.augment1(images)
                finally:
                    fork.__exit__(None, None, None)
            else:
                images = self.normalize(images)
            loss = classifier.heads_loss(self.model(images), labels.to(self.device), s.classifier.logit_regularization)
        bad_ranks = faults.non_finite_ranks(loss, self.rank, self.world_size)
        if bad_ranks:  # every rank stops at the same step, before any weight changes
            where = f" on rank(s) {bad_ranks}" if self.world_size > 1 else ""
            raise NonFiniteLossError(
                f"loss is not finite ({loss.item()} on this rank) at global step {step}{where}: training "
                f"stopped; the last good checkpoint "
                f"({self.last_checkpoint_path or self.last_checkpoint or 'none written yet'}) "
                f"is intact. Lower the learning rate (base_lr) or check the input data.")
        self.context.backward(loss)
        self.context.step_optimizer(self.optimizer)
        metrics = {"loss": loss.detach(), "lr": lr}
        if self.pretraining:
            tau = cosine_ema_tau(step, self.total_steps, s.tau_base)
            self.learner.update_moving_average(tau)
            if self.world_size > 1 and not self.synced_batch_norm:
                # Per-process batch statistics: keep rank 0's, so replicas stay identical (replicas.py).
                replicas.broadcast_buffers(self.learner)
            metrics["tau"] = tau
        self.global_step += 1
        metrics["images_per_second"] = self._throughput(loss)
        return metrics

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

    # ----------------------------------------------------------------- validation
    def prepare_probes(self) -> None:
        """Before each pretraining validation: CLS_TRAIN features, extracted once, train fresh probe
        heads (appendix C.1; ``classifier_validation``) and become the kNN bank (``knn.py``;
        ``classifier.knn_k > 0``)."""
        s = self.settings
        if not (s.classifier_validation or s.classifier.knn_k):
            return
        features, labels = self.classifier_train_features(self.learner.online_encoder)
        if s.classifier_validation:
            self.train_probe_heads(features=(features, labels))
        if s.classifier.knn_k:
            self.knn_bank = knn.FeatureBank(features, labels, self.info.num_classes)

    def classifier_train_features(self, encoder: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features and labels of all of CLS_TRAIN (gathered from every rank, in dataset order)."""
        s = self.settings
        dataset = faults.ReadGuard(loaders.classifier_feature_dataset(s, s.image_size))
        loader = loaders.sharded_loader(dataset, max(s.classifier.batch_size // self.world_size, 1),
                                        self.rank, self.world_size, s.data.num_workers)
        features, labels = classifier.extract_features(encoder, loader, self.device, self.normalize)
        return classifier.gather_rows(features), classifier.gather_rows(labels)

    def train_probe_heads(self, encoder: Optional[torch.nn.Module] = None,
                          heads: Optional[classifier.LinearHeads] = None,
                          features: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Fresh heads on frozen features (appendix C.1): ``features`` (features, labels) if given,
        else those of ``encoder`` (default: the online encoder)."""
        s = self.settings
        encoder = encoder if encoder is not None else self.learner.online_encoder
        heads = heads if heads is not None else self.heads
        features, labels = features if features is not None else self.classifier_train_features(encoder)
        self.probe_loss = classifier.train_heads_on_features(
            heads, features, labels, s.classifier.learning_rates, s.classifier.train_epochs,
            s.classifier.batch_size, mix_seed(s.seed, self.global_step), s.classifier.momentum,
            s.classifier.weight_decay, s.classifier.logit_regularization)

    @torch.no_grad()
    def random_encoder_probe(self) -> Dict[str, float]:
        """The same linear probe on a randomly initialised encoder: what pretraining bought."""
        s = self.settings
        torch.manual_seed(mix_seed(s.seed, 99))
        encoder = backbones.build_backbone(s.backbone).to(self.device)
        heads = classifier.LinearHeads(backbones.feature_size(s.backbone), self.info.num_classes,
                                       len(s.classifier.learning_rates), s.classifier.logit_clip).to(self.device)
        self.train_probe_heads(encoder, heads)
        encoder.eval()
        reducer = ValidatedAccuracyReducer(s.classifier.learning_rates)
        for images, labels, tags in self.build_validation_data_loader():
            logits = heads(encoder(self.normalize(images.to(self.device))))
            labels, tags = labels.to(self.device), tags.to(self.device)
            for tag, split in ((loaders.VALIDATION_TAG, "validation"), (loaders.TEST_TAG, "test")):
                mask = tags == tag
                if mask.any():
                    top1, top5 = classifier.correct_counts(logits[:, mask], labels[mask])
                    reducer.update(split, top1, top5, int(mask.sum()))
        per_slot = self.context.distributed.allgather(reducer.per_slot_reduce())
        return reducer.cross_slot_reduce(per_slot)

    def evaluation_reducer(self):
        return pytorch.Reducer.AVG

    def _reducers(self):
        """Registered on first use (the validation-only reducers; training metrics are averaged)."""
        if not hasattr(self, "_accuracy_reducer"):
            self._accuracy_reducer = self.context.wrap_reducer(
                ValidatedAccuracyReducer(self.settings.classifier.learning_rates), name=None, for_training=False)
            self._loss_reducer = self.context.wrap_reducer(
                WeightedMeanReducer(), name="validation_byol_loss", for_training=False)
            if self.pretraining and self.settings.classifier.knn_k:
                self._knn_reducer = self.context.wrap_reducer(
                    WeightedMeanReducer(), name="knn_accuracy", for_training=False)
        return self._accuracy_reducer, self._loss_reducer

    @property
    def probes_accuracy(self) -> bool:
        return not self.pretraining or self.settings.classifier_validation

    def evaluate_batch(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        accuracy, byol_loss = self._reducers()
        images_uint8, labels, tags = batch
        images_uint8 = images_uint8.to(self.device, non_blocking=True)
        labels, tags = labels.to(self.device), tags.to(self.device)
        if self.knn_bank is not None:  # kNN read-out on TEST against the CLS_TRAIN bank (knn.py)
            test = tags == loaders.TEST_TAG
            if test.any():
                queries = self.learner.online_encoder(self.normalize(images_uint8[test]))
                correct = self.knn_bank.correct(queries, labels[test], self.settings.classifier.knn_k)
                self._knn_reducer.update(correct, int(test.sum()))
        if not self.probes_accuracy:
            # Without classifier validation: the BYOL loss (eq. 4) on TEST, photometric views only.
            test = tags == loaders.TEST_TAG
            if test.any():
                positions = self._evaluation_positions(batch_idx, images_uint8.shape[0])[test.cpu()]
                view1, view2 = self._evaluation_views(images_uint8[test], positions.tolist())
                count = int(test.sum())
                byol_loss.update(self.model(view1, view2).item() * count, count)
            return {}
        images = self.normalize(images_uint8)
        if self.pretraining:
            logits = self.heads(self.learner.online_encoder(images))
        else:
            logits = self.model(images)
        for tag, split in ((loaders.VALIDATION_TAG, "validation"), (loaders.TEST_TAG, "test")):
            mask = tags == tag
            if mask.any():
                top1, top5 = classifier.correct_counts(logits[:, mask], labels[mask])
                accuracy.update(split, top1, top5, int(mask.sum()))
        return {}


def data_normalize(info) -> torch.nn.Module:
    import augment

    return augment.Normalize(info.mean, info.std)


def main(argv=None) -> int:
    import runner

    return runner.main(argv)


if __name__ == "__main__":
    sys.exit(main())
