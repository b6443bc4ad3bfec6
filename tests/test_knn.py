"""knn.py: the weighted cosine kNN rule (InstDisc / DINO, T = 0.07) against a brute-force reference."""
import pytest
import torch

from runtime import knn


def _brute_force_knn(bank, bank_labels, queries, k, classes, temperature=0.07):
    bank = torch.nn.functional.normalize(bank, dim=1)
    predictions = []
    for query in torch.nn.functional.normalize(queries, dim=1):
        sims = bank @ query
        order = sorted(range(len(sims)), key=lambda i: -float(sims[i]))[:k]
        votes = [0.0] * classes
        for i in order:
            votes[int(bank_labels[i])] += float(torch.exp(sims[i] / temperature))
        predictions.append(max(range(classes), key=lambda c: votes[c]))
    return torch.tensor(predictions)


def test_knn_weights_close_neighbours_over_majority():
    # One neighbour at similarity 1 (class 0) outweighs two at 0.5 (class 1): exp(1/T) >> 2 exp(0.5/T).
    bank = torch.tensor([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]])
    fb = knn.FeatureBank(bank, torch.tensor([0, 1, 1]), num_classes=2)
    assert fb.predict(torch.tensor([[3.0, 0.0]]), k=3).tolist() == [0]
    # With a very high temperature the weights flatten and the majority wins.
    assert fb.predict(torch.tensor([[3.0, 0.0]]), k=3, temperature=100.0).tolist() == [1]


def test_knn_chunked_equals_brute_force():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 6, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    queries = torch.randn(13, 6, generator=generator)
    expected = _brute_force_knn(bank, labels, queries, 7, 4)
    for chunk in (1, 7, 50, 1000):
        fb = knn.FeatureBank(bank, labels, 4, chunk_size=chunk)
        assert fb.predict(queries, 7).tolist() == expected.tolist()
    sims, idx = knn.FeatureBank(bank, labels, 4, chunk_size=7).neighbours(queries, 7)
    full_sims, full_idx = knn.FeatureBank(bank, labels, 4).neighbours(queries, 7)
    assert torch.equal(idx, full_idx) and torch.allclose(sims, full_sims)
    accuracy = knn.knn_accuracy(bank, labels, queries, expected, k=7, num_classes=4)
    assert accuracy == 1.0
    # k larger than the bank uses the whole bank.
    assert knn.FeatureBank(bank, labels, 4).neighbours(queries, 500)[1].shape == (13, 50)


@pytest.mark.parametrize("features, labels, classes, message", [
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2, "empty"),
    (torch.zeros(2, 3), torch.tensor([0, 5]), 2, r"labels must lie in \[0, 2\)"),
    (torch.zeros(2, 3), torch.tensor([0]), 2, "features"),
])
def test_knn_bank_errors(features, labels, classes, message):
    with pytest.raises(ValueError, match=message):
        knn.FeatureBank(features, labels, classes)


def test_knn_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn.FeatureBank(torch.eye(2), torch.tensor([0, 1]), 2).predict(torch.eye(2), 0)
