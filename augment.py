"""Image augmentations of BYOL (Grill et al. 2020, arXiv 2006.07733): section 3.3 and appendix B,
table 6, with the semantics of the authors' reference code (DeepMind's BYOL).

BYOL makes two views of each image with two *asymmetric* distributions T and T' (table 6): random
resized crop (area 8%..100%, aspect ratio 3/4..4/3, bicubic resize), horizontal flip (p 0.5), colour
jitter (p 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, applied in a random order),
grayscale (p 0.2), Gaussian blur (p 1.0 for T, 0.1 for T'; sigma in [0.1, 2.0], a 23x23 kernel at
224 pixels) and solarization (p 0 for T, 0.2 for T').

Each op is the reference's, checked numerically against its outputs (``tests/test_reference.py``,
``docs/fidelity.md``): brightness adds an offset (appendix B: "shifted by a uniformly random
offset"), contrast scales around each channel's mean, saturation scales HSV saturation, hue shifts
HSV hue; each colour op is followed by a clip to [0, 1]; grayscale is luma; the blur kernel has
2 * int(size / 10 / 2) + 1 taps with zero padding; solarize maps x >= 0.5 to 1 - x. The crop draws
area and aspect ratio once and clips the box to the image (no rejection sampling).

The work is split in two:

* the geometric part (decode, crop, resize, flip) runs per image in data-loader workers and yields
  uint8 CHW tensors (:func:`geometric_transform`, :class:`TwoViewTransform`);
* the photometric part (jitter, grayscale, blur, solarize, then normalisation) runs batched on the
  training device with independent random parameters per sample (:class:`PhotometricAugment`);
  every op is also callable on its own with one parameter per sample (``adjust_brightness(images,
  delta)``, ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``gaussian_blur(images,
  kernel_size, sigma)``: images [B, 3, H, W] in [0, 1], parameters [B]).

Randomness: the geometric part uses the torch RNG of the worker, the photometric part the global
CPU torch RNG, drawing a fixed number of values per batch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode, v2

# ImageNet's channel statistics: normalisation of ImageNet and custom folders (data.py) and of the
# library's default augmentation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
_STRENGTHS = ("brightness", "contrast", "saturation")
_PAIRS = ("crop_scale", "blur_sigma")
_SOLARIZE_THRESHOLD = 0.5                # on [0, 1] images, as in the paper's appendix B
_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # ITU-R 601-2 luma, the reference's weights


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"augmentation setting {key!r} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ViewAugmentation:
    """Settings of one view's augmentation distribution; defaults are T of table 6 (view 1)."""

    crop_scale: Tuple[float, float] = (0.08, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            key, value = field.name, getattr(self, field.name)
            if key in _PAIRS:
                if not isinstance(value, (tuple, list)) or len(value) != 2:
                    raise ValueError(f"augmentation setting {key!r} must be a pair [low, high], got {value!r}")
                value = (_number(key, value[0]), _number(key, value[1]))
            else:
                value = _number(key, value)
            object.__setattr__(self, key, value)
        for key in _PROBABILITIES:
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"augmentation setting {key!r} is a probability and must be in [0, 1], "
                                 f"got {getattr(self, key)}")
        for key in _STRENGTHS:
            if getattr(self, key) < 0:
                raise ValueError(f"augmentation setting {key!r} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"augmentation setting 'hue' must be in [0, 0.5], got {self.hue}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"augmentation setting 'crop_scale' needs 0 < low <= high <= 1 (fractions of "
                             f"the image area), got {self.crop_scale}")
        low, high = self.blur_sigma
        if not 0.0 < low <= high:
            raise ValueError(f"augmentation setting 'blur_sigma' needs 0 < low <= high (pixels), got {self.blur_sigma}")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> "ViewAugmentation":
        """Builds settings from a config mapping; missing keys keep their defaults. Unknown keys and
        out-of-range values raise ValueError naming the key and what is allowed."""
        if not isinstance(settings, Mapping):
            raise TypeError(f"augmentation settings must be a mapping, got {type(settings).__name__}")
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(str(key) for key in settings if key not in allowed)
        if unknown:
            raise ValueError(f"unknown augmentation setting(s) {', '.join(unknown)}; allowed keys: "
                             f"{', '.join(allowed)}")
        return cls(**settings)


