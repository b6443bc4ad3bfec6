"""Dataset registry and deterministic splits for BYOL (Grill et al. 2020, arXiv 2006.07733).

Section 4 of the paper pretrains on ImageNet's training set (labels unused) and evaluates with a
linear classifier (section 4.1, appendix C.1) whose hyper-parameters are picked on a validation set
held out of the labelled training images (appendix C.1: "we hold out 10009 images of the training
set"); section 4.2 / appendix D repeat this on smaller datasets (CIFAR-10, STL-10, ...). Hence the
four splits of :class:`Split`:

* ``TRAIN``: images for self-supervised training (cifar10: train set; stl10: 'train+unlabeled';
  emnist: train set; imagenet / custom: the ``train`` folder; digits: its 80% training part);
* ``CLS_VALIDATION``: ``validation_size`` images held out of the labelled training set;
* ``CLS_TRAIN``: the rest of the labelled training set (stl10: its 5000-image 'train' split);
* ``TEST``: the official test split (imagenet: the ``val`` folder; custom: ``val`` or ``test``;
  digits: a fixed 20% part).

Items are ``(transform(rgb_pil_image), int label)``; images are always converted to RGB. Splits
depend only on ``seed``. Local files are read with torchvision's dataset classes; downloads go
through torchvision's own download code under a :class:`filelock.FileLock` in ``root``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch.utils.data
import torchvision
from filelock import FileLock
from PIL import Image

from augment import IMAGENET_MEAN, IMAGENET_STD, to_rgb
from runtime import jpeg_decode
from runtime.gcs_client import GCSSource, parse_gcs_section
from runtime.sampling import SeedStream
from utils import InputError, check_keys, checked_number, reject


class Split(str, enum.Enum):
    TRAIN = "train"                    # self-supervised training (labels unused)
    CLS_TRAIN = "cls_train"            # linear-classifier training (labelled train minus validation)
    CLS_VALIDATION = "cls_validation"  # held out of labelled train, to pick the classifier LR
    TEST = "test"


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset. ``channels`` is the channel count of the source images (1 for
    grayscale ones); items are always delivered as RGB, and ``mean``/``std`` are per RGB channel in
    [0, 1] units. ``num_classes`` is 0 for ``custom`` unless :func:`dataset_info` gets its root."""

    name: str
    num_classes: int
    channels: int
    native_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


# EMNIST statistics (approximate, byclass training set; all splits are close to it).
_EMNIST_MEAN, _EMNIST_STD = (0.1736,) * 3, (0.3317,) * 3
_EMNIST_CLASSES = {"byclass": 62, "bymerge": 47, "balanced": 47, "letters": 26, "digits": 10, "mnist": 10}

_INFOS = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "stl10": DatasetInfo("stl10", 10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
    **{f"emnist_{split}": DatasetInfo(f"emnist_{split}", n, 1, 28, _EMNIST_MEAN, _EMNIST_STD)
       for split, n in _EMNIST_CLASSES.items()},
    "custom": DatasetInfo("custom", 0, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
    # scikit-learn's load_digits scaled to 0..255 (statistics computed over all 1797 images).
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3053,) * 3, (0.3759,) * 3),
}
DATASET_NAMES: Tuple[str, ...] = tuple(_INFOS)


@dataclass(frozen=True)
class DataSettings:
    """The config's ``data`` section: which dataset, where, how it is loaded."""

    dataset: str = "digits"
    root: str = "data"
    download: bool = False
    validation_size: int = 200        # held out of the labelled training set (CLS_VALIDATION)
    num_workers: int = 2
    gcs: Optional[GCSSource] = None
    decode: str = "pil"               # pil | draft | device: how training JPEGs are decoded (jpeg_decode.py)
    image_check: str = "header"       # header | full: what is checked of every image file before the first step


