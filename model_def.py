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
from byol import BYOL, cosine_ema_tau
from reducers import ValidatedAccuracyReducer, WeightedMeanReducer
from sampling import GlobalBatchSampler, mix_seed
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


class BYOLTrial(pytorch.PyTorchTrial):
    def __init__(self, context: pytorch.PyTorchTrialContext, settings: Optional[Settings] = None) -> None:
        self.context = context
        self.rank = context.distributed.rank
        self.world_size = context.distributed.size
        self.settings = settings or parse_settings(context.get_hparams(), context.get_data_config(), self.world_size)
        s = self.settings
        context.experimental.disable_dataset_reproducibility_checks()  # our own resumable sampler
        self.device = context.device
        self.info = data.dataset_info(s.data.dataset, s.data.root)
        self.pretraining = s.training_mode == TrainingMode.SELF_SUPERVISED
        # Datasets are built (and checked) here, before any training work starts.
        self.train_dataset = loaders.training_dataset(s, s.image_size, self.pretraining)
        self.eval_dataset = loaders.evaluation_dataset(s, s.image_size)
        self.steps_per_epoch = len(self._sampler(0))
        self.total_steps = s.train_length.to_batches(self.steps_per_epoch)
        self.global_step = 0
        self.last_checkpoint: Optional[str] = None
        self.last_validation: Dict[str, Any] = {}
        self._last_print = self._last_time = time.time()

        torch.manual_seed(s.seed)  # identical initial weights on every rank
        encoder = backbones.build_backbone(s.backbone, s.backbone_weights)
        feature_size = backbones.feature_size(s.backbone)
        self.heads = classifier.LinearHeads(feature_size, self.info.num_classes,
                                            len(s.classifier.learning_rates), s.classifier.logit_clip)
        if self.pretraining:
            learner = BYOL(encoder, s.image_size, hidden_layer=None, projection_size=s.projection_size,
                           projection_hidden_size=s.projection_hidden_size, feature_size=feature_size)
            if s.sync_batch_norm and self.world_size > 1:
                learner = torch.nn.SyncBatchNorm.convert_sync_batchnorm(learner)
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
        devices = [self.device] if self.device.type == "cuda" else []
        state = torch.random.fork_rng(devices=devices)
        state.__enter__()
        torch.manual_seed(mix_seed(self.settings.seed, self.global_step, self.rank, *parts))
        return state

    # ----------------------------------------------------------------- data
    def build_training_data_loader(self):
        return loaders.LazyTrainingLoader(self.train_dataset, lambda: self._sampler(self.global_step),
                                          self.settings.data.num_workers, self.device.type == "cuda")

    def build_validation_data_loader(self):
        batch = max(self.settings.classifier.batch_size // self.world_size, 1)
        return loaders.sharded_loader(self.eval_dataset, batch, self.rank, self.world_size,
                                      self.settings.data.num_workers, self.device.type == "cuda")

    def build_callbacks(self) -> Dict[str, pytorch.PyTorchCallback]:
        return {"byol_state": checkpoints.TrialStateCallback(self)}

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
        if not torch.isfinite(loss.detach()):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {step}: training stopped; the last good checkpoint "
                f"({self.last_checkpoint or 'none written yet'}) is intact. Lower the learning rate "
                f"(base_lr) or check the input data.")
        self.context.backward(loss)
        self.context.step_optimizer(self.optimizer)
        metrics = {"loss": loss.detach(), "lr": lr}
        if self.pretraining:
            tau = cosine_ema_tau(step, self.total_steps, s.tau_base)
            self.learner.update_moving_average(tau)
            metrics["tau"] = tau
        self.global_step += 1
        metrics["images_per_second"] = self._throughput()
        return metrics

    def _throughput(self) -> float:
        now = time.time()
        batch = self.settings.global_batch_size if self.pretraining else self.settings.classifier.batch_size
        rate = batch / max(now - self._last_time, 1e-9)
        self._last_time = now
        if self.rank == 0 and (now - self._last_print > 5 or self.global_step in (1, self.total_steps)):
            self._last_print = now
            print(f"[train] step {self.global_step}/{self.total_steps} "
                  f"(epoch {self.global_step / self.steps_per_epoch:.2f}) {rate:.0f} images/s", flush=True)
        return rate

    # ----------------------------------------------------------------- validation
    def train_probe_heads(self, encoder: Optional[torch.nn.Module] = None,
                          heads: Optional[classifier.LinearHeads] = None) -> None:
        """Before each pretraining validation: fresh heads on frozen features (appendix C.1)."""
        s = self.settings
        encoder = encoder if encoder is not None else self.learner.online_encoder
        heads = heads if heads is not None else self.heads
        dataset = loaders.classifier_feature_dataset(s, s.image_size)
        loader = loaders.sharded_loader(dataset, max(s.classifier.batch_size // self.world_size, 1),
                                        self.rank, self.world_size, s.data.num_workers)
        features, labels = classifier.extract_features(encoder, loader, self.device, self.normalize)
        features, labels = classifier.gather_rows(features), classifier.gather_rows(labels)
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
        return self._accuracy_reducer, self._loss_reducer

    @property
    def probes_accuracy(self) -> bool:
        return not self.pretraining or self.settings.classifier_validation

    def evaluate_batch(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        accuracy, byol_loss = self._reducers()
        images_uint8, labels, tags = batch
        images_uint8 = images_uint8.to(self.device, non_blocking=True)
        labels, tags = labels.to(self.device), tags.to(self.device)
        if not self.probes_accuracy:
            # Without classifier validation: the BYOL loss (eq. 4) on TEST, photometric views only.
            test = tags == loaders.TEST_TAG
            if test.any():
                fork = self._seeded(3, batch_idx)
                try:
                    view1, view2 = self.augment1(images_uint8[test]), self.augment2(images_uint8[test])
                finally:
                    fork.__exit__(None, None, None)
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
