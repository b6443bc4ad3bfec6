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
  (bicubic, antialiased) and flips every view in one batched call on that device
  (:meth:`EncodedBatch.decode`, :func:`resized_crops`), one batch ahead of the step in the
  prefetcher, on a side CUDA stream (``runtime/loaders.prefetch_to_device``).
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

    def pin_memory(self) -> "EncodedBatch":
        """Called by the DataLoader's pinning thread: the crop boxes then reach the device with a
        truly asynchronous copy (the JPEG bytes are read by the decoder itself)."""
        return EncodedBatch(self.data, self.crops.pin_memory())

    def decode(self, image_size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Both views as uint8 [B, 3, image_size, image_size] on ``device``: one batched decode
        (nvJPEG on CUDA), then every view's bicubic antialiased resized crop and flip in one
        batched call (:func:`resized_crops`). Issues no synchronisation of torch's streams: the
        decoder reads host memory, the crop boxes (pinned by the DataLoader, :meth:`pin_memory`) are
        copied without waiting. On CUDA torchvision decodes on its own stream and makes the current
        stream (the prefetcher's side stream) wait for it; before each call it waits on the host
        for its own previous decode only."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images = decode_jpeg(self.data, mode=ImageReadMode.RGB, device=device)
        views = resized_crops(images, self.crops.to(device, non_blocking=True), image_size)
        return views[0], views[1]


def _bicubic_aa(x: torch.Tensor) -> torch.Tensor:
    """The cubic convolution kernel (Keys, a = -0.5) of torch's antialiased bicubic resize."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, far * (x < 2))


def resize_weights(starts: torch.Tensor, lengths: torch.Tensor, output_size: int, span: int) -> torch.Tensor:
    """Float32 ``[N, output_size, span]``: row ``i`` of crop ``n`` holds the weights by which
    ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` makes output pixel
    ``i`` from the pixels ``starts[n] .. starts[n] + lengths[n] - 1`` of an axis of ``span`` pixels
    (zero elsewhere). The same formulas as ATen's antialiased kernels (Pillow's): centre
    ``scale * (i + 0.5)``, support ``2 * max(scale, 1)``, kernel stretched by ``max(scale, 1)``,
    weights clipped to the crop and normalised to sum 1."""
    starts = starts.to(torch.float32)[:, None, None]
    lengths = lengths.to(torch.float32)[:, None, None]
    scale = lengths / output_size
    stretch = scale.clamp(min=1.0)
    support = 2.0 * stretch
    centre = scale * (torch.arange(output_size, device=starts.device, dtype=torch.float32)[None, :, None] + 0.5)
    position = torch.arange(span, device=starts.device, dtype=torch.float32)[None, None, :] - starts  # in the crop
    low = (centre - support + 0.5).floor().clamp(min=0)
    high = torch.minimum((centre + support + 0.5).floor(), lengths)
    inside = (position >= low) & (position < high)
    weights = _bicubic_aa((position - centre + 0.5) / stretch) * inside
    return weights / weights.sum(-1, keepdim=True)


def resized_crops(images: Sequence[torch.Tensor], crops: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 ``[V, B, C, image_size, image_size]`` (each view contiguous): for every image ``b``
    (uint8 ``[C, H_b, W_b]``) and view ``v`` the crop ``crops[b, v] = (top, left, height, width,
    flip)`` resized (bicubic, antialiased) and flipped, equal to ``TF.resized_crop`` + ``flip`` per
    view up to float and uint8 rounding (tests/test_jpeg_decode.py).

    Hand-written because torchvision resizes one crop size per call (one call per view, 2B per
    step): the resize is separable, so here every view is two batched matrix products with
    :func:`resize_weights` over the images zero-padded to the batch's largest (the weights are
    zero outside each crop, a flip reverses the rows of the horizontal weights). Cost: the padded
    batch is B x C x H_max x W_max float32 (64 ImageNet-sized images of 500 x 375: 144 MB), and the
    two products take 2 B V C S H_max (W_max + S) flops for S = image_size (47 GFLOP there), so one
    very large image in a batch makes the whole batch's crops dearer."""
    batch, views = crops.shape[:2]
    channels = images[0].shape[0]
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    padded = images[0].new_zeros((batch, channels, height, width))
    for index, image in enumerate(images):   # one copy per image into the batch
        padded[index, :, :image.shape[-2], :image.shape[-1]].copy_(image)
    boxes = crops.reshape(batch * views, 5)
    vertical = resize_weights(boxes[:, 0], boxes[:, 2], image_size, height).view(batch, views, 1, image_size, height)
    vertical = vertical.transpose(0, 1)                                             # [V, B, 1, S, H]
    horizontal = resize_weights(boxes[:, 1], boxes[:, 3], image_size, width)
    horizontal = torch.where(boxes[:, 4, None, None].bool(), horizontal.flip(1), horizontal)
    horizontal = horizontal.view(batch, views, 1, image_size, width).transpose(0, 1).transpose(-1, -2)
    rows = padded.to(torch.float32) @ horizontal   # [B, C, H, W] @ [V, B, 1, W, S] -> [V, B, C, H, S]
    resized = vertical @ rows                      # [V, B, 1, S, H] @ [V, B, C, H, S] -> [V, B, C, S, S]
    return resized.clamp_(0, 255).round_().to(torch.uint8)


def decode_batch(batch: Tuple[EncodedBatch, torch.Tensor], image_size: int,
                 device: torch.device) -> Tuple[Tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(EncodedBatch, labels)`` -> ``((view 1, view 2), labels)`` decoded on ``device``: the
    training loader's ``prepare`` for ``data.decode: device`` (``loaders.prefetch_to_device``)."""
    encoded, labels = batch
    return encoded.decode(image_size, device), labels


def collate_encoded(items: Sequence) -> Tuple[EncodedBatch, torch.Tensor]:
    """DataLoader collate for ``(EncodedTwoViews, label)`` items."""
    encoded = [item[0] for item in items]
    labels = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
    return EncodedBatch([e.data for e in encoded], torch.stack([e.crops for e in encoded])), labels
