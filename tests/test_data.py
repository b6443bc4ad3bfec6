"""Tests of data.py on real on-disk formats generated in tmp_path (CIFAR-10 python pickles, STL-10
binaries, EMNIST idx files, PNG/JPEG image folders) and scikit-learn's bundled digits."""
import os
import pickle
import struct
import threading
import time
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from filelock import FileLock
from PIL import Image
from torchvision.transforms import v2

import data
from data import Split

CIFAR_PER_BATCH = 12


def _write_cifar(root, per_batch=CIFAR_PER_BATCH):
    """A tiny CIFAR-10 in the python pickle format: rows of 3072 bytes, R then G then B planes."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, per_batch).tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(entry, handle, protocol=2)
        batches[name] = entry
    with open(os.path.join(folder, "batches.meta"), "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}, handle, protocol=2)
    return batches


def _write_image_folder(root, splits=("train", "val"), classes=("cat", "dog", "emu"), per_class=4):
    rng = np.random.default_rng(1)
    for split in splits:
        for label in classes:
            os.makedirs(os.path.join(root, split, label), exist_ok=True)
            for i in range(per_class):
                image = Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
                extension = "png" if i % 2 else "jpg"
                image.save(os.path.join(root, split, label, f"{i}.{extension}"))


def _indices(subset):
    assert isinstance(subset, torch.utils.data.Subset)
    return set(subset.indices)


# ------------------------------------------------------------------------------------- registry
def test_registry_names_and_infos():
    assert data.DATASET_NAMES == ("cifar10", "stl10", "imagenet", "emnist_byclass", "emnist_bymerge",
                                  "emnist_balanced", "emnist_letters", "emnist_digits", "emnist_mnist",
                                  "custom", "digits")
    assert data.dataset_info("cifar10").native_size == 32 and data.dataset_info("cifar10").num_classes == 10
    assert data.dataset_info("digits").native_size == 8 and data.dataset_info("emnist_letters").num_classes == 26
    assert data.dataset_info("imagenet").num_classes == 1000
    for name in data.DATASET_NAMES:
        info = data.dataset_info(name)
        assert info.name == name and len(info.mean) == len(info.std) == 3 and min(info.std) > 0


def test_unknown_dataset_and_split_list_the_choices():
    with pytest.raises(ValueError) as error:
        data.dataset_info("mnist")
    assert "cifar10" in str(error.value) and "emnist_letters" in str(error.value)
    with pytest.raises(ValueError, match="digits"):
        data.build_dataset("svhn", Split.TRAIN, root="x", transform=None, validation_size=10)
    with pytest.raises(ValueError, match="cls_validation"):
        data.build_dataset("digits", "validation", root="x", transform=None, validation_size=10)


# --------------------------------------------------------------------------------------- digits
def _digits(split, seed=0, validation_size=100, transform=None):
    return data.build_dataset("digits", split, root="unused", transform=transform,
                              validation_size=validation_size, seed=seed)


def test_digits_split_sizes_and_disjointness():
    train, test = _indices(_digits(Split.TRAIN)), _indices(_digits(Split.TEST))
    cls_train, cls_val = _indices(_digits(Split.CLS_TRAIN)), _indices(_digits("cls_validation"))
    assert (len(train), len(test)) == (1438, 359) and not train & test and len(train | test) == 1797
    assert len(cls_val) == 100 and len(cls_train) == 1338
    assert not cls_train & cls_val and cls_train | cls_val == train


def test_digits_splits_depend_only_on_seed():
    for split in (Split.TEST, Split.CLS_VALIDATION):
        assert _digits(split, seed=3).indices == _digits(split, seed=3).indices
        assert _digits(split, seed=3).indices != _digits(split, seed=4).indices


def test_digits_items_are_rgb_scaled_to_255():
    from sklearn.datasets import load_digits

    dataset = _digits(Split.TEST)
    image, label = dataset[0]
    index = dataset.indices[0]
    digits = load_digits()
    assert image.mode == "RGB" and image.size == (8, 8) and label == digits.target[index]
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], np.round(digits.images[index] * 255 / 16).astype(np.uint8))
    assert np.array_equal(pixels[..., 0], pixels[..., 2]) and pixels.max() == 255
    tensor, _ = pickle.loads(pickle.dumps(_digits(Split.TEST, transform=v2.PILToTensor())))[0]
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.uint8


@pytest.mark.parametrize("bad", [0, -5, 1438, 5000, 2.5, True])
def test_bad_validation_size(bad):
    with pytest.raises(ValueError, match="validation_size"):
        _digits(Split.CLS_TRAIN, validation_size=bad)


# -------------------------------------------------------------------------------------- CIFAR-10
def test_cifar10_splits_from_pickle_files(tmp_path):
    batches = _write_cifar(tmp_path)
    kwargs = dict(root=str(tmp_path), transform=None, validation_size=7, seed=1)
    train = data.build_dataset("cifar10", Split.TRAIN, **kwargs)
    test = data.build_dataset("cifar10", Split.TEST, **kwargs)
    cls_train = data.build_dataset("cifar10", Split.CLS_TRAIN, **kwargs)
    cls_val = data.build_dataset("cifar10", Split.CLS_VALIDATION, **kwargs)
    assert (len(train), len(test), len(cls_train), len(cls_val)) == (60, 12, 53, 7)
    assert not _indices(cls_train) & _indices(cls_val) and len(_indices(cls_train) | _indices(cls_val)) == 60
    image, label = train[CIFAR_PER_BATCH + 2]  # third image of data_batch_2
    expected = batches["data_batch_2"]["data"][2].reshape(3, 32, 32).transpose(1, 2, 0)
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected)
    assert label == batches["data_batch_2"]["labels"][2]
    image, label = test[5]
    assert np.array_equal(np.asarray(image), batches["test_batch"]["data"][5].reshape(3, 32, 32).transpose(1, 2, 0))
    again = data.build_dataset("cifar10", Split.CLS_VALIDATION, **kwargs)
    assert again.indices == cls_val.indices
    copied = pickle.loads(pickle.dumps(cls_val))  # data-loader workers may get the dataset pickled
    assert np.array_equal(np.asarray(copied[3][0]), np.asarray(cls_val[3][0]))


def test_cifar10_missing_files_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        data.build_dataset("cifar10", Split.TRAIN, root=str(tmp_path), transform=None, validation_size=5)
    message = str(error.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1") in message
    assert "test_batch" in message and "data.download: true" in message
    _write_cifar(tmp_path)
    os.remove(os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_4"))
    with pytest.raises(FileNotFoundError, match="data_batch_4") as error:
        data.build_dataset("cifar10", Split.TEST, root=str(tmp_path), transform=None, validation_size=5)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py", "data_batch_1") not in str(error.value)


def test_cifar10_download_failure_is_file_not_found(tmp_path, monkeypatch):
    def no_network(url, download_root, **kwargs):
        raise urllib.error.URLError("name resolution failed")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    with pytest.raises(FileNotFoundError, match="download failed.*name resolution") as error:
        data.build_dataset("cifar10", Split.TRAIN, root=str(tmp_path / "new"), transform=None,
                           validation_size=5, download=True)
    assert "cifar-10-batches-py" in str(error.value)
    assert os.path.exists(tmp_path / "new" / ".cifar10.download.lock")


def test_cifar10_download_runs_once_under_the_lock(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, **kwargs):
        calls.append(url)
        _write_cifar(download_root)

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fake_download)
    kwargs = dict(root=str(tmp_path), transform=None, validation_size=5, download=True)
    assert len(data.build_dataset("cifar10", Split.TRAIN, **kwargs)) == 60
    assert calls == [torchvision.datasets.CIFAR10.url]
    data.build_dataset("cifar10", Split.TEST, **kwargs)
    assert len(calls) == 1  # files present: no second download



def test_download_waits_for_the_lock_and_skips_finished_downloads(tmp_path):
    """Another process holds the lock and finishes the download meanwhile: wait, then do not fetch."""
    expected, fetches, errors = [str(tmp_path / "a.bin")], [], []

    def ensure():
        try:
            data._ensure_files(str(tmp_path), "toy", expected, True, lambda: fetches.append(1), "Put a.bin.")
        except Exception as error:  # reported below
            errors.append(error)

    with FileLock(str(tmp_path / ".toy.download.lock")):
        worker = threading.Thread(target=ensure)
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()
        (tmp_path / "a.bin").write_bytes(b"done")
    worker.join(timeout=20)
    assert not worker.is_alive() and not errors and not fetches
    with pytest.raises(FileNotFoundError, match="b.bin.*Put b.bin"):  # fetch ran but made nothing
        data._ensure_files(str(tmp_path), "toy", [str(tmp_path / "b.bin")], True, lambda: fetches.append(1),
                           "Put b.bin.")
    assert fetches == [1]


# ---------------------------------------------------------------------------------------- STL-10
def test_stl10_train_unlabeled_and_labelled_splits(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(2)
    images = {}
    for name, count in (("train", 10), ("test", 6), ("unlabeled", 8)):
        images[name] = rng.integers(0, 256, (count, 96, 96, 3), dtype=np.uint8)  # HWC
        # on disk: channel planes stored column-major, i.e. [N, 3, W, H]
        images[name].transpose(0, 3, 2, 1).tofile(folder / f"{name}_X.bin")
    (rng.integers(1, 11, 10).astype(np.uint8)).tofile(folder / "train_y.bin")
    (rng.integers(1, 11, 6).astype(np.uint8)).tofile(folder / "test_y.bin")
    kwargs = dict(root=str(tmp_path), transform=None, validation_size=3)
    train = data.build_dataset("stl10", Split.TRAIN, **kwargs)
    assert len(train) == 18 and train[12][1] == -1
    assert np.array_equal(np.asarray(train[12][0]), images["unlabeled"][2])
    assert len(data.build_dataset("stl10", Split.TEST, **kwargs)) == 6
    cls_train = data.build_dataset("stl10", Split.CLS_TRAIN, **kwargs)
    cls_val = data.build_dataset("stl10", Split.CLS_VALIDATION, **kwargs)
    assert len(cls_train) == 7 and len(cls_val) == 3 and not _indices(cls_train) & _indices(cls_val)
    assert all(0 <= cls_train[i][1] < 10 for i in range(7))
    os.remove(folder / "unlabeled_X.bin")
    with pytest.raises(FileNotFoundError, match="unlabeled_X.bin"):
        data.build_dataset("stl10", Split.TRAIN, **kwargs)


# ---------------------------------------------------------------------------------------- EMNIST
def _write_idx(path, array):
    kind = 0x0803 if array.ndim == 3 else 0x0801
    with open(path, "wb") as handle:
        handle.write(struct.pack(">I", kind) + b"".join(struct.pack(">I", n) for n in array.shape))
        handle.write(array.astype(np.uint8).tobytes())


def test_emnist_orientation_and_letters_labels(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    upright = np.zeros((4, 28, 28), dtype=np.uint8)
    upright[:, 2:6, :] = 255  # a horizontal bar near the top
    upright[1, :, 20] = 128
    for part in ("train", "test"):
        _write_idx(raw / f"emnist-letters-{part}-images-idx3-ubyte", upright.transpose(0, 2, 1))  # stored transposed
        _write_idx(raw / f"emnist-letters-{part}-labels-idx1-ubyte", np.array([1, 26, 5, 2]))
    kwargs = dict(root=str(tmp_path), transform=None, validation_size=1)
    test = data.build_dataset("emnist_letters", Split.TEST, **kwargs)
    image, label = test[1]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image)[..., 0], upright[1]) and label == 25
    assert [test[i][1] for i in range(4)] == [0, 25, 4, 1]
    assert len(data.build_dataset("emnist_letters", Split.CLS_TRAIN, **kwargs)) == 3
    with pytest.raises(FileNotFoundError, match="emnist-digits-test-images-idx3-ubyte") as error:
        data.build_dataset("emnist_digits", Split.TEST, **kwargs)
    assert str(raw) in str(error.value)


# ------------------------------------------------------------------------- custom / imagenet folders
def test_custom_image_folder_splits(tmp_path):
    _write_image_folder(tmp_path)
    kwargs = dict(root=str(tmp_path), transform=v2.PILToTensor(), validation_size=4)
    train = data.build_dataset("custom", Split.TRAIN, **kwargs)
    test = data.build_dataset("custom", Split.TEST, **kwargs)
    cls_train = data.build_dataset("custom", Split.CLS_TRAIN, **kwargs)
    cls_val = data.build_dataset("custom", Split.CLS_VALIDATION, **kwargs)
    assert (len(train), len(test), len(cls_train), len(cls_val)) == (12, 12, 8, 4)
    assert not _indices(cls_train) & _indices(cls_val)
    image, label = train[5]
    assert image.shape == (3, 10, 12) and image.dtype == torch.uint8 and label == 1
    assert data.dataset_info("custom", root=str(tmp_path)).num_classes == 3
    assert data.build_dataset("imagenet", Split.TEST, **kwargs)[11][1] == 2


def test_custom_test_folder_fallback_keeps_training_labels(tmp_path):
    _write_image_folder(tmp_path, splits=("train",))
    _write_image_folder(tmp_path, splits=("test",), classes=("dog", "emu"))
    test = data.build_dataset("custom", Split.TEST, root=str(tmp_path), transform=None, validation_size=2)
    assert sorted({label for _, label in test}) == [1, 2]  # dog and emu keep their training labels
    _write_image_folder(tmp_path, splits=("val",), classes=("dog", "yak"))
    with pytest.raises(ValueError, match="yak"):
        data.build_dataset("custom", Split.TEST, root=str(tmp_path), transform=None, validation_size=2)


def test_image_folders_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=os.path.join(str(tmp_path), "train")):
        data.build_dataset("imagenet", Split.TRAIN, root=str(tmp_path), transform=None, validation_size=2)
    _write_image_folder(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError) as error:
        data.build_dataset("custom", Split.TEST, root=str(tmp_path), transform=None, validation_size=2)
    assert os.path.join(str(tmp_path), "val") in str(error.value) and "test" in str(error.value)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        data.build_dataset("imagenet", Split.TEST, root=str(tmp_path), transform=None, validation_size=2,
                           download=True)


# --------------------------------------------------------------------------- Cloud Storage imagenet
def test_imagenet_from_gcs_source(monkeypatch):
    gcs = pytest.importorskip("runtime.gcs")
    created = []

    class FakeFolder(torch.utils.data.Dataset):
        def __init__(self, bucket, blob_list, transform=None, cache_dir=None, classes=None, max_in_flight=32,
                     retry_deadline=300.0, startup_retry_deadline=30.0):
            created.append((bucket, blob_list, cache_dir, classes))
            self.transform = transform
            self.classes = ["n01", "n02", "n03"] if "train" in blob_list else ["n02"]

        def __len__(self):
            return 30

        def __getitem__(self, index):
            return self.transform(index), index % 3

    monkeypatch.setattr(gcs, "GCSImageFolder", FakeFolder)
    source = gcs.GCSSource("bucket", "gs://bucket/train.txt", "gs://bucket/val.txt", "/tmp/cache")
    kwargs = dict(root="unused", transform=lambda x: x, validation_size=5, gcs=source)
    test = data.build_dataset("imagenet", Split.TEST, **kwargs)
    assert created[-1] == ("bucket", "gs://bucket/val.txt", "/tmp/cache", ["n01", "n02", "n03"])
    assert len(test) == 30 and test[4] == (4, 1)
    cls_train = data.build_dataset("imagenet", Split.CLS_TRAIN, **kwargs)
    cls_val = data.build_dataset("imagenet", Split.CLS_VALIDATION, **kwargs)
    assert created[-1][1] == "gs://bucket/train.txt"
    assert len(cls_train) == 25 and len(cls_val) == 5 and not _indices(cls_train) & _indices(cls_val)
    with pytest.raises(ValueError, match="imagenet"):
        data.build_dataset("cifar10", Split.TEST, **kwargs)


# ----------------------------------------------------- labelled subsets (semi-supervised protocol)
def test_label_fraction_takes_a_seeded_share_of_every_class(tmp_path):
    cls_train = data.build_dataset("digits", Split.CLS_TRAIN, root=str(tmp_path), transform=None, validation_size=200)
    labels = np.array(data.dataset_labels(cls_train))
    subset = data.labelled_subset(cls_train, fraction=0.1, seed=0)
    chosen = np.array(data.dataset_labels(subset))
    for label in range(10):
        assert abs((chosen == label).sum() - round(0.1 * (labels == label).sum())) == 0
    assert data.labelled_subset(cls_train, fraction=0.1, seed=0).indices == subset.indices
    assert data.labelled_subset(cls_train, fraction=0.1, seed=1).indices != subset.indices
    tiny = data.labelled_subset(cls_train, fraction=0.001, seed=0)
    assert sorted(data.dataset_labels(tiny)) == list(range(10))  # at least one image per class
    assert data.labelled_subset(cls_train) is cls_train
    with pytest.raises(ValueError, match="file names|label_fraction"):
        data.labelled_subset(cls_train, list_path=__file__)


def test_label_list_selects_the_named_images(tmp_path):
    root = tmp_path / "custom"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / split / cls / f"{cls}_{i}.png")
    cls_train = data.build_dataset("custom", Split.CLS_TRAIN, root=str(root), transform=None, validation_size=2)
    names = data.dataset_file_names(cls_train)
    listing = tmp_path / "1percent.txt"
    listing.write_text(f"{names[0]}\n{names[3]}\n\n")
    subset = data.labelled_subset(cls_train, list_path=str(listing))
    assert data.dataset_file_names(subset) == [names[0], names[3]]
    listing.write_text("a_0.png\nnot_there.png\n")
    with pytest.raises(ValueError, match="not_there.png|not in the labelled"):
        data.labelled_subset(cls_train, list_path=str(listing))