def parse_data_section(section: dict) -> DataSettings:
    """The config's ``data`` section, checked into :class:`DataSettings` (a one-line ``ConfigError``
    names any bad key or value)."""
    prefix = "data."
    check_keys(section, DataSettings, prefix)
    values = {**dataclasses.asdict(DataSettings()), **section}
    if values["dataset"] not in DATASET_NAMES:
        reject(prefix + "dataset", values["dataset"], f"known datasets: {', '.join(DATASET_NAMES)}")
    if not isinstance(values["root"], str) or not values["root"]:
        reject(prefix + "root", values["root"], "expected a directory path")
    values["validation_size"] = checked_number(values, "validation_size", prefix, int, minimum=1)
    values["num_workers"] = checked_number(values, "num_workers", prefix, int, minimum=0)
    if values["decode"] not in ("pil", "draft", "device"):
        reject(prefix + "decode", values["decode"], "allowed: pil, draft, device")
    if values["decode"] != "pil" and values["dataset"] not in ("imagenet", "custom"):
        reject(prefix + "decode", values["decode"], f"draft and device decode JPEG files: dataset imagenet or custom, "
              f"not {values['dataset']} (use pil)")
    if values["image_check"] not in ("header", "full"):
        reject(prefix + "image_check", values["image_check"], "allowed: header (fast: format and size), full (every "
               "pixel decoded, finds truncated files; about 4x slower, see docs/reliability.md)")
    if not isinstance(values["download"], bool):
        reject(prefix + "download", values["download"], "expected true or false")
    if values.get("gcs") is not None:
        values["gcs"] = parse_gcs_section(values["gcs"], prefix + "gcs.", values["dataset"])
    return DataSettings(**values)

_DIGITS_TEST_FRACTION = 0.2


def _check_name(name: str) -> None:
    if name not in _INFOS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")


def dataset_info(name: str, root: Optional[str] = None) -> DatasetInfo:
    """Facts about dataset ``name`` (unknown name -> ValueError listing :data:`DATASET_NAMES`).

    For ``custom`` the class count comes from the class folders in ``root/train`` when ``root`` is
    given (0 otherwise)."""
    _check_name(name)
    info = _INFOS[name]
    if name == "custom" and root is not None:
        train_dir = os.path.join(root, "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(f"custom dataset: no directory {train_dir!r}; expected "
                                    f"{root}/train/<class>/<image> (and {root}/val or {root}/test)")
        classes, _ = torchvision.datasets.folder.find_classes(train_dir)
        info = DatasetInfo(name, len(classes), info.channels, info.native_size, info.mean, info.std)
    return info


class _PrepareImage:
    """Converts a source image to RGB (transposing EMNIST's column-major images first), then applies
    the user's transform. A class rather than a closure so data-loader workers can pickle it."""

    def __init__(self, transform: Optional[Callable[[Image.Image], Any]], transpose: bool = False,
                 lazy: bool = False):
        self.transform = transform
        self.transpose = transpose
        self.lazy = lazy  # images opened undecoded (jpeg_decode.py): the transform decodes them

    def __call__(self, image: Image.Image) -> Any:
        if self.lazy:
            return image if self.transform is None else self.transform(image)
        if self.transpose:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        image = to_rgb(image)  # 16-bit and other modes scaled, never clipped (augment.to_rgb)
        return image if self.transform is None else self.transform(image)


class _ShiftLabel:
    """EMNIST 'letters' labels run 1..26 (0 is an unused 'N/A' class); shift them to 0..25."""

    def __init__(self, offset: int):
        self.offset = offset

    def __call__(self, label: int) -> int:
        return int(label) + self.offset


