"""Feature probes for fast iteration: frozen features once, then seconds-long read-outs.

``evaluate_result.py features --checkpoint DIR --out FEATURES.pt`` stores the frozen representation
y (Grill et al. 2020, arXiv 2006.07733, section 3.1) of CLS_TRAIN, CLS_VALIDATION and TEST, with
their labels and small (at most 32x32) uint8 copies of the images.
``evaluate_result.py probe --features FEATURES.pt [--k 20]`` then runs, on TEST:

* the weighted cosine kNN of ``knn.py`` (bank: CLS_TRAIN), and
* multinomial logistic regression, its L2 strength chosen on CLS_VALIDATION -- a quick stand-in
  for the linear protocol of appendix C.1 (which trains SGD heads on the accelerator; use
  ``evaluate_result.py --checkpoint DIR`` for the number to report),

beside the same two probes on PCA of the pixels (as many components as the encoder has features),
the baseline a representation has to beat. Both probes fit in memory: they are meant for the small
datasets and subsets one iterates on, not for ImageNet.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Dict, Sequence

import torch

import augment
import data
from runtime import checkpoints, knn, loaders
from runtime.checkpoints import checkpoint_config, load_encoder
from runtime.progress import progress
from runtime.sampling import SeededTransformDataset
from runtime.settings import TrainingMode, apply_overrides, parse_settings
from utils import InputError, atomic_output, check_not_input, check_output_file, inputs_of_config

FEATURE_FILE_FORMAT = "byol-features-v1"
PIXEL_SIZE = 32  # the PCA-of-pixels baseline works on at most 32x32 images


def extract_feature_file(directory: str, out: str, sets: Sequence[str] = (), batch_size: int = 256) -> Dict:
    """Frozen features, labels and small pixel copies of CLS_TRAIN, CLS_VALIDATION and TEST."""
    import torch.nn.functional as F

    check_not_input(out, "--out", {"the checkpoint read (--checkpoint)": directory})  # before a folder is made
    check_output_file(out, "--out")
    checkpoints.verify_checkpoint(directory, "--checkpoint")  # complete and unchanged, before anything else
    hparams, config = checkpoint_config(directory)
    data_section = dict(hparams.pop("data", None) or config.get("data") or {})
    apply_overrides(hparams, data_section, sets)
    check_not_input(out, "--out", {**inputs_of_config(hparams, data_section),
                                   "the checkpoint read (--checkpoint)": directory})
    hparams["training_mode"] = TrainingMode.SELF_SUPERVISED.value  # features of any mode's encoder
    settings = parse_settings(hparams, data_section)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = load_encoder(directory, settings.backbone).to(device).eval()
    info = data.dataset_info(settings.data.dataset, settings.data.root)
    normalize = augment.Normalize(info.mean, info.std).to(device)
    splits = {}
    for split in (data.Split.CLS_TRAIN, data.Split.CLS_VALIDATION, data.Split.TEST):
        transform = loaders.evaluation_transform(settings, settings.image_size)  # as the trial's validation
        dataset = SeededTransformDataset(loaders.base_dataset(settings, split), transform)
        feats, labels, pixels = [], [], []
        loader = loaders.sharded_loader(dataset, batch_size, 0, 1, settings.data.num_workers)
        with torch.no_grad():
            for images, targets in progress(loader, f"features {split.value}", total=len(loader), unit="batch"):
                feats.append(encoder(normalize(images.to(device))).float().cpu())
                labels.append(targets.long())
                small = images.float()
                if small.shape[-1] > PIXEL_SIZE:
                    small = F.interpolate(small, size=(PIXEL_SIZE, PIXEL_SIZE), mode="area")
                pixels.append(small.round().clamp(0, 255).to(torch.uint8))
        splits[split.value] = {"features": torch.cat(feats), "labels": torch.cat(labels), "pixels": torch.cat(pixels)}
    result = {"format": FEATURE_FILE_FORMAT, "checkpoint": os.path.abspath(directory), "backbone": settings.backbone,
              "dataset": settings.data.dataset, "num_classes": info.num_classes, "splits": splits}
    with atomic_output(out, "--out", "nothing else holds the features: free space and run `features` again") as stream:
        torch.save(result, stream)
    return result


def read_feature_file(path: str) -> Dict:
    """Loads a features file (tensors only: ``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features file {path!r} does not exist: write it with "
                                f"`evaluate_result.py features --checkpoint DIR --out {path}`")
    import pickle

    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise InputError(f"features file {path!r} cannot be read ({' '.join(str(error).split())[:200]}); "
                              f"write it again with `evaluate_result.py features`") from None
    if not isinstance(content, dict) or content.get("format") != FEATURE_FILE_FORMAT:
        raise InputError(f"{path!r} is not a features file of `evaluate_result.py features` "
                              f"(expected format {FEATURE_FILE_FORMAT!r})")
    return content