def paper_view_augmentations() -> Tuple[ViewAugmentation, ViewAugmentation]:
    """T and T' of table 6: they differ in blur (1.0 vs 0.1) and solarization (0.0 vs 0.2)."""
    return ViewAugmentation(), ViewAugmentation(blur_p=0.1, solarize_p=0.2)


class ViewSettingsError(ValueError):
    """A bad ``augmentation`` section of a config; ``view`` names the view (or None for the section)."""

    def __init__(self, message: str, view: Optional[str] = None):
        super().__init__(message)
        self.view = view


def view_augmentations(overrides: Optional[Mapping[str, Any]] = None) -> Tuple[ViewAugmentation, ViewAugmentation]:
    """The config's ``augmentation`` section (``{'view1': {...}, 'view2': {...}}``), parsed in this
    one place: table 6's T and T' with each view's overrides applied (missing keys keep that view's
    table 6 value). Raises :class:`ViewSettingsError` naming the view and the bad key or value."""
    overrides = overrides or {}
    if not isinstance(overrides, Mapping) or set(overrides) - {"view1", "view2"}:
        raise ViewSettingsError("expected a mapping with keys view1 and/or view2")
    views = []
    for name, default in zip(("view1", "view2"), paper_view_augmentations()):
        given = overrides.get(name) or {}
        try:
            if not isinstance(given, Mapping):
                raise TypeError(f"augmentation settings must be a mapping, got {type(given).__name__}")
            views.append(ViewAugmentation.from_dict({**dataclasses.asdict(default), **given}) if given else default)
        except (ValueError, TypeError) as error:
            raise ViewSettingsError(str(error), name) from None
    return views[0], views[1]


# ----------------------------------------------------------------- per image, in data-loader workers
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale (PNG, PGM, TIFF)
UNSUPPORTED_MODES = ("F",)  # 32-bit float: no known value range


