"""The BYOL experiment as Determined PyTorchTrials, and the script that runs it.

Modes (``hyperparameters.training_mode``), each run by a trial class built by :func:`build_trial`
on the shared :class:`TrialBase`:
  SELF_SUPERVISED  :class:`BYOLTrial`: BYOL pretraining (section 3): LARS, cosine learning rate and EMA
                   schedules; before each validation fresh linear-evaluation heads are trained on
                   frozen features (appendix C.1, ``runtime/linear_eval.py``).
  CLASSIFIER_ONLY  :class:`HeadsTrial`: linear heads on a frozen encoder loaded from a BYOL checkpoint
                   (appendix C.1).
  FINE_TUNE        :class:`HeadsTrial`: encoder and head trained together (appendix C.2).

Run it locally (Determined's Trainer in local mode) or on a cluster (the experiment's entrypoint):
    python model_def.py --config config/local-digits.yaml [--epochs N | --batches N]
        [--checkpoint-dir DIR] [--resume-from DIR] [--metrics-out FILE] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import sys

from runtime import cli

if __name__ == "__main__":  # the command line first: --help and usage errors answer before torch loads
    cli.parse_model_def_args(sys.argv[1:])
    cli.announce_imports("byol")

import contextlib
import functools
import itertools
import time
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from determined import pytorch

import augment
import backbone as backbones
import data
import optim
from byol import BYOL
from reducers import DeviceMeansReducer
from runtime import (
    checkpoints,
    classifier,
    faults,
    jpeg_decode,
    launch,
    linear_eval,
    loaders,
    nonfinite,
    performance,
    plots,
    preflight,
    progress,
    replicas,
    stops,
    sync_batchnorm,
)
from runtime.sampling import GlobalBatchSampler, SeededTransformDataset, SeedStream, mix_seed
from runtime.settings import MAX_STEPS, Settings, TrainingMode, parse_settings
from utils import ConfigError

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

    def forward(self, images: torch.Tensor, precomputed: bool = False) -> torch.Tensor:
        """Every head's logits; ``precomputed``: ``images`` are already the frozen encoder's features."""
        if precomputed:
            return self.heads(images)
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


class TrialBase(pytorch.PyTorchTrial):
    """What the two trials share: settings, datasets and the resumable sampler, the encoder and the
    linear heads' initial weights, normalisation and photometric modules, seeded randomness, the
    deferred non-finite check, the replica check, throughput printing, the data loaders, the
    trial's own checkpointed state and its :class:`linear_eval.LinearEvaluation` (``self.evaluation``).

    Exact resume: everything random (data order, crops, photometric views) is a pure function of
    ``(seed, global step, sample)``, and the global step travels in the checkpoint
    (``checkpoints.TrialStateCallback``, through :meth:`state_to_save` / :meth:`restore_state`);
    the harness's own ``batch_idx`` is not used.

    A subclass builds its wrapped model and optimiser (:meth:`build_model`), names what linear
    evaluation reads out (:meth:`readout`) and computes each step's loss (:meth:`step_loss`).
    """

    pretraining: bool = False  # SELF_SUPERVISED (BYOLTrial) or not (HeadsTrial); read-only
    modes: tuple = ()  # the training modes this class runs
    batch_key = ""  # the hyperparameter that sets the global batch
    device_metrics: tuple = ()  # the metrics of step_loss that are device tensors, besides the loss

    def __init__(self, context: pytorch.PyTorchTrialContext, settings: Settings) -> None:
        if settings.training_mode not in self.modes:
            raise ValueError(f"{type(self).__name__} runs {[m.value for m in self.modes]}, not "
                             f"{settings.training_mode.value}: build the trial with model_def.build_trial")
        self.context = context
        self.rank = context.distributed.rank
        self.world_size = context.distributed.size
        self.settings = settings
        s = self.settings
        context.experimental.disable_dataset_reproducibility_checks()  # our own resumable sampler
        # Batches reach the device through our own non-blocking copies (loaders.prefetch_to_device
        # and train_batch), not the harness's blocking one.
        context.experimental.disable_auto_to_device()
        self.device = context.device
        performance.configure_device(self.device)
        self.channels_last = performance.use_channels_last(s.channels_last, self.device)
        self.finite_watch = nonfinite.NonFiniteWatch(s.finite_check_period)
        self.check_memory()  # a step that cannot fit is refused before any data is read (preflight.py)
        self.info = data.dataset_info(s.data.dataset, s.data.root)
        # Datasets are built (and checked) here, before any training work starts.
        # ReadGuard: an undecodable image ends the run with its file name (faults.py).
        self.train_dataset = faults.ReadGuard(loaders.training_dataset(s, s.image_size, self.pretraining))
        eval_dataset = faults.ReadGuard(loaders.evaluation_dataset(s, s.image_size))
        # Every split's image files open (a header check) before the first step (preflight.py).
        preflight.check_image_headers([self.train_dataset, eval_dataset], self.rank, self.world_size,
                                      full=s.data.image_check == "full")
        note = preflight.dataset_classes_note(self.info.num_classes, f"dataset {s.data.dataset!r}")
        if note and self.rank == 0:
            print(note, flush=True)
        try:
            self.steps_per_epoch = len(self._sampler(0))
        except ValueError as error:  # fewer images than one global batch
            held_out = (f" (pretraining images left after holding out data.validation_size="
                        f"{s.data.validation_size} for the BYOL-loss validation, classifier_validation: false)"
                        if self.pretraining and not s.classifier_validation else "")
            raise ConfigError(f"config key 'hyperparameters.{self.batch_key}': {error}{held_out}") from None
        self.check_knn_bank()
        self.total_steps = s.train_length.to_batches(self.steps_per_epoch)
        if self.total_steps > MAX_STEPS:
            raise ConfigError(f"config key 'hyperparameters.train_length' has value {s.train_length}: "
                              f"{self.total_steps:,} steps ({self.steps_per_epoch} per epoch), more than {MAX_STEPS:,}")
        self.global_step = 0
        self.last_checkpoint: Optional[str] = None
        self.last_checkpoint_path: Optional[str] = None  # chief: directory of the last complete checkpoint
        self._last_print = self._last_time = time.time()
        self._time_left: Optional[progress.Remaining] = None  # from the first step this process trains

        torch.manual_seed(s.seed)  # identical initial weights on every rank
        encoder = backbones.build_backbone(s.backbone, s.backbone_weights, init=s.init)
        feature_size = backbones.feature_size(s.backbone)
        self.heads = classifier.LinearHeads(feature_size, self.info.num_classes,
                                            len(s.classifier.learning_rates), s.classifier.logit_clip)
        self.model, self.optimizer = self.build_model(encoder, feature_size)
        view1, view2 = s.views
        self.augment1 = self._photometric(view1)
        self.augment2 = self._photometric(view2)
        self.photometric = augment.PhotometricViews(  # T and T' of table 6 as one batch (augment.py)
            [self.augment1, self.augment2] if self.pretraining else [self.augment1])
        self.normalize = augment.Normalize(self.info.mean, self.info.std).to(self.device)
        # ``compile: true``: the device part of a step (photometric views, forward, loss) is ONE
        # compiled function (performance.py); the uncompiled modules stay what checkpoints hold.
        self.step_call = performance.maybe_compile(self.forward_step, s.compile)
        self.evaluation = linear_eval.LinearEvaluation(
            settings=s, context=context, device=self.device, rank=self.rank, world_size=self.world_size,
            dataset=eval_dataset, normalize=self.normalize, augmentations=(self.augment1, self.augment2),
            num_classes=self.info.num_classes, global_step=lambda: self.global_step, seeded=self.seeded,
            **self.readout())
        # The per-step metrics stay on the device and are read once per reporting period (reducers.py).
        self.step_metrics = context.wrap_reducer(DeviceMeansReducer(("loss",) + self.device_metrics), name=None,
                                                 for_training=True, for_validation=False)

    # ----------------------------------------------------------------- what a subclass defines
    @property
    def global_batch_size(self) -> int:
        """Images per step, over all processes."""
        raise NotImplementedError

    def build_model(self, encoder: torch.nn.Module, feature_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The wrapped model and optimiser, from the freshly initialised ``encoder``."""
        raise NotImplementedError

    def readout(self) -> Dict[str, torch.nn.Module]:
        """What linear evaluation reads out (the read-out arguments of ``LinearEvaluation``)."""
        raise NotImplementedError

    def step_loss(self, batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """``(loss, what backward gets, metrics)`` of global step ``step``; sets the learning rate.
        ``metrics`` holds host numbers, and the device tensors named in ``device_metrics``."""
        raise NotImplementedError

    def after_step(self, step: int) -> Dict[str, Any]:
        """Work after the optimiser step of global step ``step``; returns more metrics."""
        return {}

    def training_collate(self) -> Optional[Callable]:
        """The training loader's collate function (None: PyTorch's default)."""
        return None

    def training_prepare(self) -> Optional[Callable]:
        """What the training loader's prefetcher does to each batch on the device, one batch ahead
        of the step (``loaders.prefetch_to_device``; None: only the copy)."""
        return None

    # ----------------------------------------------------------------- helpers
    def check_memory(self) -> None:
        """Refuses settings whose training step cannot fit in memory (``preflight.check_step_memory``):
        BYOL's two views (section 3.1) through an encoder with weights, gradients, LARS momentum
        and a target copy; heads: one view, a frozen (CLASSIFIER_ONLY) or trained (FINE_TUNE) encoder."""
        s = self.settings
        fine_tune = s.training_mode == TrainingMode.FINE_TUNE
        per_process = max(self.global_batch_size // self.world_size, 1)
        estimate = preflight.estimate_step_memory(
            s.backbone, s.image_size, per_process, views=2 if self.pretraining else 1, workers=s.data.num_workers,
            trained_copies=4 if self.pretraining else 3 if fine_tune else 1,
            bytes_per_value=2 if s.precision == "bf16" else 4, encoder_trained=self.pretraining or fine_tune)
        preflight.check_step_memory(
            estimate, self.device,
            f"hyperparameters.image_size ({s.image_size}), hyperparameters.{self.batch_key} ({self.global_batch_size}, "
            f"{per_process} per process) or data.num_workers ({s.data.num_workers})",
            self.context.distributed.local_size)

    def check_knn_bank(self) -> None:
        """``classifier.knn_k`` neighbours exist in the bank (CLS_TRAIN); more would be capped silently."""
        s = self.settings
        if self.pretraining and s.classifier.knn_k:
            bank = len(loaders.base_dataset(s, data.Split.CLS_TRAIN))
            if s.classifier.knn_k > bank:
                raise ConfigError(f"config key 'hyperparameters.classifier.knn_k' has value {s.classifier.knn_k}: more "
                                  f"than the {bank} CLS_TRAIN images of the kNN bank; give knn_k <= {bank}")

    @property
    def synced_batch_norm(self) -> bool:
        return self.settings.sync_batch_norm and self.world_size > 1

    def _photometric(self, view) -> augment.PhotometricAugment:
        return augment.PhotometricAugment(view, self.info.mean, self.info.std, self.settings.image_size).to(self.device)

    def _sampler(self, start_step: int) -> GlobalBatchSampler:
        s = self.settings
        return GlobalBatchSampler(len(self.train_dataset), self.global_batch_size, self.rank, self.world_size,
                                  seed=s.seed, start_step=start_step)

    @contextlib.contextmanager
    def seeded(self, stream: int) -> Iterator[None]:
        """Randomness as a pure function of (seed, global step, stream), the same on every rank;
        the global RNG is left as it was."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(mix_seed(self.settings.seed, self.global_step, stream))
            yield

    def view_parameters(self, views: augment.PhotometricViews, streams, per_rank: int):
        """Host: each view's photometric parameters drawn for the whole global batch (seeded by
        seed, global step and the view's stream), this rank's rows, packed and sent to the device
        (``augment.PhotometricViews.device_parameters``): the same image gets the same view
        whatever the number of processes (the sampler gives rank r rows r*B..(r+1)*B-1 of each
        global batch)."""
        drawn = []
        for module, stream in zip(views.augments, streams):
            with self.seeded(stream):
                drawn.append(module.sample_parameters(per_rank * self.world_size))  # on the CPU (augment.py)
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return views.device_parameters(drawn, self.device, rows)

    def forward_step(self, *args) -> tuple:
        """The device part of a step, from views on the device to the loss: what ``compile: true``
        compiles as one function (:meth:`step_loss` calls it through ``self.step_call``)."""
        raise NotImplementedError

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Non-blocking host-to-device copy (pinned batches; a no-op for batches already there)."""
        return tensor.to(self.device, non_blocking=True)

    # ----------------------------------------------------------------- data
    def build_training_data_loader(self):
        # The data ends at the last step: in local mode the harness counts its period boundaries from
        # 0 again after a resume, and would otherwise train on to the next one past max_length.
        return loaders.LazyTrainingLoader(self.train_dataset,
                                          lambda: BatchesUntil(self._sampler(self.global_step), self.total_steps),
                                          self.settings.data.num_workers, self.device, self.training_collate(),
                                          self.training_prepare())

    def build_validation_data_loader(self):
        return self.evaluation.data_loader()

    def build_callbacks(self) -> Dict[str, pytorch.PyTorchCallback]:
        self.metrics_history = plots.MetricsHistory(self)  # drawn by the runner (plots.py)
        return {"finite_check": nonfinite.FiniteCheckCallback(self), "byol_state": checkpoints.TrialStateCallback(self),
                "linear_evaluation": linear_eval.LinearEvaluationCallback(self.evaluation),
                "metrics_history": self.metrics_history}

    # ----------------------------------------------------------------- checkpointed state
    def state_to_save(self) -> Dict[str, Any]:
        """What a checkpoint holds of this trial beyond the harness's models and optimisers."""
        return {"global_step": self.global_step, "heads": self.heads.state_dict()}

    def restore_state(self, state: Dict[str, Any]) -> None:
        """The inverse of :meth:`state_to_save` (the global step as the state callback decided it)."""
        self.heads.load_state_dict(state["heads"])
        self.global_step = int(state["global_step"])

    def checkpoint_written(self, directory: str) -> None:
        """Chief: ``directory`` is now the last complete checkpoint (or the one resumed from)."""
        self.last_checkpoint_path = directory

    def checkpoint_uploaded(self, uuid: str) -> None:
        """Every rank, after each checkpoint: its id, and the replica check."""
        self.last_checkpoint = uuid
        self.check_replicas(uuid)  # every rank: identical networks, or a clear error

    # ----------------------------------------------------------------- training
    def train_batch(self, batch: Any, epoch_idx: int, batch_idx: int) -> Dict[str, Any]:
        """One step without a host synchronisation, except at a check of the non-finite watch: the
        device's metrics go to the reducer, and what is returned (Determined's harness calls
        ``.cpu()`` on any tensor in it) holds only host numbers."""
        # batch_idx restarts at 0 after a local resume; self.global_step is restored from checkpoints.
        step = self.global_step
        loss, backward_loss, metrics = self.step_loss(batch, step)
        # The loss is read on the host only every finite_check_period steps and at the end of each
        # training workload (before any validation or checkpoint), together with a stop request
        # (SIGTERM/SIGINT, stops.py): nonfinite.py. One process needs no agreement to stop.
        self.finite_watch.record(loss, step)
        if self.finite_watch.due(step) or (self.world_size == 1 and stops.REQUEST.requested):
            self.check_finite_loss()  # before this step's update: every rank stops at the same step
        self.context.backward(backward_loss)
        self.context.step_optimizer(self.optimizer)
        self.step_metrics.update(loss=loss, **{name: metrics.pop(name) for name in self.device_metrics})
        metrics.update(self.after_step(step))
        self.global_step += 1
        metrics["images_per_second"] = self._throughput()
        return metrics

    def check_finite_loss(self) -> None:
        """Raises :class:`nonfinite.NonFiniteLossError` naming the first step whose loss was not finite, on every
        rank at once (a collective with several processes); a stop asked of any rank is agreed here."""
        bad, stop = self.finite_watch.agree(self.rank, self.world_size, stops.REQUEST.signal or 0)
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

    def _throughput(self) -> float:
        """Images per second of the last step; every 5 s (and at the first and last step) rank 0
        prints a progress line with the loss the last non-finite check read (no read of its own)."""
        now = time.time()
        rate = self.global_batch_size / max(now - self._last_time, 1e-9)
        self._last_time = now
        if self._time_left is None:
            self._time_left = progress.Remaining(self.total_steps, self.global_step)
        if self.rank == 0 and (now - self._last_print > 5 or self.global_step in (1, self.total_steps)):
            self._last_print = now
            read = self.finite_watch.last_read
            loss = f" loss {read[1]:.4f} at step {read[0] + 1}" if read else ""
            print(f"[train] step {self.global_step}/{self.total_steps} "
                  f"(epoch {self.global_step / self.steps_per_epoch:.2f}){loss} "
                  f"{rate:.0f} images/s, {self._time_left.text(self.global_step)}", flush=True)
        return rate

    # ----------------------------------------------------------------- validation (linear_eval.py)
    def evaluation_reducer(self):
        return self.evaluation.evaluation_reducer()

    def evaluate_batch(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        return self.evaluation.evaluate_batch(batch, batch_idx)


class BYOLTrial(TrialBase):
    """SELF_SUPERVISED: BYOL pretraining (section 3) with LARS, the cosine learning-rate and EMA
    schedules (section 3.3) and the reference's online classifier on sg(y) as a training metric;
    before each validation fresh linear-evaluation heads are trained on frozen features (appendix C.1)."""

    pretraining = True
    modes = (TrainingMode.SELF_SUPERVISED,)
    batch_key = "global_batch_size"
    device_metrics = ("online_classifier_accuracy", "online_classifier_loss")

    @property
    def global_batch_size(self) -> int:
        return self.settings.global_batch_size

    @property
    def learner(self) -> BYOL:
        return getattr(self.model, "module", self.model)

    def build_model(self, encoder: torch.nn.Module, feature_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        s, context = self.settings, self.context
        # The reference's online classifier on sg(y): a training metric at every step (byol.py).
        learner = BYOL(encoder, s.image_size, hidden_layer=None, projection_size=s.projection_size,
                       projection_hidden_size=s.projection_hidden_size, feature_size=feature_size,
                       num_classes=self.info.num_classes, init=s.init)
        if self.synced_batch_norm:
            # Global-batch statistics in encoder, projector and predictor (online and target):
            # one all_reduce per layer, on every device (sync_batchnorm.py).
            learner = sync_batchnorm.convert_sync_batchnorm(learner)
        if self.channels_last:
            learner = performance.to_channels_last(learner)
        model = context.wrap_model(learner)
        self.heads.to(self.device)
        # Section 3.3: base_lr x batch / 256, the peak of the groups' schedule (optim.apply_schedule).
        peak_lr = optim.scaled_learning_rate(s.base_lr, s.global_batch_size)
        groups = optim.lars_param_groups(
            ((n, p) for n, p in learner.named_parameters() if not n.startswith("target_")), s.weight_decay,
            peak_lr=peak_lr)
        optimizer = context.wrap_optimizer(
            optim.LARS(groups, lr=peak_lr, momentum=s.momentum, weight_decay=s.weight_decay, eta=s.lars_eta))
        return model, optimizer

    def readout(self) -> Dict[str, torch.nn.Module]:
        return {"learner": self.learner, "heads": self.heads}

    def training_collate(self) -> Optional[Callable]:
        # data.decode: device: the workers deliver JPEG bytes (jpeg_decode.py) ...
        return jpeg_decode.collate_encoded if self.settings.data.decode == "device" else None

    def training_prepare(self) -> Optional[Callable]:
        # ... decoded and cropped by the prefetcher, a batch ahead, on a side CUDA stream: step_loss
        # receives uint8 views already on the device.
        if self.settings.data.decode != "device":
            return None
        return functools.partial(jpeg_decode.decode_batch, image_size=self.settings.image_size, device=self.device)

    def step_loss(self, batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        s = self.settings
        (view1, view2), labels = batch  # data.decode: device: decoded by the prefetcher (training_prepare)
        lr = optim.apply_schedule(self.optimizer, step, self.total_steps, round(s.warmup_epochs * self.steps_per_epoch))
        floats, kernels = self.view_parameters(self.photometric, (SeedStream.VIEW1, SeedStream.VIEW2), view1.shape[0])
        loss, classifier_loss, classifier_accuracy = self.step_call(
            self.to_device(view1), self.to_device(view2), floats, kernels, self.to_device(labels))
        # Accuracy on this training batch's labelled images (STL-10's unlabeled ones are skipped).
        metrics = {"lr": lr, "online_classifier_accuracy": classifier_accuracy.detach(),
                   "online_classifier_loss": classifier_loss.detach()}
        # The online classifier's loss trains only the classifier (its input is sg(y)).
        return loss, loss + classifier_loss, metrics

    def forward_step(self, view1: torch.Tensor, view2: torch.Tensor, floats: torch.Tensor, kernels: torch.Tensor,
                     labels: torch.Tensor) -> tuple:
        """Both photometric views in one pipeline (T and T', table 6), then the learner's loss and
        its online classifier's loss and accuracy (section 3.1)."""
        view1, view2 = self.photometric((view1, view2), floats, kernels, channels_last=self.channels_last)
        with performance.autocast(self.device, self.settings.precision):
            return self.model(view1, view2, labels=labels)

    def after_step(self, step: int) -> Dict[str, Any]:
        s = self.settings
        tau = optim.cosine_schedule(step, self.total_steps, s.tau_base, 1.0)  # section 3.2: tau_base -> 1
        self.learner.update_moving_average(tau)
        if self.world_size > 1 and not self.synced_batch_norm:
            # Per-process batch statistics: keep rank 0's, so replicas stay identical (replicas.py).
            replicas.broadcast_buffers(self.learner)
        return {"tau": tau}


class HeadsTrial(TrialBase):
    """CLASSIFIER_ONLY: linear heads on a frozen encoder loaded from a BYOL checkpoint (appendix C.1);
    FINE_TUNE: encoder and head trained together (appendix C.2). One head per learning rate; the
    harness trains them, and validation scores each (``linear_eval.LinearEvaluation``)."""

    modes = (TrainingMode.CLASSIFIER_ONLY, TrainingMode.FINE_TUNE)
    batch_key = "classifier.batch_size"

    @property
    def global_batch_size(self) -> int:
        return self.settings.classifier.batch_size

    def build_model(self, encoder: torch.nn.Module, feature_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        s, context = self.settings, self.context
        checkpoints.load_pretrained_encoder(encoder, s, context)
        fine_tune = s.training_mode == TrainingMode.FINE_TUNE
        if fine_tune and self.synced_batch_norm:  # a frozen encoder (CLASSIFIER_ONLY) keeps eval-mode BN
            encoder = sync_batchnorm.convert_sync_batchnorm(encoder)
        if self.channels_last:
            encoder = performance.to_channels_last(encoder)
        model = context.wrap_model(EncoderWithHeads(encoder, self.heads, fine_tune))
        encoder_lr = optim.scaled_learning_rate(s.classifier.encoder_lr, s.classifier.batch_size)
        extra = ([{"params": list(encoder.parameters()), "lr": encoder_lr, "initial_lr": encoder_lr}]
                 if fine_tune else [])
        optimizer = context.wrap_optimizer(classifier.heads_optimizer(
            self.heads, s.classifier.learning_rates, s.classifier.batch_size, s.classifier.momentum,
            s.classifier.weight_decay, extra))
        return model, optimizer

    def readout(self) -> Dict[str, torch.nn.Module]:
        return {"model": self.model}

    @property
    def cached_features(self) -> bool:
        """Linear protocol without augmentation: every epoch sees the same frozen features, so they are
        extracted once (``LinearEvaluation.classifier_train_features``, as before each pretraining
        validation) and the heads train on them; the batches are the image path's (same sampler)."""
        s = self.settings
        return s.training_mode == TrainingMode.CLASSIFIER_ONLY and s.classifier.augmentation == "none"

    def build_training_data_loader(self):
        if not self.cached_features:
            return super().build_training_data_loader()
        encoder = getattr(self.model, "module", self.model).encoder
        features, labels = self.evaluation.classifier_train_features(encoder, self.train_dataset)
        # Indexed by the sampler's (index, seed) pairs; no transform.
        cached = SeededTransformDataset(torch.utils.data.TensorDataset(features.cpu(), labels.cpu()), None)
        return loaders.LazyTrainingLoader(cached, lambda: BatchesUntil(self._sampler(self.global_step),
                                                                       self.total_steps), 0, self.device)

    def step_loss(self, batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        s = self.settings
        images, labels = batch
        optim.apply_schedule(self.optimizer, step, self.total_steps)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.cached_features:  # frozen features (build_training_data_loader): the heads alone
            logits = self.model(self.to_device(images), precomputed=True)
            loss = classifier.heads_loss(logits.float(), self.to_device(labels), s.classifier.logit_regularization)
            return loss, loss, {"lr": lr}
        parameters = ()
        if s.classifier.augmentation == "variant":  # appendix C.1: the pretraining augmentations
            parameters = self.view_parameters(self.photometric, (SeedStream.HEAD_VARIANT,), images.shape[0])
        loss = self.step_call(self.to_device(images), self.to_device(labels), *parameters)
        return loss, loss, {"lr": lr}

    def forward_step(self, images: torch.Tensor, labels: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        """Photometric view (``classifier.augmentation: variant``, given its packed parameters) or
        plain normalisation, then the heads' loss (appendix C.1)."""
        s = self.settings
        if parameters:
            (images,) = self.photometric((images,), *parameters, channels_last=self.channels_last)
        else:
            images = self.normalize(images)
            images = performance.images_channels_last(images) if self.channels_last else images
        with performance.autocast(self.device, s.precision):
            logits = self.model(images)
        return classifier.heads_loss(logits.float(), labels, s.classifier.logit_regularization)


def build_trial(context: pytorch.PyTorchTrialContext, settings: Optional[Settings] = None) -> TrialBase:
    """The trial for ``context`` (and ``settings``, or those of its hyperparameters): a
    :class:`BYOLTrial` for SELF_SUPERVISED, a :class:`HeadsTrial` for CLASSIFIER_ONLY and FINE_TUNE."""
    settings = settings or parse_settings(context.get_hparams(), context.get_data_config(), context.distributed.size)
    trial_class = BYOLTrial if settings.training_mode == TrainingMode.SELF_SUPERVISED else HeadsTrial
    return trial_class(context, settings)


def main(argv=None) -> int:
    return launch.main(argv, build_trial)


if __name__ == "__main__":
    sys.exit(main())
