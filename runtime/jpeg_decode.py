"""Decoding ImageNet's JPEGs for the two views: only what the crops need.

BYOL's views start with a random resized crop of 8% to 100% of the image (table 6), resized to 224
pixels. Decoding every JPEG whole with PIL in the data-loader workers (346 images per CPU-second with
both crops, issue 12) is the data pipeline's cost on ImageNet. Two faster paths, same geometry:

* ``data.decode: draft`` (CPU): the crop boxes are drawn from the image size in the JPEG header,
  then PIL's draft mode decodes the image at the smallest of the scales 1/1, 1/2, 1/4, 1/8 (the
  JPEG DCT scaling of libjpeg) that still gives both crops at least ``image_size`` pixels, and the
  crops are resized from that. Same random draws, boxes and flips as ``augment.TwoViewTransform``;
  pixels differ by the DCT downscale only (tested).
* ``data.decode: device``: workers only read the bytes and draw the crop boxes and flips from the
  header (:class:`EncodedTwoViews`); the training process decodes the whole batch at once with
  ``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on CUDA, libjpeg on CPU) and crops, resizes
  (bicubic, antialiased) and flips each image on that device (:meth:`EncodedBatch.decode`).
  Images that are not baseline RGB/grayscale JPEGs (ImageNet holds a few CMYK JPEGs and a PNG) are
  re-encoded as JPEG by the worker so that every item decodes the same way.

Evaluation images keep the plain PIL path (``augment.eval_transform``).
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import augment

DECODE_MODES = ("pil", "draft", "device")
_RATIO = (3 / 4, 4 / 3)      # table 6's aspect ratios, as augment.geometric_transform
_DRAFT_SCALES = (8, 4, 2)    # libjpeg's DCT downscales


def open_lazy(data: bytes) -> Image.Image:
    """The image behind ``data``, header parsed, pixels not decoded yet (PIL opens lazily)."""
    return Image.open(io.BytesIO(data))


def read_lazy(path: str) -> Image.Image:
    """ImageFolder loader for the draft and device paths: the file's bytes, not decoded."""
    with open(path, "rb") as handle:
        return open_lazy(handle.read())


def encoded_bytes(image: Image.Image) -> bytes:
    """The undecoded bytes behind a lazily opened image (:func:`open_lazy`)."""
    source = getattr(image, "fp", None)
    if not isinstance(source, io.BytesIO):
        raise TypeError("expected an image opened lazily from bytes (jpeg_decode.open_lazy); the dataset "
                        "decoded it already")
    return source.getvalue()


class _ViewSampler:
    """Crop box and flip of one view, drawn from the image size with the same transforms (and so
    the same random draws) as ``augment.geometric_transform``."""

    def __init__(self, view: augment.ViewAugmentation, image_size: int):
        self.crop = augment.ReferenceRandomResizedCrop(image_size, scale=view.crop_scale, ratio=_RATIO)
        self.flip_p = view.flip_p

    def __call__(self, image: Image.Image) -> Tuple[int, int, int, int, bool]:
        box = self.crop.make_params([image])
        flip = bool(torch.rand(1) < self.flip_p)   # v2.RandomHorizontalFlip's draw
        return box["top"], box["left"], box["height"], box["width"], flip


def draft_scale(image_size: int, crops: Sequence[Tuple[int, int, int, int, bool]]) -> int:
    """The largest JPEG downscale (8, 4, 2 or 1) that leaves every crop at least ``image_size``
    pixels on each side."""
    smallest = min(min(height, width) for _, _, height, width, _ in crops)
    for scale in _DRAFT_SCALES:
        if smallest / scale >= image_size:
            return scale
    return 1


class DraftTwoViewTransform:
    """Lazily opened image -> (uint8 view 1, uint8 view 2), decoding at the coarsest JPEG scale
    the two crops allow (module docstring). Non-JPEG images are decoded whole."""

    def __init__(self, image_size: int, view1: augment.ViewAugmentation, view2: augment.ViewAugmentation):
        self.image_size = image_size
        self.samplers = (_ViewSampler(view1, image_size), _ViewSampler(view2, image_size))

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        crops = [sampler(image) for sampler in self.samplers]
        width, height = image.size
        if image.format == "JPEG":
            scale = draft_scale(self.image_size, crops)
            image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        image = augment.to_rgb(image)
        fx, fy = image.size[0] / width, image.size[1] / height  # the decoded scale
        views = []
        for top, left, crop_height, crop_width, flip in crops:
            box = (left * fx, top * fy, (left + crop_width) * fx, (top + crop_height) * fy)
            view = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
            if flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(TF.pil_to_tensor(view))
        return views[0], views[1]


@dataclass
class EncodedTwoViews:
    """One image as the device path's worker delivers it: its JPEG bytes and both views' crop
    parameters ``[2, 5]`` (top, left, height, width, flip)."""

    data: torch.Tensor     # uint8 [n], the encoded file
    crops: torch.Tensor    # int64 [2, 5]


class EncodedTwoViewTransform:
    """Lazily opened image -> :class:`EncodedTwoViews` (the worker's part of ``decode: device``)."""

    def __init__(self, image_size: int, view1: augment.ViewAugmentation, view2: augment.ViewAugmentation):
        self.samplers = (_ViewSampler(view1, image_size), _ViewSampler(view2, image_size))

    def __call__(self, image: Image.Image) -> EncodedTwoViews:
        crops = torch.tensor([sampler(image) for sampler in self.samplers], dtype=torch.int64)
        if image.format == "JPEG" and image.mode in ("RGB", "L"):
            data = encoded_bytes(image)
        else:  # CMYK JPEG, PNG, ...: decoded here once and re-encoded as a plain JPEG
            buffer = io.BytesIO()
            augment.to_rgb(image).save(buffer, format="JPEG", quality=95)
            data = buffer.getvalue()
        return EncodedTwoViews(torch.frombuffer(bytearray(data), dtype=torch.uint8), crops)


@dataclass
class EncodedBatch:
    """A batch of :class:`EncodedTwoViews` (``collate_encoded``); stays on the host until
    :meth:`decode` (the decoder reads host memory and writes the device)."""

    data: List[torch.Tensor]
    crops: torch.Tensor    # int64 [B, 2, 5]

    def __len__(self) -> int:
        return len(self.data)

    def decode(self, image_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both views as uint8 [B, 3, image_size, image_size] on ``device``: one batched decode
        (nvJPEG on CUDA), then per image a bicubic antialiased resized crop and flip there."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images = decode_jpeg(self.data, mode=ImageReadMode.RGB, device=device)
        crops = self.crops.tolist()   # host tensor: no device synchronisation
        views = ([], [])
        for image, per_view in zip(images, crops):
            for index, (top, left, height, width, flip) in enumerate(per_view):
                view = TF.resized_crop(image, top, left, height, width, [image_size, image_size],
                                       interpolation=InterpolationMode.BICUBIC, antialias=True)
                views[index].append(view.flip(-1) if flip else view)
        return torch.stack(views[0]), torch.stack(views[1])


def collate_encoded(items: Sequence) -> Tuple[EncodedBatch, torch.Tensor]:
    """DataLoader collate for ``(EncodedTwoViews, label)`` items."""
    encoded = [item[0] for item in items]
    labels = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
    return EncodedBatch([e.data for e in encoded], torch.stack([e.crops for e in encoded])), labels