# Inverse L2 strengths tried on standardised features: wide enough for trained and random features
# and for pixels alike (the chosen C is reported; a choice at either end would say to widen it).
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


def logistic_regression_accuracy(train, validation, test, seed: int = 0, unlabelled=None) -> tuple[float, float]:
    """Multinomial logistic regression on standardised features; the L2 strength C is chosen on
    CLS_VALIDATION from :data:`C_GRID` (as the linear protocol chooses its learning rate) and the
    result reported on TEST. ``unlabelled`` (features only) gives the standardisation statistics
    when the labelled training set is tiny (default: ``train``). Returns ``(test accuracy, C)``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train[0] if unlabelled is None else unlabelled)
    train_x, validation_x = scaler.transform(train[0]), scaler.transform(validation[0])
    fitted = []
    # Ascending C, each fit starting from the previous solution (warm start): a few times faster.
    model = LogisticRegression(max_iter=200, random_state=seed, warm_start=True)
    for c in C_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.set_params(C=c).fit(train_x, train[1])
        fitted.append((model.score(validation_x, validation[1]), -c, copy.deepcopy(model)))
    _, negative_c, best = max(fitted, key=lambda item: item[:2])  # ties: the stronger regularisation
    return float(best.score(scaler.transform(test[0]), test[1])), -negative_c


def few_label_rows(labels, shots: int, draw: int, seed: int = 0):
    """Positions of ``shots`` images per class of ``labels``, a seeded draw (numpy array)."""
    import numpy as np

    rng = np.random.default_rng([seed, shots, draw])
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), size=min(shots, int((labels == c).sum())),
                                      replace=False) for c in np.unique(labels)])


def compare_representations(representations: Dict[str, Dict[str, tuple]], shots: Sequence[int] = (5, 10),
                            draws: int = 5, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """The same probe for every representation, fair to each: standardised features, logistic
    regression with C chosen on CLS_VALIDATION, TEST accuracy; with all CLS_TRAIN labels and with
    ``shots`` labels per class (mean over ``draws`` seeded draws; standardisation statistics from
    all of CLS_TRAIN, which needs no labels). ``representations``: name -> {split: (x, y)}."""
    results = {}
    fits = progress(desc="representation comparison", total=len(representations) * (1 + len(shots) * draws),
                    unit="probe fit")
    for name, splits in representations.items():
        train, validation, test = (splits[s.value] for s in (data.Split.CLS_TRAIN, data.Split.CLS_VALIDATION,
                                                              data.Split.TEST))
        accuracy, c = logistic_regression_accuracy(train, validation, test, seed)
        fits.update()
        row = {"all": accuracy, "C": c}
        for n in shots:
            scores = []
            for draw in range(draws):
                rows = few_label_rows(train[1], n, draw, seed)
                scores.append(logistic_regression_accuracy((train[0][rows], train[1][rows]), validation, test, seed,
                                                           unlabelled=train[0])[0])
                fits.update()
            row[f"{n}_per_class"] = sum(scores) / len(scores)
        results[name] = row
    fits.close()
    return results


def format_comparison(results: Dict[str, Dict[str, float]], shots: Sequence[int] = (5, 10), draws: int = 5) -> str:
    columns = ["all labels"] + [f"{n} per class" for n in shots]
    keys = ["all"] + [f"{n}_per_class" for n in shots]
    lines = ["[byol] the same probe for every representation (standardised features, logistic regression, "
             f"C chosen on CLS_VALIDATION; few-label columns: mean over {draws} draws): TEST accuracy",
             f"{'representation':<26}" + "".join(f"{c:>16}" for c in columns)]
    for name, row in results.items():
        lines.append(f"{name:<26}" + "".join(f"{row[k]:>16.4f}" for k in keys))
    return "\n".join(lines)


def run_probes(content: Dict, k: int = 20, temperature: float = 0.07) -> Dict[str, Dict[str, float]]:
    """kNN and logistic regression on the encoder's features and on PCA of the pixels."""
    from sklearn.decomposition import PCA

    splits = content["splits"]
    names = (data.Split.CLS_TRAIN.value, data.Split.CLS_VALIDATION.value, data.Split.TEST.value)
    encoder = {name: (splits[name]["features"].numpy(), splits[name]["labels"].numpy()) for name in names}
    pixels = {name: (splits[name]["pixels"].flatten(1).float().numpy() / 255.0, splits[name]["labels"].numpy())
              for name in names}
    dims = min(encoder[names[0]][0].shape[1], pixels[names[0]][0].shape[1], pixels[names[0]][0].shape[0])
    pca = PCA(n_components=dims, random_state=0).fit(pixels[names[0]][0])
    pixels = {name: (pca.transform(x), y) for name, (x, y) in pixels.items()}

    results = {}
    for label, sets in progress((("encoder", encoder), (f"pca{dims}_pixels", pixels)), "probes", total=2,
                                unit="probe"):
        (train_x, train_y), test = sets[names[0]], sets[names[2]]
        knn_acc = knn.knn_accuracy(torch.as_tensor(train_x), torch.as_tensor(train_y), torch.as_tensor(test[0]),
                                   torch.as_tensor(test[1]), k, content["num_classes"], temperature)
        logreg_acc, c = logistic_regression_accuracy(sets[names[0]], sets[names[1]], test)
        results[label] = {"knn_accuracy": knn_acc, "logreg_accuracy": logreg_acc, "logreg_C": c,
                          "dimensions": int(train_x.shape[1])}
    return results


