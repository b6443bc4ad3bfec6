"""Validation of the BYOL trial: the linear read-out of the representation (appendix C.1).

The trial creates and owns one :class:`LinearEvaluation`, handed what it needs (settings, context,
device, evaluation set, normalisation, photometric views, the global step, seeded randomness) and
what it reads out: during pretraining the BYOL learner (section 3) and the linear-evaluation heads,
otherwise the trial's encoder-with-heads model. :class:`LinearEvaluationCallback` forwards
Determined's two hooks around each validation to it.

During pretraining, before each validation (:meth:`LinearEvaluation.prepare`), fresh
linear-evaluation heads (one per learning rate) are trained on frozen CLS_TRAIN features; the
validation loop then scores every head on CLS_VALIDATION and TEST, and
``reducers.ValidatedAccuracyReducer`` reports ``test_accuracy`` for the head best on CLS_VALIDATION.
The same features can serve as a kNN bank (``classifier.knn_k``). Without classifier validation,
validation reports the BYOL loss (eq. 4) on CLS_VALIDATION images, which are then held out of
pretraining (``loaders.training_dataset``): model selection never looks at TEST. In CLASSIFIER_ONLY
(appendix C.1) and FINE_TUNE (appendix C.2) the heads trained by the harness are scored the same way.

Every figure is exact across processes: evaluation data is sharded without padding, reducers carry
counts, and the random views of the validation loss are drawn for the whole evaluation set.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Dict, Optional, Sequence

import torch
from determined import pytorch

import backbone as backbones
from data import Split
from reducers import ValidatedAccuracyReducer, WeightedMeanReducer
from runtime import classifier, faults, feature_probes, knn, loaders
from runtime.progress import progress
from runtime.sampling import SeedStream, ShardSampler, mix_seed

# The metrics of the ``[validate]`` line printed after each validation.
SHOWN_METRICS = ("test_accuracy", "validation_accuracy", "test_top5_accuracy", "best_classifier_lr",
                 "knn_accuracy", "validation_byol_loss")


class LinearEvaluation:
    """The trial's validation: its data loader, reducers and loop, and during pretraining the
    linear-evaluation heads and the kNN bank prepared before each validation.

    Read-out: ``learner`` (the unwrapped BYOL learner, whose online encoder is evaluated) and
    ``heads`` (trained here on its frozen features) during pretraining; otherwise ``model``, the
    trial's wrapped encoder with heads, trained by the harness. ``global_step()`` gives the trial's
    global step; ``seeded(stream)`` is a context manager seeding the global RNG by (seed, global
    step, stream).
    """

    def __init__(self, *, settings, context: pytorch.PyTorchTrialContext, device: torch.device, rank: int,
                 world_size: int, dataset, normalize: torch.nn.Module, augmentations: Sequence[torch.nn.Module],
                 num_classes: int, global_step: Callable[[], int], seeded: Callable[[int], ContextManager],
                 learner: Optional[torch.nn.Module] = None, heads: Optional[classifier.LinearHeads] = None,
                 model: Optional[torch.nn.Module] = None) -> None:
        if (learner is None) == (model is None) or (learner is None) != (heads is None):
            raise ValueError("LinearEvaluation reads out either a learner with heads (pretraining) or a model")
        self.settings, self.context, self.device = settings, context, device
        self.rank, self.world_size = rank, world_size
        self.dataset, self.normalize, self.augmentations = dataset, normalize, tuple(augmentations)
        self.num_classes, self.global_step, self.seeded = num_classes, global_step, seeded
        self.learner, self.heads, self.model = learner, heads, model
        self.last_validation: Dict[str, Any] = {}
        self.knn_bank: Optional[knn.FeatureBank] = None  # CLS_TRAIN features, during validation only
        self._view_parameters: tuple = (None, None)  # (step, per-view parameters for the evaluation set)
        self._register_reducers()

    @property
    def pretraining(self) -> bool:
        return self.learner is not None

    # ------------------------------------------------------------------ data
    @property
    def batch_size(self) -> int:
        return max(self.settings.classifier.batch_size // self.world_size, 1)

    def data_loader(self):
        return loaders.sharded_loader(self.dataset, self.batch_size, self.rank, self.world_size,
                                      self.settings.data.num_workers, self.device.type == "cuda")

    def _evaluation_positions(self, batch_idx: int, size: int) -> torch.Tensor:
        """Where this rank's validation batch lies in the whole evaluation set (contiguous shards)."""
        first = ShardSampler(len(self.dataset), self.rank, self.world_size).start
        first += batch_idx * self.batch_size
        return torch.arange(first, first + size)

    def _evaluation_views(self, images: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Photometric views whose random parameters are drawn once per validation for the whole
        evaluation set (seeded by seed and step) and picked by each image's position in it, so the
        validation BYOL loss is the same for any number of processes."""
        if self._view_parameters[0] != self.global_step():
            with self.seeded(SeedStream.EVALUATION_VIEWS):
                drawn = [augment.sample_parameters(len(self.dataset)) for augment in self.augmentations]
            self._view_parameters = (self.global_step(), drawn)
        view1, view2 = (augment(images, augment.select(drawn, positions.cpu()))
                        for augment, drawn in zip(self.augmentations, self._view_parameters[1]))
        return view1, view2

    # ------------------------------------------------------------------ around each validation
    def prepare(self) -> None:
        """Before each pretraining validation: CLS_TRAIN features, extracted once, train fresh
        linear-evaluation heads (``classifier_validation``) and become the kNN bank
        (``classifier.knn_k > 0``). Nothing to do outside pretraining (the harness trains the heads)."""
        s = self.settings
        if not self.pretraining or not (s.classifier_validation or s.classifier.knn_k):
            return
        features, labels = self.classifier_train_features(self.learner.online_encoder)
        if s.classifier_validation:
            self.train_heads(features, labels)
        if s.classifier.knn_k:
            self.knn_bank = knn.FeatureBank(features, labels, self.num_classes)

    def finish(self, metrics: Dict[str, Any]) -> None:
        """After each validation: records its metrics, prints them (rank 0) and frees the kNN bank."""
        self.last_validation = dict(metrics)
        if self.rank == 0:
            shown = {k: v for k, v in metrics.items() if k in SHOWN_METRICS and isinstance(v, (int, float))}
            print(f"[validate] step {self.global_step()}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in sorted(shown.items())), flush=True)
        self.knn_bank = None  # frees the CLS_TRAIN features until the next validation

    def classifier_train_features(self, encoder: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features and labels of all of CLS_TRAIN (gathered from every rank, in dataset order)."""
        s = self.settings
        dataset = faults.ReadGuard(loaders.classifier_feature_dataset(s, s.image_size))
        loader = loaders.sharded_loader(dataset, self.batch_size, self.rank, self.world_size,
                                        s.data.num_workers)
        features, labels = classifier.extract_features(encoder, loader, self.device, self.normalize,
                                                       desc="CLS_TRAIN features")
        return classifier.gather_rows(features), classifier.gather_rows(labels)

    def train_heads(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Fresh linear-evaluation heads on frozen features (appendix C.1); returns their final loss."""
        s = self.settings
        return classifier.train_heads_on_features(
            self.heads, features, labels, s.classifier.learning_rates, s.classifier.train_epochs,
            s.classifier.batch_size, mix_seed(s.seed, self.global_step()), s.classifier.momentum,
            s.classifier.weight_decay, s.classifier.logit_regularization)

    # ------------------------------------------------------------------ after pretraining
    @torch.no_grad()
    def representation_splits(self, encoder: Optional[torch.nn.Module], name: str = "") -> Dict[str, tuple]:
        """``{split: (x, y)}`` numpy arrays for CLS_TRAIN, CLS_VALIDATION and TEST (gathered from
        every rank in dataset order): the frozen features of ``encoder``, or raw pixels (None);
        ``name`` labels the progress lines."""
        s = self.settings
        if encoder is not None:
            encoder.eval()
        represent = (lambda images: encoder(self.normalize(images)).float()) if encoder is not None else (
            lambda images: images.flatten(1).float() / 255.0)
        splits = {}
        dataset = faults.ReadGuard(loaders.classifier_feature_dataset(s, s.image_size))
        features, labels = [], []
        loader = loaders.sharded_loader(dataset, self.batch_size, self.rank, self.world_size, s.data.num_workers)
        for images, targets in progress(loader, f"{name} CLS_TRAIN".strip(), unit="batch"):
            features.append(represent(images.to(self.device)))
            labels.append(targets.to(self.device))
        splits[Split.CLS_TRAIN.value] = (torch.cat(features), torch.cat(labels))
        features, labels, tags = [], [], []
        for images, targets, tag in progress(self.data_loader(), f"{name} CLS_VALIDATION and TEST".strip(),
                                             unit="batch"):
            features.append(represent(images.to(self.device)))
            labels.append(targets.to(self.device))
            tags.append(tag.to(self.device))
        features, labels, tags = torch.cat(features), torch.cat(labels), torch.cat(tags)
        held_out = tags == loaders.VALIDATION_TAG
        splits[Split.CLS_VALIDATION.value] = (features[held_out], labels[held_out])
        splits[Split.TEST.value] = (features[tags == loaders.TEST_TAG], labels[tags == loaders.TEST_TAG])
        return {name: tuple(classifier.gather_rows(t).cpu().numpy() for t in pair) for name, pair in splits.items()}

    def compare_representations(self) -> Dict[str, Dict[str, float]]:
        """After pretraining: the BYOL encoder, a randomly initialised one and raw pixels, each read
        out by the same feature probe that is fair to all of them (``feature_probes.compare_representations``:
        standardised features, logistic regression, C chosen on CLS_VALIDATION), with all labels
        and with 5 and 10 labels per class. Runs on every rank (collectives); rank 0 probes."""
        if not self.pretraining:
            raise ValueError("compare_representations reads out a BYOL learner: pretraining only")
        s = self.settings
        torch.manual_seed(mix_seed(s.seed, SeedStream.RANDOM_ENCODER))
        random_encoder = backbones.build_backbone(s.backbone).to(self.device)
        encoders = {"BYOL encoder": self.learner.online_encoder, "random-init encoder": random_encoder,
                    "raw pixels": None}
        representations = {name: self.representation_splits(encoder, f"comparison: {name},")
                           for name, encoder in encoders.items()}
        self.learner.online_encoder.train()
        if self.rank != 0:
            return {}
        return feature_probes.compare_representations(representations, seed=s.seed)

    # ------------------------------------------------------------------ reducers and the loop
    @property
    def scores_heads(self) -> bool:
        """Whether validation scores linear heads (else it reports the validation BYOL loss)."""
        return not self.pretraining or self.settings.classifier_validation

    def evaluation_reducer(self):
        return pytorch.Reducer.AVG

    def _register_reducers(self) -> None:
        """Only the reducers whose metrics this run reports (an unused one would report NaN)."""
        s = self.settings
        self._accuracy_reducer = self._loss_reducer = self._knn_reducer = None
        if self.scores_heads:
            self._accuracy_reducer = self.context.wrap_reducer(
                ValidatedAccuracyReducer(s.classifier.learning_rates), name=None, for_training=False)
        else:
            self._loss_reducer = self.context.wrap_reducer(
                WeightedMeanReducer(), name="validation_byol_loss", for_training=False)
        if self.pretraining and s.classifier.knn_k:
            self._knn_reducer = self.context.wrap_reducer(WeightedMeanReducer(), name="knn_accuracy",
                                                          for_training=False)

    @staticmethod
    def _count_correct(reducer, logits: torch.Tensor, labels: torch.Tensor, tags: torch.Tensor) -> None:
        for tag, split in ((loaders.VALIDATION_TAG, "validation"), (loaders.TEST_TAG, "test")):
            mask = tags == tag
            if mask.any():
                top1, top5 = classifier.correct_counts(logits[:, mask], labels[mask])
                reducer.update(split, top1, top5, int(mask.sum()))

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """Every head's logits for normalised images."""
        if self.model is not None:  # CLASSIFIER_ONLY / FINE_TUNE: the harness's encoder with heads
            return self.model(images)
        return self.heads(self.learner.online_encoder(images))

    def evaluate_batch(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        images_uint8, labels, tags = batch
        images_uint8 = images_uint8.to(self.device, non_blocking=True)
        labels, tags = labels.to(self.device), tags.to(self.device)
        test = tags == loaders.TEST_TAG
        if self.knn_bank is not None and test.any():  # kNN read-out on TEST against CLS_TRAIN (knn.py)
            queries = self.learner.online_encoder(self.normalize(images_uint8[test]))
            correct = self.knn_bank.correct(queries, labels[test], self.settings.classifier.knn_k)
            self._knn_reducer.update(correct, int(test.sum()))
        if not self.scores_heads:
            held_out = tags == loaders.VALIDATION_TAG
            if held_out.any():  # the BYOL loss (eq. 4) on CLS_VALIDATION, photometric views only
                positions = self._evaluation_positions(batch_idx, images_uint8.shape[0])[held_out.cpu()]
                view1, view2 = self._evaluation_views(images_uint8[held_out], positions)
                count = int(held_out.sum())
                # The unwrapped learner: a rank whose shard holds no CLS_VALIDATION image never calls
                # the model, so DDP's forward (which broadcasts buffers, a collective) must not run
                # here or the other ranks would wait for it forever. Evaluation needs no collective.
                self._loss_reducer.update(self.learner(view1, view2).item() * count, count)
            return {}
        self._count_correct(self._accuracy_reducer, self._logits(self.normalize(images_uint8)), labels, tags)
        return {}


class LinearEvaluationCallback(pytorch.PyTorchCallback):
    """Determined's only hooks around a validation, forwarded to the trial's :class:`LinearEvaluation`."""

    def __init__(self, evaluation: LinearEvaluation) -> None:
        self.evaluation = evaluation

    def on_validation_start(self) -> None:
        self.evaluation.prepare()  # linear-evaluation heads and/or the kNN bank, as configured

    def on_validation_end(self, metrics: Dict[str, Any]) -> None:
        self.evaluation.finish(metrics)