class _ArrayImages(torch.utils.data.Dataset):
    """Grayscale uint8 images ``[N, H, W]`` with integer labels (used for the digits dataset)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable[[Image.Image], Any]):
        self.images, self.targets, self.transform = images, [int(t) for t in labels], transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index], mode="L")), self.targets[index]


# torchvision checks the md5 of each extracted file on every construction (seconds for large
# sets); we check the archive's md5 when downloading and only the files' presence afterwards.
class _CIFAR10(torchvision.datasets.CIFAR10):
    train_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.CIFAR10.test_list]
    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}


class _STL10(torchvision.datasets.STL10):
    train_list = [[name, None] for name, _ in torchvision.datasets.STL10.train_list]
    test_list = [[name, None] for name, _ in torchvision.datasets.STL10.test_list]


def _missing(paths: Sequence[str]) -> List[str]:
    return [path for path in paths if not os.path.exists(path)]


def _ensure_files(root: str, name: str, expected: Sequence[str], download: bool,
                  fetch: Optional[Callable[[], Any]], how_to_get: str) -> None:
    """Makes sure ``expected`` paths exist, downloading with ``fetch`` (torchvision's own download
    code) under a file lock in ``root`` when ``download`` is set, so that processes sharing a node
    do not download at the same time. Raises FileNotFoundError naming what is missing."""
    missing = _missing(expected)
    if not missing:
        return
    problem = ""
    if download and fetch is not None:
        os.makedirs(root, exist_ok=True)
        with FileLock(os.path.join(root, f".{name}.download.lock")):
            if _missing(expected):  # another process may have finished while we waited
                try:
                    fetch()
                except (OSError, RuntimeError, ValueError) as error:  # no network, bad md5, ...
                    problem = f" (download failed: {type(error).__name__}: {error})"
        missing = _missing(expected)
        if not missing:
            return
    elif download:
        problem = f" ({name} cannot be downloaded automatically)"
    raise FileNotFoundError(
        f"{name}: missing {', '.join(repr(path) for path in missing)}{problem}. {how_to_get}"
        + ("" if download or fetch is None else " Or set data.download: true on a machine with network access.")
    )


def _cifar10(root: str, train: bool, transform: _PrepareImage, download: bool):
    folder = os.path.join(root, _CIFAR10.base_folder)
    names = [n for n, _ in _CIFAR10.train_list + _CIFAR10.test_list] + [_CIFAR10.meta["filename"]]
    _ensure_files(root, "cifar10", [os.path.join(folder, n) for n in names], download,
                  functools.partial(_CIFAR10, root, train=False, download=True),
                  f"Download {_CIFAR10.url} and extract it in {root!r}, so that {folder!r} holds "
                  f"{', '.join(names)} (the CIFAR-10 python version).")
    return _CIFAR10(root, train=train, transform=transform)


def _stl10(root: str, split: str, transform: _PrepareImage, download: bool):
    folder = os.path.join(root, _STL10.base_folder)
    names = [n for n, _ in _STL10.train_list + _STL10.test_list]
    _ensure_files(root, "stl10", [os.path.join(folder, n) for n in names], download,
                  functools.partial(_STL10, root, split="test", download=True),
                  f"Download {_STL10.url} and extract it in {root!r}, so that {folder!r} holds "
                  f"{', '.join(names)}.")
    return _STL10(root, split=split, transform=transform)


def _emnist(root: str, split: str, train: bool, transform: _PrepareImage, download: bool):
    raw = os.path.join(root, "EMNIST", "raw")
    prefix = f"emnist-{split}-{'train' if train else 'test'}"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    emnist = torchvision.datasets.EMNIST
    _ensure_files(root, f"emnist_{split}", [os.path.join(raw, n) for n in names], download,
                  functools.partial(emnist, root, split=split, train=False, download=True),
                  f"Download {emnist.url}, unzip it and gunzip the files of gzip/ into {raw!r} "
                  f"(needed here: {', '.join(names)}).")
    target_transform = _ShiftLabel(-1) if split == "letters" else None
    return emnist(root, split=split, train=train, transform=transform, target_transform=target_transform)


class DuplicateImageError(InputError):
    """One image file reached twice in an image folder (a symbolic link loop, a link to a folder or
    file read already, a hard link): it would be read several times and could land in both
    CLS_TRAIN and CLS_VALIDATION."""


def _walk_once(top: str) -> List[Tuple[str, List[Tuple[str, Tuple[int, int]]]]]:
    """``os.walk(top, followlinks=True)`` as torchvision's ImageFolder walks it, each folder with
    its files and their identities ``(device, inode)``; a folder reached twice (a symbolic link
    loop, whose walk would otherwise repeat until the path is too long, or grow exponentially with
    two loops) raises :class:`DuplicateImageError` naming both paths. The identities of plain files
    come free with the folder listing (``DirEntry.inode``); links cost one ``stat``."""
    folders, seen = [], {}
    pending = [top]
    while pending:
        here = pending.pop()
        try:
            status = os.stat(here)
        except OSError:
            continue  # a broken link to a folder: os.walk skips it too
        identity = (status.st_dev, status.st_ino)
        if identity in seen:
            raise DuplicateImageError(
                f"image folder {here!r} is the folder {seen[identity]!r} again (a symbolic link loop or a second "
                f"link to it): its images would be read more than once, and copies could land in both CLS_TRAIN "
                f"and CLS_VALIDATION; remove the link")
        seen[identity] = here
        files = []
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue  # unreadable folder: os.walk skips it too
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=True):
                    pending.append(entry.path)
                    continue
                if entry.is_symlink():
                    target = os.stat(entry.path)
                    files.append((entry.name, (target.st_dev, target.st_ino)))
                else:
                    files.append((entry.name, (status.st_dev, entry.inode())))
            except OSError:  # a broken link: listed as torchvision lists it; the image check names it
                files.append((entry.name, (-1, hash(entry.path))))
        folders.append((here, files))
    return sorted(folders)


def distinct_image_files(directory: str, class_to_idx: dict, extensions=None, is_valid_file=None,
                         allow_empty: bool = False, identities: Optional[dict] = None) -> List[Tuple[str, int]]:
    """torchvision's ``make_dataset`` (same samples, same order) over :func:`_walk_once`, refusing
    an image file reached twice (:class:`DuplicateImageError`, naming both paths). ``identities``
    (``{(device, inode): path}``) collects the files' identities, to compare folders."""
    folder = torchvision.datasets.folder
    if extensions is not None:
        def is_valid_file(path: str) -> bool:
            return folder.has_file_allowed_extension(path, extensions)
    found = {} if identities is None else identities
    samples, available = [], set()
    for target_class in sorted(class_to_idx):
        target_dir = os.path.join(os.path.expanduser(directory), target_class)
        if not os.path.isdir(target_dir):
            continue
        for root, files in _walk_once(target_dir):
            for name, identity in sorted(files):
                path = os.path.join(root, name)
                if not is_valid_file(path):
                    continue
                if identity in found:
                    raise DuplicateImageError(
                        f"image file {path!r} is the same file as {found[identity]!r} (reached through a symbolic "
                        f"or hard link): it would be read twice, and could land in both CLS_TRAIN and "
                        f"CLS_VALIDATION (or in training and TEST); remove one of them")
                found[identity] = path
                samples.append((path, class_to_idx[target_class]))
                available.add(target_class)
    empty = set(class_to_idx) - available
    if empty and not allow_empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(sorted(empty))} in {directory!r}")
    return samples