def format_probes(results: Dict[str, Dict[str, float]], k: int, content: Dict) -> str:
    columns = list(results)

    def row(label: str, key: str, style: str) -> str:
        return f"{label:<34}" + "".join(format(results[name][key], style) for name in columns)

    return "\n".join([
        f"[probe] {content['backbone']} on {content['dataset']} ({content['checkpoint']}): TEST top-1 accuracy",
        f"{'probe':<34}" + "".join(f"{name:>20}" for name in columns),
        row("dimensions", "dimensions", ">20d"),
        row(f"weighted cosine {k}-NN (T=0.07)", "knn_accuracy", ">20.4f"),
        row("logistic regression (C on val.)", "logreg_accuracy", ">20.4f"),
    ])


def main(args: argparse.Namespace) -> int:
    """``evaluate_result.py features`` / ``probe`` with their arguments (``runtime/cli.py`` reads them)."""
    if args.command == "features":
        content = extract_feature_file(args.checkpoint, args.out, args.set, args.batch_size)
        sizes = ", ".join(f"{name} {tuple(split['features'].shape)}" for name, split in content["splits"].items())
        print(f"[features] {content['backbone']} on {content['dataset']}: {sizes} -> {args.out}", flush=True)
    else:
        content = read_feature_file(args.features)
        bank = len(content["splits"][data.Split.CLS_TRAIN.value]["labels"])
        if args.k > bank:  # the kNN would silently use fewer neighbours
            raise InputError(f"--k {args.k} is more than the {bank} CLS_TRAIN images of {args.features!r} (the kNN "
                             f"bank); give --k <= {bank}")
        print(format_probes(run_probes(content, args.k), args.k, content), flush=True)
    return 0
