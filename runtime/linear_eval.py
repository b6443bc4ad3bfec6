"""Validation of the BYOL trial: the linear read-out of the representation (appendix C.1).

During pretraining, before each validation, fresh linear heads (one per learning rate) are trained
on frozen CLS_TRAIN features; the validation loop then scores every head on CLS_VALIDATION and TEST,
and ``reducers.ValidatedAccuracyReducer`` reports ``test_accuracy`` for the head best on
CLS_VALIDATION. The same features can serve as a kNN bank (``classifier.knn_k``). Without
classifier validation, validation reports the BYOL loss (eq. 4) on CLS_VALIDATION images, which are
then held out of pretraining (``loaders.training_dataset``): model selection never looks at TEST. In CLASSIFIER_ONLY and
FINE_TUNE the heads trained by the harness are scored the same way.

Every figure is exact across processes: evaluation data is sharded without padding, reducers carry
counts, and the random views of the validation loss are drawn for the whole evaluation set.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from determined import pytorch

import backbone as backbones
from runtime import classifier
from runtime import faults
from runtime import knn
from runtime import loaders
from reducers import ValidatedAccuracyReducer, WeightedMeanReducer
from runtime.sampling import ShardSampler, mix_seed
from data import Split
from runtime import feature_probes

# Seed streams of the trial's randomness (mix_seed(seed, step, stream)).
EVALUATION_VIEWS_STREAM = -3


class ValidationMixin:
    """The validation half of ``model_def.BYOLTrial`` (uses its settings, model, heads, context)."""

    # ------------------------------------------------------------------ data
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

    def _evaluation_views(self, images: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Photometric views whose random parameters are drawn once per validation for the whole
        evaluation set (seeded by seed and step) and picked by each image's position in it, so the
        validation BYOL loss is the same for any number of processes."""
        if self._view_parameters[0] != self.global_step:
            with self.seeded(EVALUATION_VIEWS_STREAM):
                drawn = [augment.sample_parameters(len(self.eval_dataset))
                         for augment in (self.augment1, self.augment2)]
            self._view_parameters = (self.global_step, drawn)
        view1, view2 = (augment(images, augment.select(drawn, positions.cpu()))
                        for augment, drawn in zip((self.augment1, self.augment2), self._view_parameters[1]))
        return view1, view2

    # ------------------------------------------------------------------ probe heads and kNN bank
    def prepare_probes(self) -> None:
        """Before each pretraining validation: CLS_TRAIN features, extracted once, train fresh probe
        heads (``classifier_validation``) and become the kNN bank (``classifier.knn_k > 0``)."""
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
        loader = loaders.sharded_loader(dataset, self._evaluation_batch, self.rank, self.world_size,
                                        s.data.num_workers)
        features, labels = classifier.extract_features(encoder, loader, self.device, self.normalize,
                                                       desc="CLS_TRAIN features")
        return classifier.gather_rows(features), classifier.gather_rows(labels)

    def train_probe_heads(self, encoder: Optional[torch.nn.Module] = None,
                          heads: Optional[classifier.LinearHeads] = None,
                          features: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        """Fresh heads on frozen features: ``features`` (features, labels) if given, else those of
        ``encoder`` (default: the online encoder)."""
        s = self.settings
        encoder = encoder if encoder is not None else self.learner.online_encoder
        heads = heads if heads is not None else self.heads
        features, labels = features if features is not None else self.classifier_train_features(encoder)
        self.probe_loss = classifier.train_heads_on_features(
            heads, features, labels, s.classifier.learning_rates, s.classifier.train_epochs,
            s.classifier.batch_size, mix_seed(s.seed, self.global_step), s.classifier.momentum,
            s.classifier.weight_decay, s.classifier.logit_regularization)

    @torch.no_grad()
    def representation_splits(self, encoder: Optional[torch.nn.Module]) -> Dict[str, tuple]:
        """``{split: (x, y)}`` numpy arrays for CLS_TRAIN, CLS_VALIDATION and TEST (gathered from
        every rank in dataset order): the frozen features of ``encoder``, or raw pixels (None)."""
        s = self.settings
        if encoder is not None:
            encoder.eval()
        represent = (lambda images: encoder(self.normalize(images)).float()) if encoder is not None else (
            lambda images: images.flatten(1).float() / 255.0)
        splits = {}
        dataset = faults.ReadGuard(loaders.classifier_feature_dataset(s, s.image_size))
        features, labels = [], []
        for images, targets in loaders.sharded_loader(dataset, self._evaluation_batch, self.rank, self.world_size,
                                                      s.data.num_workers):
            features.append(represent(images.to(self.device)))
            labels.append(targets.to(self.device))
        splits[Split.CLS_TRAIN.value] = (torch.cat(features), torch.cat(labels))
        features, labels, tags = [], [], []
        for images, targets, tag in self.build_validation_data_loader():
            features.append(represent(images.to(self.device)))
            labels.append(targets.to(self.device))
            tags.append(tag.to(self.device))
        features, labels, tags = torch.cat(features), torch.cat(labels), torch.cat(tags)
        splits[Split.CLS_VALIDATION.value] = (features[tags == loaders.VALIDATION_TAG], labels[tags == loaders.VALIDATION_TAG])
        splits[Split.TEST.value] = (features[tags == loaders.TEST_TAG], labels[tags == loaders.TEST_TAG])
        return {name: tuple(classifier.gather_rows(t).cpu().numpy() for t in pair) for name, pair in splits.items()}

    def compare_representations(self) -> Dict[str, Dict[str, float]]:
        """After pretraining: the BYOL encoder, a randomly initialised one and raw pixels, each read
        out by the same probe that is fair to all of them (``feature_probes.compare_representations``:
        standardised features, logistic regression, C chosen on CLS_VALIDATION), with all labels
        and with 5 and 10 labels per class. Runs on every rank (collectives); rank 0 probes."""
        s = self.settings
        torch.manual_seed(mix_seed(s.seed, 99))
        random_encoder = backbones.build_backbone(s.backbone).to(self.device)
        representations = {"BYOL encoder": self.representation_splits(self.learner.online_encoder),
                           "random-init encoder": self.representation_splits(random_encoder),
                           "raw pixels": self.representation_splits(None)}
        self.learner.online_encoder.train()
        if self.rank != 0:
            return {}
        return feature_probes.compare_representations(representations, seed=s.seed)

    # ------------------------------------------------------------------ reducers and the loop
    @property
    def probes_accuracy(self) -> bool:
        return not self.pretraining or self.settings.classifier_validation

    def evaluation_reducer(self):
        return pytorch.Reducer.AVG

    def register_reducers(self) -> None:
        """Only the reducers whose metrics this run reports (an unused one would report NaN)."""
        s = self.settings
        self._accuracy_reducer = self._loss_reducer = self._knn_reducer = None
        if self.probes_accuracy:
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

    def evaluate_batch(self, batch: Any, batch_idx: int) -> Dict[str, Any]:
        images_uint8, labels, tags = batch
        images_uint8 = images_uint8.to(self.device, non_blocking=True)
        labels, tags = labels.to(self.device), tags.to(self.device)
        test = tags == loaders.TEST_TAG
        if self.knn_bank is not None and test.any():  # kNN read-out on TEST against CLS_TRAIN (knn.py)
            queries = self.learner.online_encoder(self.normalize(images_uint8[test]))
            correct = self.knn_bank.correct(queries, labels[test], self.settings.classifier.knn_k)
            self._knn_reducer.update(correct, int(test.sum()))
        if not self.probes_accuracy:
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
        images = self.normalize(images_uint8)
        if self.pretraining:
            logits = self.heads(self.learner.online_encoder(images))
        else:
            logits = self.model(images)
        self._count_correct(self._accuracy_reducer, logits, labels, tags)
        return {}