def load_rgb(path: str) -> Image.Image:
    """An image file as 8-bit RGB (:func:`augment.to_rgb`; torchvision's default loader converts
    with Pillow's ``convert("RGB")``, which clips 16-bit images to white)."""
    with open(path, "rb") as handle:
        image = Image.open(handle)
        image.load()
        return to_rgb(image)


class _ImageFolder(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder whose walk reaches every file once (:func:`distinct_image_files`)
    and whose images are converted to RGB without clipping (:func:`load_rgb`)."""

    def __init__(self, root: str, transform: Optional[Callable] = None, loader: Callable = None, **kwargs):
        super().__init__(root, transform=transform, loader=loader or load_rgb, **kwargs)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return distinct_image_files(directory, class_to_idx, extensions, is_valid_file, allow_empty)


class _FolderWithClasses(_ImageFolder):
    """An ImageFolder labelled with another folder's class -> index map (the train folder's), so a
    validation folder lacking some classes still gets the same label numbers."""

    def __init__(self, root: str, class_to_idx: dict, transform: Callable):
        self._train_class_to_idx = class_to_idx
        super().__init__(root, transform=transform)
        self.classes = sorted(class_to_idx, key=class_to_idx.get)
        self.class_to_idx = dict(class_to_idx)

    def find_classes(self, directory):
        classes, _ = super().find_classes(directory)
        unknown = [c for c in classes if c not in self._train_class_to_idx]
        if unknown:
            raise ValueError(f"{directory!r} has class folders {unknown} that the training folder lacks; "
                             f"training classes: {sorted(self._train_class_to_idx)}")
        return classes, {c: self._train_class_to_idx[c] for c in classes}


def _image_folders(root: str, name: str, train: bool, transform: _PrepareImage, download: bool, lazy: bool = False):
    train_dir = os.path.join(root, "train")
    if name == "imagenet":
        test_dirs, layout = [os.path.join(root, "val")], f"{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG"
    else:
        test_dirs = [os.path.join(root, "val"), os.path.join(root, "test")]
        layout = f"{root}/train/<class>/<image> and {root}/val/<class>/<image> (or {root}/test/...)"
    how = f"Place the images as {layout}."
    _ensure_files(root, name, [train_dir], download, None, how)
    if train:
        if lazy:  # bytes read, decoding left to the transform (jpeg_decode.py)
            return _ImageFolder(train_dir, transform=transform, loader=jpeg_decode.read_lazy)
        return _ImageFolder(train_dir, transform=transform)
    existing = [d for d in test_dirs if os.path.isdir(d)]
    if not existing:
        _ensure_files(root, name, test_dirs, download, None, how)
    _, class_to_idx = torchvision.datasets.folder.find_classes(train_dir)
    test = _FolderWithClasses(existing[0], class_to_idx, transform)
    _check_test_apart(test.samples, train_dir)
    return test


def _check_test_apart(test_samples: Sequence[Tuple[str, int]], train_dir: str) -> None:
    """No TEST image is a training image (a link into the training folder): it would be scored on
    what the encoder and heads were trained on. Links are resolved; a file with several hard links
    is compared with every training file's identity."""
    train_root = os.path.realpath(train_dir) + os.sep
    hard_linked = {}
    for path, _ in test_samples:
        if os.path.realpath(path).startswith(train_root):
            raise DuplicateImageError(f"test image {path!r} is the training image {os.path.realpath(path)!r} (a link "
                                      f"into the training folder): TEST must hold images never trained on; "
                                      f"remove the link")
        with contextlib.suppress(OSError):
            status = os.stat(path)
            if status.st_nlink > 1:
                hard_linked[(status.st_dev, status.st_ino)] = path
    if hard_linked:  # rare: compare with the training files' identities
        _, class_to_idx = torchvision.datasets.folder.find_classes(train_dir)
        train = {}
        distinct_image_files(train_dir, class_to_idx, torchvision.datasets.folder.IMG_EXTENSIONS, allow_empty=True,
                             identities=train)
        for identity, path in hard_linked.items():
            if identity in train:
                raise DuplicateImageError(f"test image {path!r} is the same file as the training image "
                                          f"{train[identity]!r} (a hard link): TEST must hold images never trained "
                                          f"on; remove one of them")


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def split_labelled(num_labelled: int, validation_size: int, seed: int) -> Tuple[List[int], List[int]]:
    """Positions ``(cls_train, cls_validation)`` of a labelled set of ``num_labelled`` images: a
    seeded random ``validation_size`` of them and the rest, both sorted, disjoint and covering it."""
    if not 0 < validation_size < num_labelled:
        raise ValueError(f"validation_size must be > 0 and < the {num_labelled} labelled training images, "
                         f"got {validation_size}")
    order = _rng(seed, SeedStream.VALIDATION_SPLIT).permutation(num_labelled)
    return sorted(order[validation_size:].tolist()), sorted(order[:validation_size].tolist())


