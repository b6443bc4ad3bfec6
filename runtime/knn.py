"""Weighted cosine k-nearest-neighbour classification of frozen features.

A cheap read-out of representation quality that needs no training: the representation y of the
BYOL encoder (section 3.1 of Grill et al. 2020, arXiv 2006.07733) is compared with a bank of
labelled training representations. It complements the paper's linear evaluation (section 4.1,
appendix C.1); the kNN rule itself is not from the BYOL paper but from instance discrimination
(Wu et al. 2018) as used by DINO (Caron et al. 2021):

* features and bank are L2-normalised, so the similarity s is the cosine similarity;
* each of the k most similar bank entries votes for its label with weight ``exp(s / T)``,
  T = 0.07;
* the prediction is the class with the largest summed weight.

The similarity matrix is computed against the bank in chunks, keeping a running top-k, so that a
large bank (ImageNet: 1.28 M entries) never needs a ``[batch, bank]`` matrix at once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from runtime.progress import progress

TEMPERATURE = 0.07
DEFAULT_CHUNK = 65536


class FeatureBank:
    """Normalised labelled features to classify queries against.

    ``features``: ``[N, D]``; ``labels``: ``[N]`` integer classes in ``[0, num_classes)``.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 chunk_size: int = DEFAULT_CHUNK):
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"the kNN bank needs features [N, D] and labels [N]; got {tuple(features.shape)} "
                             f"and {tuple(labels.shape)}")
        if features.shape[0] == 0:
            raise ValueError("the kNN bank is empty: the classifier training split has no images")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(f"kNN bank labels must lie in [0, {num_classes}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.features = F.normalize(features.float(), dim=1)
        self.labels = labels.long()
        self.num_classes = num_classes
        self.chunk_size = max(int(chunk_size), 1)

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def neighbours(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosine similarities ``[B, k']`` and bank indices ``[B, k']`` of the nearest entries
        (``k' = min(k, len(bank))``), most similar first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = F.normalize(queries.float().to(self.features.device), dim=1)
        k = min(k, len(self))
        best_sim: Optional[torch.Tensor] = None
        best_idx: Optional[torch.Tensor] = None
        for start in range(0, len(self), self.chunk_size):
            chunk = self.features[start:start + self.chunk_size]
            sim = queries @ chunk.T
            top_sim, top_idx = sim.topk(min(k, chunk.shape[0]), dim=1)
            top_idx = top_idx + start
            if best_sim is not None:
                top_sim = torch.cat([best_sim, top_sim], dim=1)
                top_idx = torch.cat([best_idx, top_idx], dim=1)
                top_sim, order = top_sim.topk(min(k, top_sim.shape[1]), dim=1)
                top_idx = top_idx.gather(1, order)
            best_sim, best_idx = top_sim, top_idx
        return best_sim, best_idx

    @torch.no_grad()
    def class_scores(self, queries: torch.Tensor, k: int, temperature: float = TEMPERATURE) -> torch.Tensor:
        """Summed ``exp(similarity / T)`` votes per class, ``[B, num_classes]``."""
        if temperature <= 0:
            raise ValueError(f"the kNN temperature must be > 0, got {temperature}")
        sim, idx = self.neighbours(queries, k)
        weights = (sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], self.num_classes, device=sim.device)
        return scores.scatter_add_(1, self.labels[idx], weights)

    def predict(self, queries: torch.Tensor, k: int, temperature: float = TEMPERATURE) -> torch.Tensor:
        return self.class_scores(queries, k, temperature).argmax(dim=1)

    def correct(self, queries: torch.Tensor, labels: torch.Tensor, k: int,
                temperature: float = TEMPERATURE) -> int:
        """How many queries get their label right (a count, so shards can be summed exactly)."""
        predictions = self.predict(queries, k, temperature)
        return int((predictions == labels.to(predictions.device)).sum())


def knn_accuracy(bank_features: torch.Tensor, bank_labels: torch.Tensor, query_features: torch.Tensor,
                 query_labels: torch.Tensor, k: int = 20, num_classes: Optional[int] = None,
                 temperature: float = TEMPERATURE) -> float:
    """Top-1 accuracy of the weighted cosine kNN rule on ``query_features``."""
    if query_features.shape[0] == 0:
        raise ValueError("no query features to classify")
    classes = num_classes or int(max(bank_labels.max(), query_labels.max())) + 1

    bank = FeatureBank(bank_features, bank_labels, classes)
    chunk = 1024
    correct = 0
    for start in progress(range(0, query_features.shape[0], chunk), f"{k}-NN", unit="chunk"):
        correct += bank.correct(query_features[start:start + chunk], query_labels[start:start + chunk], k, temperature)
    return correct / query_features.shape[0]
