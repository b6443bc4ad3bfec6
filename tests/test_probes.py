"""runtime/feature_probes.py on a synthetic features file: kNN and logistic regression beside PCA of pixels."""
import torch

import evaluate_result
from runtime import feature_probes


def _run(argv, capsys):
    code = evaluate_result.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _features_file(path, separable=True):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 4
    splits = {}
    for name, n in (("cls_train", 60), ("cls_validation", 30), ("test", 30)):
        labels = torch.arange(n) % 3
        noise = torch.randn(n, 16, generator=generator)
        features = centres[labels] + noise if separable else noise
        pixels = torch.randint(0, 256, (n, 3, 8, 8), generator=generator, dtype=torch.int64).to(torch.uint8)
        splits[name] = {"features": features, "labels": labels, "pixels": pixels}
    torch.save({"format": feature_probes.FEATURE_FILE_FORMAT, "checkpoint": "/ck", "backbone": "small_cnn",
                "dataset": "digits", "num_classes": 3, "splits": splits}, path)


def test_probe_separates_clustered_features_and_not_random_pixels(tmp_path, capsys):
    _features_file(tmp_path / "f.pt")
    results = feature_probes.run_probes(feature_probes.read_feature_file(str(tmp_path / "f.pt")), k=5)
    assert results["encoder"]["knn_accuracy"] == 1.0 and results["encoder"]["logreg_accuracy"] == 1.0
    assert results["pca16_pixels"]["knn_accuracy"] < 0.7 and results["pca16_pixels"]["dimensions"] == 16
    code, out, err = _run(["probe", "--features", str(tmp_path / "f.pt"), "--k", "5"], capsys)
    assert code == 0, err
    assert "weighted cosine 5-NN" in out and "pca16_pixels" in out and "logistic regression" in out


def test_probe_file_errors(tmp_path, capsys):
    code, _, err = _run(["probe", "--features", str(tmp_path / "none.pt")], capsys)
    assert code == 2 and "does not exist" in err
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    code, _, err = _run(["probe", "--features", str(tmp_path / "other.pt")], capsys)
    assert code == 2 and "not a features file" in err


def test_fair_comparison_probes_every_representation_alike_and_few_labels_per_class():
    """Scale does not decide the result (features are standardised): an informative representation
    multiplied by 1000 scores as the original; pure noise scores near chance; the few-label probe
    trains on exactly n images per class."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = {name: np.repeat(np.arange(3), size) for name, size in (("cls_train", 40), ("cls_validation", 10),
                                                                      ("test", 20))}
    centres = rng.normal(size=(3, 8)) * 3
    informative = {name: (centres[y] + rng.normal(size=(len(y), 8)), y) for name, y in labels.items()}
    representations = {"informative": informative,
                       "scaled": {name: (x * 1000.0, y) for name, (x, y) in informative.items()},
                       "noise": {name: (rng.normal(size=(len(y), 8)), y) for name, y in labels.items()}}
    results = feature_probes.compare_representations(representations, shots=(2,), draws=2)
    assert results["informative"]["all"] > 0.9 and results["informative"]["2_per_class"] > 0.8
    assert results["scaled"]["all"] == results["informative"]["all"]
    assert results["noise"]["all"] < 0.6 and results["informative"]["C"] in feature_probes.C_GRID
    rows = feature_probes.few_label_rows(labels["cls_train"], 2, draw=0)
    assert sorted(labels["cls_train"][rows].tolist()) == [0, 0, 1, 1, 2, 2]
    assert not np.array_equal(rows, feature_probes.few_label_rows(labels["cls_train"], 2, draw=1))
    table = feature_probes.format_comparison(results, shots=(2,), draws=2)
    assert "2 per class" in table and "noise" in table