def _digits(split: Split, transform: _PrepareImage, validation_size: int, seed: int):
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    full = _ArrayImages(images, digits.target, transform)
    order = _rng(seed, SeedStream.TEST_SPLIT).permutation(len(full))
    num_test = int(round(_DIGITS_TEST_FRACTION * len(full)))
    test, train = sorted(order[:num_test].tolist()), sorted(order[num_test:].tolist())
    if split is Split.TEST:
        return torch.utils.data.Subset(full, test)
    if split is Split.TRAIN:
        return torch.utils.data.Subset(full, train)
    cls_train, cls_validation = split_labelled(len(train), validation_size, seed)
    chosen = cls_train if split is Split.CLS_TRAIN else cls_validation
    return torch.utils.data.Subset(full, [train[i] for i in chosen])


def _gcs_imagenet(split: Split, source: Any, transform: Optional[Callable], lazy: bool = False):
    """ImageNet streamed from Cloud Storage; the val folder is labelled with the train classes."""
    gcs_module = importlib.import_module("runtime.gcs")  # lazy: needs google-cloud-storage
    options = dict(cache_dir=source.cache_dir, max_in_flight=source.max_in_flight, retry_deadline=source.retry_deadline,
                   startup_retry_deadline=source.startup_retry_deadline)
    train = gcs_module.GCSImageFolder(source.bucket, source.train_blob_list, transform=transform, **options)
    train.lazy = lazy and split is Split.TRAIN
    if split is not Split.TEST:
        return train
    return gcs_module.GCSImageFolder(source.bucket, source.val_blob_list, transform=transform,
                                     classes=train.classes, **options)


