"""Image augmentations of BYOL (Grill et al. 2020, arXiv 2006.07733): section 3.3 and appendix B,
table 6.

BYOL makes two views of each image with two *asymmetric* distributions T and T' (table 6): random
resized crop (area 8%..100%, aspect ratio 3/4..4/3, bicubic resize), horizontal flip (p 0.5), colour
jitter (p 0.8; brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, applied in a random order),
grayscale (p 0.2), Gaussian blur (p 1.0 for T, 0.1 for T'; sigma in [0.1, 2.0], a 23x23 kernel at
224 pixels) and solarization (p 0 for T, 0.2 for T').

The work is split in two:

* the geometric part (decode, crop, resize, flip) runs per image in data-loader workers and yields
  uint8 CHW tensors (:func:`geometric_transform`, :class:`TwoViewTransform`);
* the photometric part (jitter, grayscale, blur, solarize, then normalisation) runs batched on the
  training device with independent random parameters per sample (:class:`PhotometricAugment`).
  Its ops follow ``torchvision.transforms.v2.functional`` (same formulas, float images in [0, 1]),
  vectorised over per-sample factors of shape [B, 1, 1, 1].

Randomness: the geometric part uses the torch RNG of the worker, the photometric part the global
torch RNG of the batch's device, drawing a fixed number of values per batch.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode, v2

_PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")
_STRENGTHS = ("brightness", "contrast", "saturation")
_PAIRS = ("crop_scale", "blur_sigma")
_SOLARIZE_THRESHOLD = 0.5                # on [0, 1] images, as in the paper's appendix B
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)   # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_BLUR_KERNEL_AT_224 = 23


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


# ----------------------------------------------------------------- per image, in data-loader workers
class _ToUint8Tensor:
    """RGB PIL image (converted if needed) -> uint8 CHW tensor after the given PIL transforms."""

    def __init__(self, transforms: Sequence[Callable]):
        self.pipeline = v2.Compose([*transforms, v2.PILToTensor()])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.pipeline(image)


def geometric_transform(image_size: int, view: ViewAugmentation) -> Callable[[Image.Image], torch.Tensor]:
    """The geometric part of a view (appendix B): random resized crop with area fraction in
    ``view.crop_scale`` and aspect ratio in [3/4, 4/3], bicubic resize to ``image_size``, then a
    horizontal flip with probability ``view.flip_p``. Returns uint8 [3, image_size, image_size]."""
    return _ToUint8Tensor([
        v2.RandomResizedCrop(image_size, scale=view.crop_scale, ratio=(3 / 4, 4 / 3),
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
def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, H, W] luma replicated on all channels (torchvision's weights)."""
    red, green, blue = images.unbind(dim=1)
    luma = _GRAY_WEIGHTS[0] * red + _GRAY_WEIGHTS[1] * green + _GRAY_WEIGHTS[2] * blue
    return luma.unsqueeze(1).expand_as(images)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Scales intensities by ``factor`` [B, 1, 1, 1] (0 gives black, 1 the original)."""
    return (images * factor).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blends each image with its mean gray level (0 gives a uniform gray image)."""
    mean = rgb_to_grayscale(images)[:, :1].mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blends each image with its grayscale version (0 gives grayscale, 1 the original)."""
    return _blend(images, rgb_to_grayscale(images), factor)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> HSV with hue in [0, 1)."""
    red, green, blue = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    spread = value - images.min(dim=1).values
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
    with k = (n' + 6 h) mod 6 and n' = 5, 3, 1."""
    hue, saturation, value = (channel.unsqueeze(1) for channel in hsv.unbind(dim=1))
    offsets = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = (offsets + 6.0 * hue).remainder(6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the hue by ``shift`` [B, 1, 1, 1] (in turns, |shift| <= 0.5) in HSV space."""
    hsv = rgb_to_hsv(images)
    hue = (hsv[:, :1] + shift).remainder(1.0)
    return hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), dim=1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 apply: torch.Tensor, active: Sequence[bool] = (True, True, True, True)) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with per-sample ``factors`` [B, 4] (in that column
    order), applied in a per-sample ``order`` ([B, 4], a permutation of 0..3 per row: appendix B
    applies the four "in a randomly selected order") to the samples where ``apply`` [B] is true.

    Vectorised without host synchronisation: at each of the four steps every op is computed for
    the whole batch and kept only where it is that sample's op for the step (``torch.where``), so
    untouched samples stay bit-exact. ``active`` [4] skips ops configured with zero strength."""
    for step in range(4):
        for index, op in enumerate(_JITTER_OPS):
            if not active[index]:  # zero strength: the op is the identity, skip its cost
                continue
            chosen = _per_sample((order[:, step] == index) & apply)
            images = torch.where(chosen, op(images, _per_sample(factors[:, index])), images)
    return images


def blur_kernel_size(image_size: int) -> int:
    """The paper's 23-pixel kernel at 224 pixels, scaled to ``image_size`` and made odd (>= 3)."""
    size = int(round(image_size * _BLUR_KERNEL_AT_224 / 224))
    size += 1 - size % 2
    return max(size, 3)


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` [B] and reflect padding (as torchvision's
    gaussian_blur): one depthwise (grouped) convolution per axis over all B*C channels."""
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    if half >= min(height, width):
        raise ValueError(f"blur kernel of {kernel_size} pixels is too large for {height}x{width} images")
    offsets = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(images.dtype).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, k]
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (0, 0, half, half), mode="reflect"),
                    kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (half, half, 0, 0), mode="reflect"),
                    kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Inverts values at or above 0.5 (x -> 1 - x), as torchvision's solarize on [0, 1] floats."""
    return torch.where(images >= _SOLARIZE_THRESHOLD, 1.0 - images, images)


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
    """Batched, on the training device: colour jitter, grayscale, Gaussian blur, solarize (in the
    order of appendix B), then normalisation with the dataset mean/std. Independent random
    parameters per sample, drawn from the global torch RNG of the batch's device."""

    def __init__(self, view: ViewAugmentation, mean: Sequence[float], std: Sequence[float], image_size: int):
        super().__init__()
        self.view = view
        self.kernel_size = blur_kernel_size(image_size)
        self.normalize = Normalize(mean, std)

    def sample_parameters(self, batch: int, device: torch.device) -> dict:
        """All random draws for one batch (a fixed number, whatever the settings or the data)."""
        view = self.view

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, device=device)

        def coin(p: float) -> torch.Tensor:
            return torch.rand(batch, device=device) < p

        return {
            "jitter": coin(view.jitter_p),
            "factors": torch.stack([
                uniform(max(0.0, 1.0 - view.brightness), 1.0 + view.brightness),
                uniform(max(0.0, 1.0 - view.contrast), 1.0 + view.contrast),
                uniform(max(0.0, 1.0 - view.saturation), 1.0 + view.saturation),
                uniform(-view.hue, view.hue),
            ], dim=1),
            "order": torch.rand(batch, 4, device=device).argsort(dim=1),
            "grayscale": coin(view.grayscale_p),
            "blur": coin(view.blur_p),
            "sigma": uniform(*view.blur_sigma),
            "solarize": coin(view.solarize_p),
        }

    @staticmethod
    def select(params: dict, rows: torch.Tensor) -> dict:
        """The parameters of the samples ``rows`` (an index or slice into a larger draw)."""
        return {key: value[rows] for key, value in params.items()}

    def forward(self, images: torch.Tensor, params: Optional[dict] = None) -> torch.Tensor:
        """Augments a uint8 batch. ``params`` (from :meth:`sample_parameters`, one row per image)
        lets the caller draw them, e.g. once for a whole global batch so that any number of
        processes apply the same augmentation to the same image."""
        _check_uint8_batch(images)
        if params is None:
            params = self.sample_parameters(images.shape[0], images.device)
        elif len(params["sigma"]) != images.shape[0]:
            raise ValueError(f"params hold {len(params['sigma'])} samples for a batch of {images.shape[0]}")
        view = self.view
        x = images.float() / 255.0
        if view.jitter_p > 0:
            active = (view.brightness > 0, view.contrast > 0, view.saturation > 0, view.hue > 0)
            x = color_jitter(x, params["factors"], params["order"], params["jitter"], active)
        if view.grayscale_p > 0:
            x = torch.where(_per_sample(params["grayscale"]), rgb_to_grayscale(x), x)
        if view.blur_p > 0:
            x = torch.where(_per_sample(params["blur"]), gaussian_blur(x, self.kernel_size, params["sigma"]), x)
        if view.solarize_p > 0:
            x = torch.where(_per_sample(params["solarize"]), solarize(x), x)
        return self.normalize.normalize_float(x)