class UnsupportedImageError(OSError):
    """An image whose pixel format cannot be turned into 8-bit RGB without guessing."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, every mode scaled correctly: Pillow's own ``convert("RGB")`` clips
    16-bit grayscale (``I;16``, 0..65535) at 255, which turns a 16-bit PNG into a white image.
    Here 16-bit values are scaled to 8 bits (/257, rounded); 32-bit integer images (``I``) are read
    as 16-bit when a value exceeds 255, else as 8-bit; palette images with transparency go through
    RGBA (no per-image warning); alpha is dropped (the colour under it is kept, as torchvision does);
    float images (``F``) are refused."""
    image.load()  # every pixel decoded here, as convert() did: a truncated file fails at this point
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in UNSUPPORTED_MODES:
        raise UnsupportedImageError(f"a 32-bit floating-point image (mode {mode}) has no known value range: "
                                    f"convert it to 8-bit RGB or grayscale")
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if low < 0 or high > 65535:
            raise UnsupportedImageError(f"a 32-bit integer image (mode {mode}) with values {low}..{high}, beyond "
                                        f"16 bits: convert it to 8-bit RGB or grayscale")
        scale = 257 if mode in SIXTEEN_BIT_MODES or high > 255 else 1
        eight = ((values * 2 + scale) // (2 * scale)).astype(np.uint8)  # rounded
        return Image.fromarray(eight, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode in ("La", "PA"):
        image = image.convert("RGBA") if mode == "PA" else image.convert("LA")
    return image.convert("RGB")


class _ToUint8Tensor:
    """RGB PIL image (converted if needed) -> uint8 CHW tensor after the given PIL transforms."""

    def __init__(self, transforms: Sequence[Callable]):
        self.pipeline = v2.Compose([*transforms, v2.PILToTensor()])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(to_rgb(image))


def sample_crop(height: int, width: int, scale: Tuple[float, float] = (0.08, 1.0),
                ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """The reference's crop box ``(top, left, h, w)`` for a ``height`` x ``width`` image, from the
    torch RNG: area fraction uniform in ``scale``, aspect ratio w/h log-uniform in ``ratio``, width
    and height rounded, then each clipped to the image (one draw, no rejection), uniform integer
    offsets. torchvision instead retries up to 10 times until the box fits, which favours small
    crops (mean area 0.43 instead of 0.52 on a 500x375 image)."""
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(()).item())
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = math.exp(log_low + (log_high - log_low) * torch.rand(()).item())
    w = min(max(int(round(math.sqrt(area * aspect))), 1), width)
    h = min(max(int(round(math.sqrt(area / aspect))), 1), height)
    top = int(torch.randint(0, height - h + 1, ()).item())
    left = int(torch.randint(0, width - w + 1, ()).item())
    return top, left, h, w


class ReferenceRandomResizedCrop(v2.RandomResizedCrop):
    """torchvision's RandomResizedCrop (resize, interpolation, antialias) with the reference's box
    distribution (:func:`sample_crop`)."""

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        top, left, h, w = sample_crop(height, width, self.scale, self.ratio)
        return dict(top=top, left=left, height=h, width=w)


def geometric_transform(image_size: int, view: ViewAugmentation) -> Callable[[Image.Image], torch.Tensor]:
    """The geometric part of a view (appendix B): random resized crop with area fraction in
    ``view.crop_scale`` and aspect ratio in [3/4, 4/3] (:func:`sample_crop`), bicubic resize to
    ``image_size``, then a horizontal flip with probability ``view.flip_p``. Returns uint8
    [3, image_size, image_size]."""
    return _ToUint8Tensor([
        ReferenceRandomResizedCrop(image_size, scale=view.crop_scale, ratio=(3 / 4, 4 / 3),
                                   interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=view.flip_p),
    ])


class TwoViewTransform:
    """PIL image -> (uint8 view 1, uint8 view 2), the geometric parts of T and T' (section 3.3)."""

    def __init__(self, image_size: int, view1: ViewAugmentation, view2: ViewAugmentation):
        self.view1 = geometric_transform(image_size, view1)
        self.view2 = geometric_transform(image_size, view2)

    def __call__(self, image: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)


def eval_transform(image_size: int, crop_fraction: float = 0.875) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation (appendix C.1): bicubic resize of the shorter side to ``image_size /
    crop_fraction`` (256 for 224), then a central ``image_size`` crop. uint8 output."""
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return _ToUint8Tensor([
        v2.Resize(int(round(image_size / crop_fraction)), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
    ])


def crop_flip_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Linear-classifier training augmentation (appendix C.1): random resized crop and random flip."""
    return geometric_transform(image_size, ViewAugmentation())


# ----------------------------------------------- batched photometric ops on float images in [0, 1]
# Each op takes images [B, 3, H, W] in [0, 1] and one parameter per sample ([B] tensor), and clips
# its result to [0, 1], as the reference does after every colour op.
def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return values.to(device=images.device, dtype=images.dtype).reshape(-1, 1, 1, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, H, W]: luma 0.2989 R + 0.5870 G + 0.1140 B on all three channels."""
    red, green, blue = images.unbind(dim=1)
    luma = _GRAY_WEIGHTS[0] * red + _GRAY_WEIGHTS[1] * green + _GRAY_WEIGHTS[2] * blue
    return luma.unsqueeze(1).expand_as(images)


def adjust_brightness(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Appendix B, "shifted by a uniformly random offset": ``x + delta`` (delta [B]), clipped."""
    return (images + _per_sample(delta, images)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(x - mean_c) * factor + mean_c`` with ``mean_c`` each channel's mean over the image
    (factor [B]), clipped."""
    mean = images.mean(dim=(-2, -1), keepdim=True)
    return ((images - mean) * _per_sample(factor, images) + mean).clamp(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> HSV with hue in [0, 1) (hue 0 where R = G = B)."""
    red, green, blue = images.unbind(dim=1)
    value = images.amax(dim=1)
    spread = value - images.amin(dim=1)
    has_hue = spread > 0
    safe_spread = torch.where(has_hue, spread, torch.ones_like(spread))
    hue = torch.where(value == red, ((green - blue) / safe_spread).remainder(6.0),
                      torch.where(value == green, (blue - red) / safe_spread + 2.0,
                                  (red - green) / safe_spread + 4.0))
    hue = torch.where(has_hue, hue / 6.0, torch.zeros_like(hue))
    saturation = torch.where(value > 0, spread / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    return torch.stack((hue, saturation, value), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n in (R, G, B) = v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n' + 6 h) mod 6 and n' = 5, 3, 1 (no constant tensor built per call)."""
    hue, saturation, value = hsv.unbind(dim=1)
    chroma = value * saturation
    channels = []
    for offset in (5.0, 3.0, 1.0):
        k = (6.0 * hue + offset).remainder(6.0)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV ``s -> clip(s * factor, 0, 1)`` (factor [B]): one RGB-HSV round trip, clipped."""
    hue, saturation, value = rgb_to_hsv(images).unbind(dim=1)
    saturation = (saturation * _per_sample(factor, images)[:, 0]).clamp(0.0, 1.0)
    return hsv_to_rgb(torch.stack((hue, saturation, value), dim=1)).clamp(0.0, 1.0)


def adjust_hue(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """HSV ``h -> (h + delta) mod 1`` (delta [B] in turns): one RGB-HSV round trip, clipped."""
    hue, saturation, value = rgb_to_hsv(images).unbind(dim=1)
    hue = (hue + _per_sample(delta, images)[:, 0]).remainder(1.0)
    return hsv_to_rgb(torch.stack((hue, saturation, value), dim=1)).clamp(0.0, 1.0)


# Column j of the jitter parameters belongs to op j; the reference numbers them the same way
# (0 brightness, 1 contrast, 2 saturation, 3 hue).
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")
_JITTER_OPS = dict(zip(_JITTER_NAMES, (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)))


def blur_kernel_size(image_size: int) -> int:
    """The reference's rule: 2 * int(image_size / 10 / 2) + 1 taps (23 at 224 px, 9 at 96, 3 at 32,
    1 at 16 and below: no blur)."""
    return 2 * int(image_size / 10 / 2) + 1


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` [B] and **zero padding** (the reference's
    'SAME' convolution: borders darken): one depthwise convolution per axis over all B*C channels."""
    batch, channels, height, width = images.shape
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be a positive odd number of taps, got {kernel_size}")
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-offsets.square() / (2.0 * sigma.to(images.device, images.dtype).view(-1, 1).square()))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).unsqueeze(1).expand(batch, channels, kernel_size)
    kernel = kernel.reshape(batch * channels, kernel_size)  # one kernel per (sample, channel)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), padding=(0, half), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), padding=(half, 0), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """``x if x < 0.5 else 1 - x`` (appendix B)."""
    return torch.where(images < _SOLARIZE_THRESHOLD, images, 1.0 - images)


def _check_uint8_batch(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped [B, 3, H, W], got {list(images.shape)}")


class Normalize(nn.Module):
    """uint8 [B, 3, H, W] -> float32 ``(x / 255 - mean) / std`` (the evaluation path, no randomness)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need one value per RGB channel, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize_float(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] -> normalised."""
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_uint8_batch(images)
        return self.normalize_float(images.float() / 255.0)


class PhotometricAugment(nn.Module):
    """Batched, on the training device: colour jitter (p ``jitter_p``: brightness, contrast,
    saturation and hue in a random order per sample, each followed by a clip), grayscale, Gaussian
    blur, solarize (in the order of appendix B), then normalisation with the dataset mean/std.

    Each sample's work is done once. The random parameters are drawn on the CPU (from the global
    CPU torch RNG, which the trial seeds with seed and global step), so which samples take which
    op is known on the host without asking the device: at each of the four jitter positions, for
    each op, the samples whose order puts that op there are gathered (``index_select``), changed
    and scattered back (``index_copy``); grayscale, blur and solarize likewise touch only their
    samples, and an RGB-HSV round trip is made only for a sample's saturation and hue steps. All
    indices and per-sample values travel to the device in two copies per batch (pinned,
    non-blocking on CUDA), so the device is never synchronised with the host.
    """

    def __init__(self, view: ViewAugmentation, mean: Sequence[float], std: Sequence[float], image_size: int):
        super().__init__()
        self.view = view
        self.kernel_size = blur_kernel_size(image_size)
        self.normalize = Normalize(mean, std)

    def sample_parameters(self, batch: int) -> dict:
        """All random draws for ``batch`` samples (a fixed number, whatever the settings or the data),
        from the global CPU torch RNG; CPU tensors, one row per sample."""
        view = self.view

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch)

        def coin(p: float) -> torch.Tensor:
            return torch.rand(batch) < p

        return {
            "jitter": coin(view.jitter_p),
            "factors": torch.stack([                         # columns in _JITTER_OPS order
                uniform(-view.brightness, view.brightness),  # additive offset
                uniform(max(0.0, 1.0 - view.contrast), 1.0 + view.contrast),
                uniform(max(0.0, 1.0 - view.saturation), 1.0 + view.saturation),
                uniform(-view.hue, view.hue),
            ], dim=1),
            "order": torch.rand(batch, 4).argsort(dim=1),
            "grayscale": coin(view.grayscale_p),
            "blur": coin(view.blur_p),
            "sigma": uniform(*view.blur_sigma),
            "solarize": coin(view.solarize_p),
        }

    @staticmethod
    def select(params: dict, rows) -> dict:
        """The parameters of the samples ``rows`` (an index or slice into a larger draw)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu()
        return {key: value[rows] for key, value in params.items()}

    def plan(self, params: dict) -> list:
        """``[(op name, sample indices, per-sample values or None)]`` in the order they apply, on the
        CPU; groups that no sample takes, and ops configured off, are left out."""
        view = self.view
        steps = []
        if view.jitter_p > 0:
            strengths = (view.brightness, view.contrast, view.saturation, view.hue)
            jitter, order, factors = params["jitter"].cpu(), params["order"].cpu(), params["factors"].cpu()
            for position in range(4):
                for op in range(4):
                    if strengths[op] > 0:  # zero strength: the op is the identity (as the reference)
                        rows = torch.nonzero(jitter & (order[:, position] == op)).flatten()
                        steps.append((_JITTER_NAMES[op], rows, factors[rows, op]))
        if view.grayscale_p > 0:
            steps.append(("grayscale", torch.nonzero(params["grayscale"].cpu()).flatten(), None))
        if view.blur_p > 0 and self.kernel_size > 1:  # a 1-tap kernel is the identity
            rows = torch.nonzero(params["blur"].cpu()).flatten()
            steps.append(("blur", rows, params["sigma"].cpu()[rows]))
        if view.solarize_p > 0:
            steps.append(("solarize", torch.nonzero(params["solarize"].cpu()).flatten(), None))
        return [step for step in steps if len(step[1])]

    def _run_step(self, name, images: torch.Tensor, values: Optional[torch.Tensor]) -> torch.Tensor:
        if name == "grayscale":
            return rgb_to_grayscale(images)
        if name == "blur":
            return gaussian_blur(images, self.kernel_size, values)
        if name == "solarize":
            return solarize(images)
        return _JITTER_OPS[name](images, values)

    def forward(self, images: torch.Tensor, params: Optional[dict] = None) -> torch.Tensor:
        """Augments a uint8 batch. ``params`` (from :meth:`sample_parameters`, one row per image)
        lets the caller draw them, e.g. once for a whole global batch so that any number of
        processes apply the same augmentation to the same image."""
        _check_uint8_batch(images)
        if params is None:
            params = self.sample_parameters(images.shape[0])
        elif len(params["sigma"]) != images.shape[0]:
            raise ValueError(f"params hold {len(params['sigma'])} samples for a batch of {images.shape[0]}")
        x = images.float() / 255.0
        steps = self.plan(params)
        if steps:
            rows, values = _to_device([torch.cat([rows for _, rows, _ in steps]),
                                       torch.cat([v for _, _, v in steps if v is not None] or [torch.zeros(0)])],
                                      x.device)
            row_start = value_start = 0
            for name, cpu_rows, cpu_values in steps:
                count = len(cpu_rows)
                index = rows[row_start:row_start + count]
                row_start += count
                step_values = None
                if cpu_values is not None:
                    step_values = values[value_start:value_start + count]
                    value_start += count
                x.index_copy_(0, index, self._run_step(name, x.index_select(0, index), step_values))
        return self.normalize.normalize_float(x)


def _to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list:
    """CPU tensors to ``device`` without blocking the host (pinned memory on CUDA)."""
    if device.type == "cpu":
        return list(tensors)
    if device.type == "cuda":
        tensors = [t.pin_memory() for t in tensors]
    return [t.to(device, non_blocking=True) for t in tensors]


# ----------------------------------------------------------------------------- the library's default
# ``byol.BYOL(net, image_size)(images)`` augments both views itself, batched on the images' device:
# the crop and flip per sample with one roi_align, then the photometric part above.
def random_resized_crop_boxes(batch: int, height: int, width: int, scale=(0.08, 1.0),
                              ratio=(3 / 4, 4 / 3), generator=None, device=None) -> torch.Tensor:
    """One random crop box (x1, y1, x2, y2) per sample, with area share in ``scale`` and aspect ratio
    in ``ratio`` (log-uniform), as in the paper's table 6 random crop. Boxes are clipped to the image."""
    area = torch.empty(batch, device=device).uniform_(*scale, generator=generator) * height * width
    log_ratio = torch.empty(batch, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                           generator=generator)
    aspect = torch.exp(log_ratio)
    crop_w = torch.sqrt(area * aspect).clamp(1, width)
    crop_h = torch.sqrt(area / aspect).clamp(1, height)
    x1 = torch.rand(batch, device=device, generator=generator) * (width - crop_w)
    y1 = torch.rand(batch, device=device, generator=generator) * (height - crop_h)
    return torch.stack([x1, y1, x1 + crop_w, y1 + crop_h], dim=1)


class BatchedCropFlip(nn.Module):
    """Per-sample random resized crop and horizontal flip of a whole batch at once.

    ``torchvision.ops.roi_align`` crops and bilinearly resizes every sample's own box in one call;
    that is why this is ours rather than torchvision's ``RandomResizedCrop``, which draws one crop per
    call (the Determined trial crops per image in data-loader workers instead, :func:`geometric_transform`).
    """

    def __init__(self, image_size: int, scale=(0.08, 1.0), flip_p: float = 0.5):
        super().__init__()
        self.image_size, self.scale, self.flip_p = image_size, tuple(scale), flip_p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        batch, _, height, width = images.shape
        boxes = random_resized_crop_boxes(batch, height, width, self.scale, device=images.device)
        rois = torch.cat([torch.arange(batch, device=images.device, dtype=boxes.dtype)[:, None], boxes], 1)
        crops = roi_align(images.float(), rois, output_size=self.image_size, aligned=True)
        flip = torch.rand(batch, device=images.device) < self.flip_p
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
        return crops.round().clamp(0, 255).to(torch.uint8) if not images.is_floating_point() else crops


def default_augmentation(image_size: int, view: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batched version of the paper's table 6 pipeline (view 1 or 2) for ``learner(images)`` calls.

    Takes float images in [0, 1] or uint8 batches; returns normalised floats (ImageNet statistics).
    """
    settings = paper_view_augmentations()[view - 1]
    return nn.Sequential(
        _ToUint8(),
        BatchedCropFlip(image_size, settings.crop_scale, settings.flip_p),
        PhotometricAugment(settings, IMAGENET_MEAN, IMAGENET_STD, image_size),
    )


class _ToUint8(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return images