def build_dataset(name: str, split: Split, *, root: str, transform: Optional[Callable[[Image.Image], Any]],
                  validation_size: int, seed: int = 0, download: bool = False,
                  gcs: Optional[Any] = None, lazy: bool = False) -> torch.utils.data.Dataset:
    """The ``split`` of dataset ``name`` (see the module docstring for what each split holds).

    Items are ``(transform(rgb_pil_image), int label)`` (``transform=None``: the PIL image itself;
    stl10's unlabeled images have label -1). ``CLS_TRAIN``/``CLS_VALIDATION`` are
    ``torch.utils.data.Subset`` objects of the labelled training set, split by ``seed`` only.
    ``gcs`` (a ``gcs.GCSSource``) streams imagenet from Cloud Storage instead of ``root``.
    ``lazy`` (TRAIN of imagenet/custom): images come undecoded (``jpeg_decode.open_lazy``).
    Missing files raise FileNotFoundError naming them and where to put them."""
    _check_name(name)
    try:
        split = Split(split)
    except ValueError:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(s.value for s in Split)}") from None
    for key, value in (("validation_size", validation_size), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    if validation_size <= 0:
        raise ValueError(f"validation_size must be > 0 (images held out of the labelled training set), "
                         f"got {validation_size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if gcs is not None and name != "imagenet":
        raise ValueError(f"a Cloud Storage source is only supported for imagenet, not {name!r}")

    lazy = lazy and split is Split.TRAIN and name in ("imagenet", "custom")
    prepare = _PrepareImage(transform, transpose=name.startswith("emnist_"), lazy=lazy)
    if name == "digits":
        return _digits(split, prepare, validation_size, seed)
    train = split is not Split.TEST
    if gcs is not None:
        dataset = _gcs_imagenet(split, gcs, transform, lazy)
    elif name == "cifar10":
        dataset = _cifar10(root, train, prepare, download)
    elif name == "stl10":
        stl_split = {Split.TRAIN: "train+unlabeled", Split.TEST: "test"}.get(split, "train")
        dataset = _stl10(root, stl_split, prepare, download)
    elif name.startswith("emnist_"):
        dataset = _emnist(root, name[len("emnist_"):], train, prepare, download)
    else:  # imagenet, custom
        dataset = _image_folders(root, name, train, prepare, download, lazy)
    if split in (Split.TRAIN, Split.TEST):
        return dataset
    cls_train, cls_validation = split_labelled(len(dataset), validation_size, seed)
    return torch.utils.data.Subset(dataset, cls_train if split is Split.CLS_TRAIN else cls_validation)


# ----------------------------------------------------- labelled subsets (semi-supervised protocol)
def dataset_labels(dataset: torch.utils.data.Dataset) -> List[int]:
    """Every item's label, in dataset order, read from the dataset's metadata (no image decoded)."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    for attribute in ("targets", "labels"):  # torchvision datasets, ours, GCSImageFolder; STL-10
        if hasattr(dataset, attribute):
            return [int(label) for label in getattr(dataset, attribute)]
    raise TypeError(f"{type(dataset).__name__} exposes no labels (targets) to choose a labelled subset from")


def dataset_file_names(dataset: torch.utils.data.Dataset) -> List[str]:
    """Every item's image file name (without folders), for datasets of image files."""
    if isinstance(dataset, torch.utils.data.Subset):
        names = dataset_file_names(dataset.dataset)
        return [names[i] for i in dataset.indices]
    if hasattr(dataset, "samples"):        # torchvision ImageFolder (imagenet, custom)
        return [os.path.basename(path) for path, _ in dataset.samples]
    if hasattr(dataset, "object_name"):    # gcs.GCSImageFolder
        return [os.path.basename(dataset.object_name(i)) for i in range(len(dataset))]
    raise ValueError(f"a label list names image files, but this dataset ({type(dataset).__name__}) has none: "
                     f"use classifier.label_fraction instead")


def labelled_subset(dataset: torch.utils.data.Dataset, fraction: Optional[float] = None,
                    list_path: Optional[str] = None, seed: int = 0) -> torch.utils.data.Dataset:
    """The labelled part of CLS_TRAIN for semi-supervised fine-tuning (paper appendix C.2, after
    SimCLR's protocol): the images named in ``list_path`` (one file name per line, as SimCLR's
    ``1percent.txt`` / ``10percent.txt``; every name must be found), else a seeded ``fraction`` of
    each class (at least one image per class). Neither given: the dataset itself."""
    if list_path is not None:
        with open(list_path) as handle:
            wanted = [line.strip() for line in handle if line.strip()]
        if not wanted:
            raise ValueError(f"label list {list_path!r} names no images")
        position = {name: i for i, name in enumerate(dataset_file_names(dataset))}
        missing = [name for name in wanted if name not in position]
        if missing:
            raise ValueError(f"label list {list_path!r}: {len(missing)} of {len(wanted)} images are not in the "
                             f"labelled training split (CLS_TRAIN), e.g. {missing[:3]}")
        return torch.utils.data.Subset(dataset, sorted(position[name] for name in set(wanted)))
    if fraction is None:
        return dataset
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(dataset_labels(dataset))
    rng = _rng(seed, SeedStream.LABEL_SUBSET)
    chosen: List[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, int(round(fraction * len(members))))
        chosen.extend(rng.choice(members, size=count, replace=False).tolist())
    return torch.utils.data.Subset(dataset, sorted(chosen))
