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
  training device with independent random parameters per sample (:class:`PhotometricAugment`;
  both views as one batch: :class:`PhotometricViews`). It is one static program, as the reference
  runs its conditional ops under ``vmap``: per-sample decisions are neutral parameters and masks,
  never a data-dependent shape or a host read, so the ops are the same for any batch and any
  draws (148 top-level aten ops for both views, draws included: ``tests/test_augment.py``) and
  ``torch.compile`` captures it whole. On a CPU it runs over cache-sized groups of images
  (:func:`_run_program`), with ops chosen for their CPU kernels (bench/RESULTS.md, issue 16 row
  c). Every op is also callable on its own with one parameter per sample
  (``adjust_brightness(images, delta)``, ``adjust_contrast``, ``adjust_saturation``,
  ``adjust_hue``, ``gaussian_blur(images, kernel_size, sigma)``: images [B, 3, H, W] in [0, 1],
  parameters [B]), with the same arithmetic as inside the batch.

Randomness: the geometric part uses the torch RNG of the worker, the photometric part the global
CPU torch RNG, drawing a fixed number of values per batch (13 per sample, in one ``torch.rand``).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import types
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
# its result to [0, 1], as the reference does after every colour op. Each is written as the stage of
# the batched pipeline that runs it (:func:`_rgb_stage`, :func:`_hsv_stage`, ...), so that one
# sample alone and the same sample in a batch get the same arithmetic. The stages work on images
# flattened to [B, 3, H * W] (per-sample parameters [B, k, 1]): a reduction or a channel mix is then
# one plain op, without reshapes around it.
#
# On a CPU every stage is a handful of full passes over the batch, so the ops are chosen for their
# CPU kernels as well: vectorised in-place ops where the result replaces the input (``mul_``,
# ``add_``, ``clamp_``, ``lerp_``), 0/1 ``lerp`` weights as exact selects and ``frac`` for a period
# (ATen's CPU ``where``, ``remainder`` and indexed ``max`` took 5-40x as long as these, one thread).
_TINY = torch.finfo(torch.float32).tiny
_HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)  # n' of hsv_to_rgb for (R, G, B)
# the hue shifts of (R, G, B) in turns: n' / 6 plus one whole turn, which keeps the argument of
# ``frac`` in _hsv_stage positive (hue >= -1/6 turn, delta >= -1/2) without changing its fraction
_HUE_TURN_OFFSETS = tuple(1.0 + offset / 6.0 for offset in _HUE_CHANNEL_OFFSETS)


def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[B] values -> [B, 1, 1], to broadcast over flattened images [B, C, H * W]."""
    return values.to(device=images.device, dtype=images.dtype).reshape(-1, 1, 1)


def _constant(values, images: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=images.device, dtype=images.dtype)


def _mix_channels(matrix: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """[D, 3] x flattened [B, 3, P] -> [B, D, P]: each output channel a weighted sum of the input's
    (one matrix product)."""
    return torch.matmul(matrix, images)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, H, W]: luma 0.2989 R + 0.5870 G + 0.1140 B on all three channels."""
    luma = _mix_channels(_constant([_GRAY_WEIGHTS], images), images.flatten(2))
    return luma.view(images.shape[0], 1, *images.shape[2:]).expand_as(images)


def _rgb_stage(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mean_weight: torch.Tensor,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``clip(x * scale + shift + mean_c * mean_weight)`` on flattened images [B, 3, P], with
    ``mean_c`` each channel's mean over the image and one value of each parameter per sample
    ([B, 1, 1]): brightness is ``(1, delta, 0)``, contrast ``(factor, 0, 1 - factor)``, nothing
    ``(1, 0, 0)`` (exactly x). ``out=images`` works in place (the pipeline's own buffer): three
    in-place passes, which took a third of the time of one ``addcmul`` with two per-sample operands
    on a CPU thread."""
    offset = torch.addcmul(shift, images.mean(dim=-1, keepdim=True), mean_weight)
    return torch.mul(images, scale, out=out).add_(offset).clamp_(0.0, 1.0)


def _flat_stage(stage: Callable[..., torch.Tensor], images: torch.Tensor, *args) -> torch.Tensor:
    """A stage on [B, 3, H, W] images: the same arithmetic as inside the batched pipeline."""
    return stage(images.flatten(2), *args).view_as(images)


def adjust_brightness(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Appendix B, "shifted by a uniformly random offset": ``x + delta`` (delta [B]), clipped."""
    delta = _per_sample(delta, images)
    return _flat_stage(_rgb_stage, images, torch.ones_like(delta), delta, torch.zeros_like(delta))


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``(x - mean_c) * factor + mean_c`` with ``mean_c`` each channel's mean over the image
    (factor [B]), clipped (computed as ``x * factor + mean_c * (1 - factor)``)."""
    factor = _per_sample(factor, images)
    return _flat_stage(_rgb_stage, images, factor, torch.zeros_like(factor), 1.0 - factor)


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
    for offset in _HUE_CHANNEL_OFFSETS:
        k = (6.0 * hue + offset).remainder(6.0)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def _hsv_stage(images: torch.Tensor, saturation_factor: torch.Tensor, hue_shifts: torch.Tensor,
               constants: "_Constants") -> torch.Tensor:
    """Saturation or hue on flattened images [B, 3, P]: one RGB-HSV-RGB round trip without
    building the HSV image. With value v = max, chroma c = max - min and the hue h in turns (from
    the channel that holds the max: (G - B) / 6c, (B - R) / 6c + 1/3 or (R - G) / 6c + 2/3, the
    first such channel on ties, picked by exact 0/1 ``lerp`` weights), saturation
    ``s -> min(s * factor, 1)`` is ``c -> c' = min(c * factor, v)``, and each channel n of
    :func:`hsv_to_rgb` is ``v - 6 c' clamp(min(t, 2/3 - t), 0, 1/6)`` with
    ``t = frac(h + shift_n)`` (k / 6 of :func:`hsv_to_rgb`; one period). ``saturation_factor``
    [B, 1, 1]; ``hue_shifts`` [B, 3, 1] = ``delta + (5, 3, 1) / 6 + 1`` (:func:`_hue_shifts`);
    ``constants``: its ``channel_differences`` and ``sextant_offsets`` (:class:`_Constants`).
    Neutral values (1, no delta) give back x up to float rounding; the result ``v - c' w`` with
    c' <= v and w in [0, 1] is already in [0, 1], no clip needed."""
    value = images.amax(dim=1, keepdim=True)
    spread = torch.sub(value, images.amin(dim=1, keepdim=True))
    # (G - B, B - R, R - G) (exact: products by 0 and +-1), then the hue each channel would give as the max
    hues = torch.matmul(constants.channel_differences, images)
    torch.addcdiv(constants.sextant_offsets, hues, spread.clamp_min(_TINY), value=1.0 / 6.0, out=hues)
    not_max = torch.sub(value, images).sign_()  # 0 where the channel holds the max, else 1
    red, green, blue = hues.split(1, dim=1)
    red_not_max, green_not_max, _ = not_max.split(1, dim=1)
    hue = torch.lerp(green, blue, green_not_max)
    torch.lerp(red, hue, red_not_max, out=hue)
    turns = torch.add(hue, hue_shifts, out=hues).frac_()  # one buffer reused: few big allocations
    weight = torch.minimum(turns, torch.rsub(turns, 2.0 / 3.0), out=turns).clamp_(0.0, 1.0 / 6.0)
    chroma = torch.minimum(spread.mul_(saturation_factor), value, out=spread)
    return torch.addcmul(value, chroma, weight, value=-6.0, out=weight)


_CHANNEL_DIFFERENCES = ((0.0, 1.0, -1.0), (-1.0, 0.0, 1.0), (1.0, -1.0, 0.0))  # (G - B, B - R, R - G)
_SEXTANT_OFFSETS = (0.0, 1.0 / 3.0, 2.0 / 3.0)  # the hue (turns) where R, G, B is the max and the others equal


def _hsv_constants(images: torch.Tensor) -> types.SimpleNamespace:
    return types.SimpleNamespace(channel_differences=_constant(_CHANNEL_DIFFERENCES, images),
                                 sextant_offsets=_constant(_SEXTANT_OFFSETS, images).view(1, 3, 1))


def _hue_shifts(delta: torch.Tensor) -> torch.Tensor:
    """[B] hue deltas (turns) -> [B, 3] shifts of t for (R, G, B): ``delta + (5, 3, 1) / 6 + 1``."""
    return delta.reshape(-1, 1) + delta.new_tensor(_HUE_TURN_OFFSETS)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """HSV ``s -> clip(s * factor, 0, 1)`` (factor [B]), hue and value kept."""
    factor = _per_sample(factor, images)
    shifts = _hue_shifts(torch.zeros_like(factor)).view(-1, 3, 1)
    return _flat_stage(_hsv_stage, images, factor, shifts, _hsv_constants(images))


def adjust_hue(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """HSV ``h -> (h + delta) mod 1`` (delta [B] in turns), saturation and value kept."""
    delta = delta.to(device=images.device, dtype=images.dtype)
    factor = torch.ones_like(_per_sample(delta, images))
    return _flat_stage(_hsv_stage, images, factor, _hue_shifts(delta).view(-1, 3, 1), _hsv_constants(images))


def blur_kernel_size(image_size: int) -> int:
    """The reference's rule: 2 * int(image_size / 10 / 2) + 1 taps (23 at 224 px, 9 at 96, 3 at 32,
    1 at 16 and below: no blur)."""
    return 2 * int(image_size / 10 / 2) + 1


_BLUR_BLOCK = 32         # output rows (columns) per band block of the blur: measured fastest on a CPU, 16-64
_NO_BLUR_SIGMA = 1e-6    # a sample that is not blurred gets this sigma: its kernel is exactly (0, .., 1, .., 0)


def _negative_half_squares(kernel_size: int) -> torch.Tensor:
    """``-t^2 / 2`` for the taps t = -half..half of a kernel, then ``-inf`` (float32, CPU): the
    exponents of :func:`_blur_kernels`, the last one giving the zero that the band indices point at."""
    half = kernel_size // 2
    squares = -torch.arange(-half, half + 1, dtype=torch.float32).square() / 2.0
    return F.pad(squares, (0, 1), value=-math.inf)


def _blur_kernels(sigma: torch.Tensor, negative_half_squares: torch.Tensor) -> torch.Tensor:
    """[B] sigmas -> [B, taps + 1]: normalised Gaussian kernels ``exp(-t^2 / (2 sigma^2))`` (one
    softmax: ``exp`` of the exponents over their sum), then a 0. A tiny sigma
    (:data:`_NO_BLUR_SIGMA`) gives exactly the identity kernel."""
    return torch.softmax(negative_half_squares / sigma.reshape(-1, 1).square(), dim=1)


def _band_block_indices(taps: int, block: int = _BLUR_BLOCK) -> torch.Tensor:
    """[block, block + taps - 1] int64: entry (r, j) is the tap ``j - r`` of a kernel where
    ``0 <= j - r < taps``, else ``taps`` (the zero of :func:`_blur_kernels`): indexing a
    [B, taps + 1] kernel table with it gives each sample's block of its banded (Toeplitz)
    convolution matrix, which maps ``block + taps - 1`` input rows to ``block`` output rows."""
    offsets = torch.arange(block + taps - 1).view(1, -1) - torch.arange(block).view(-1, 1)
    return torch.where((offsets >= 0) & (offsets < taps), offsets, taps)


def _separable_blur(images: torch.Tensor, kernels: torch.Tensor, rows: torch.Tensor,
                    columns: torch.Tensor) -> torch.Tensor:
    """Zero-padded separable convolution of [B, C, H, W] images with one symmetric kernel per
    sample (``kernels`` [B, taps + 1], :func:`_blur_kernels`), as two batched matrix products with
    blocks of each sample's banded matrix: every ``R`` output rows (columns) are one [R, R + taps
    - 1] block times the ``R + taps - 1`` input rows (columns) around them, ``R + taps - 1``
    multiply-adds per pixel and direction instead of the ``H`` (``W``) of the whole banded matrix.
    Matrix products run at full speed on any device, where a convolution with a different kernel per
    sample is a slow grouped one. ``rows``: :func:`_band_block_indices` shaped [1, R, R + taps -
    1]; ``columns``: its transpose [R + taps - 1, R].

    Down the rows, the image is laid out row by row with its channels side by side ([B, H, C, W]:
    one block of rows is then one matrix for all channels, 3x wider products) and zero-padded
    (``half`` rows above, enough below, ``half`` columns each side, and one zero image after the
    batch) so that the input rows of every block of every sample are ``R`` rows apart in memory:
    one strided view, one batched product, no copy. Across the columns, each row's overlapping
    windows are gathered by the product itself. The result is a [B, C, H, W] view of that layout."""
    batch, channels, height, width = images.shape
    half = (kernels.shape[1] - 1) // 2
    block, window = columns.shape[1], columns.shape[0]
    row_blocks, column_blocks = -(-height // block), -(-width // block)
    # every image: half zero rows, its rows, zero rows up to a whole number of blocks; the last
    # block's window reaches half rows into the next image's (or the zero image's) top zeros
    spare_blocks = -(-half // block)
    padded_height = (row_blocks + spare_blocks) * block
    padded_width = column_blocks * block + 2 * half
    padded = F.pad(images.transpose(1, 2), (half, padded_width - width - half, 0, 0,
                                            half, padded_height - height - half, 0, 1))  # [B + 1, H', C, W']
    row = channels * padded_width
    windows = padded.as_strided((batch, row_blocks + spare_blocks, window, row),
                                (padded_height * row, block * row, row, 1))
    down = torch.matmul(kernels[:, rows], windows)  # [B, blocks, R, C W'] = [B, H', C, W']
    across = down.as_strided((batch, height, channels, column_blocks, window),
                             (padded_height * row, row, padded_width, block, 1))
    blurred = torch.bmm(across.reshape(batch, -1, window), kernels[:, columns])  # [B, H C blocks, R]
    line = column_blocks * block
    return blurred.as_strided(images.shape, (height * channels * line, line, channels * line, 1))


def _blur_block_tables(taps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``rows`` and ``columns`` index tables of :func:`_separable_blur` for ``taps`` taps."""
    indices = _band_block_indices(taps)
    return indices.unsqueeze(0), indices.t()


def gaussian_blur(images: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` [B] and **zero padding** (the reference's
    'SAME' convolution: borders darken): two batched matrix products (:func:`_separable_blur`)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be a positive odd number of taps, got {kernel_size}")
    kernels = _blur_kernels(sigma.to(images.dtype), _negative_half_squares(kernel_size).to(sigma.device, images.dtype))
    rows, columns = (table.to(images.device) for table in _blur_block_tables(kernel_size))
    return _separable_blur(images, kernels.to(images.device), rows, columns)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """``x if x < 0.5 else 1 - x`` (appendix B), computed as ``min(x, 1 - x)``: the same values
    (``1 - x`` is exact for x >= 0.5), two vectorised passes."""
    return torch.minimum(images, 1.0 - images)


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


# ------------------------------------------------------- the batched pipeline: one static program
# The colour jitter applies brightness (0), contrast (1), saturation (2) and hue (3) in a random
# order per sample. Brightness and contrast are RGB affine maps ("rgb" stages), saturation and hue
# HSV round trips ("hsv" stages). Every order of the four, with any of them switched off, is a
# subsequence of this fixed schedule (the cheapest such schedule: two round trips, six affine maps;
# checked when a module is built); a stage that a sample's order leaves out gets neutral
# parameters (rgb: exactly x) or keeps the sample by a 0/1 weight (hsv), so every sample goes
# through the same ops, with the same arithmetic as the op applied alone, and the number of ops
# depends neither on the batch nor on the draws.
_SCHEDULE = ("rgb", "rgb", "hsv", "rgb", "rgb", "hsv", "rgb", "rgb")
_JITTER_KIND = ("rgb", "rgb", "hsv", "hsv")
_JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")
# rgb: scale, shift, mean weight; hsv: saturation factor, 3 hue shifts, taken (1: the stage's
# result, 0: the sample unchanged)
_STAGE_WIDTHS = {"rgb": (1, 1, 1), "hsv": (1, 3, 1)}
_ORDER_CODE = torch.tensor([64, 16, 4, 1])  # a permutation (o0, o1, o2, o3) -> a code in [0, 256)
_NO_JITTER = 255                              # not a permutation's code: all stages neutral
# Per-sample candidate values (columns), from the [B, 4] jitter factors (brightness delta,
# contrast, saturation, hue delta), the grayscale and solarize coins and the blur sigma (columns
# 4-6): candidate = source[:, column] * scale + offset.
_CANDIDATES = {  # name: (source column, scale, offset)
    "one": (0, 0.0, 1.0), "zero": (0, 0.0, 0.0), "brightness": (0, 1.0, 0.0), "contrast": (1, 1.0, 0.0),
    "one_minus_contrast": (1, -1.0, 1.0), "saturation": (2, 1.0, 0.0),
    **{f"hue{n}": (3, 1.0, offset) for n, offset in enumerate(_HUE_TURN_OFFSETS)},
    **{f"no_hue{n}": (0, 0.0, offset) for n, offset in enumerate(_HUE_TURN_OFFSETS)},
    "grayscale": (4, 1.0, 0.0),           # the weight of the luma image: 1 or 0
    "solarize_ceiling": (5, -2.0, 3.0),   # c of min(x, c - x): 1 solarizes, 3 keeps x in [0, 1]
    "blur_sigma": (6, 1.0, 0.0),          # _NO_BLUR_SIGMA where the sample is not blurred
}
_CANDIDATE_INDEX = {name: index for index, name in enumerate(_CANDIDATES)}
_CANDIDATE_SOURCE = torch.tensor([source for source, _, _ in _CANDIDATES.values()])
_CANDIDATE_SCALE = torch.tensor([scale for _, scale, _ in _CANDIDATES.values()])
_CANDIDATE_OFFSET = torch.tensor([offset for _, _, offset in _CANDIDATES.values()])
_NEUTRAL_SLOTS = {"rgb": ("one", "zero", "zero"), "hsv": ("one", "no_hue0", "no_hue1", "no_hue2", "zero")}
_COIN_SLOTS = ("grayscale", "solarize_ceiling", "blur_sigma")  # after the schedule's slots
# sample_parameters draws 13 x B uniforms: rows 0-4 jitter coin and the four factors, 5-8 the order
# (B x 4), 9-12 grayscale coin, blur coin, blur sigma and solarize coin.
_UNIFORM_ROWS = torch.tensor([0, 1, 2, 3, 4, 9, 10, 11, 12])  # all but the order's
_COIN_ROWS = torch.tensor([0, 5, 6, 8])                      # of those: jitter, grayscale, blur, solarize
# Cache blocking on a CPU (_run_program): a batch of more than _CPU_ONE_PASS_BYTES of float32
# images runs through all stages in groups of at most _CPU_PASS_BYTES (at least one image), each
# group through all stages before the next. Timed on the photometric program alone (1 thread, two
# views of 32): groups of about 1 MiB (one core's L2 cache here; 2 images at 224 px) ran fastest at
# 64, 96 and 224 px; one pass over the whole batch took 1.4x as long at 64 px (3 MiB) and 4-5x at
# 224 px (38 MB). Batches up to 3 MiB (two views of 32 at 64 px) still run as one pass: a few ms,
# and the step's op count (bench/throughput.py, issue 16 row a) stays that of one program.
_CPU_PASS_BYTES = 5 * 2**18
_CPU_ONE_PASS_BYTES = 3 * 2**20


def _jitter_stages(order: Sequence[int], enabled: Sequence[bool]) -> dict:
    """``{op: stage}`` for one order: each enabled op in the first stage of its kind after the
    previous op's (disabled ops are the identity and left out). Raises ValueError if the order
    does not fit the schedule."""
    stages, next_stage = {}, 0
    for op in order:
        if enabled[op]:
            stages[op] = _SCHEDULE.index(_JITTER_KIND[op], next_stage)
            next_stage = stages[op] + 1
    return stages


@dataclass(frozen=True)
class _Program:
    """The static part of the pipeline: which stages run (``jitter``: one flag per schedule stage),
    the blur taps (0: no blur) and the layout of the packed per-sample floats."""

    jitter: Tuple[bool, ...]
    grayscale: bool
    blur_taps: int
    solarize: bool

    def union(self, other: "_Program") -> "_Program":
        if self.blur_taps and other.blur_taps and self.blur_taps != other.blur_taps:
            raise ValueError(f"views with different blur kernels ({self.blur_taps} and {other.blur_taps} taps) "
                             f"cannot share one pipeline: give them the same image_size")
        return _Program(tuple(a or b for a, b in zip(self.jitter, other.jitter)), self.grayscale or other.grayscale,
                        self.blur_taps or other.blur_taps, self.solarize or other.solarize)

    @property
    def split_sizes(self) -> list:
        return [width for kind in _SCHEDULE for width in _STAGE_WIDTHS[kind]] + [1] * len(_COIN_SLOTS)


def _images_per_pass(shape: Sequence[int], device: torch.device) -> int:
    """How many of ``shape[0]`` images [3, H, W] the program takes through all its stages at once:
    all of them on an accelerator and under ``torch.compile`` (one pass, the fewest launches) and
    for a small batch, a cache-sized group on a CPU (:data:`_CPU_PASS_BYTES`)."""
    image_bytes = math.prod(shape[1:]) * 4
    if device.type != "cpu" or torch.compiler.is_compiling() or shape[0] * image_bytes <= _CPU_ONE_PASS_BYTES:
        return shape[0]
    return max(1, _CPU_PASS_BYTES // image_bytes)


def _run_program(program: _Program, images: Sequence[torch.Tensor], floats: torch.Tensor, kernels: torch.Tensor,
                 constants: "_Constants") -> Tuple[torch.Tensor, ...]:
    """The device part: uint8 images (one [N_v, 3, H, W] batch per view), packed per-sample floats
    [N, K, 1] and blur kernels [N, taps + 1] of all of them (:meth:`PhotometricAugment.encode`,
    :func:`_pack`) -> normalised float32 images, one batch per view. Straight-line code: no
    data-dependent shapes, no host reads, the same ops for any N and draws. The result's buffer is
    the working buffer, written in place wherever a stage's result replaces its input (a 2 x 32 x
    224 x 224 float batch is 38 MB: fresh allocations of that size cost more than the arithmetic on
    a CPU).

    Cache blocking on a CPU: every stage is a few passes over the images, each bound by memory
    bandwidth once the batch outgrows the cache, so outside ``torch.compile`` a CPU runs the whole
    program over groups of about 1 MiB (:func:`_in_passes`, :data:`_CPU_PASS_BYTES`), each
    converted and written into its rows of the result: about 4x faster at 224 px. The op count then
    grows with the number of groups; the issue's bound on ops (what a device would launch) holds per
    pass, and on an accelerator, under ``torch.compile`` and for batches up to 3 MiB the program is
    one pass over all views."""
    count = sum(len(batch) for batch in images)
    if _images_per_pass((count, *images[0].shape[1:]), images[0].device) < count:
        return _in_passes(program, [batch.shape for batch in images], images[0].device, floats, kernels,
                          constants, lambda view, x, rows: x.copy_(images[view][rows]))
    out = (torch.cat(list(images)) if len(images) > 1 else images[0]).to(torch.float32)
    _run_pass(program, out, floats, kernels, constants)
    return tuple(out.split([len(batch) for batch in images])) if len(images) > 1 else (out,)


def _in_passes(program: _Program, shapes: Sequence[Sequence[int]], device: torch.device, floats: torch.Tensor,
               kernels: torch.Tensor, constants: "_Constants",
               load: Callable[[int, torch.Tensor, slice], torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """The program over groups of images (:func:`_images_per_pass`), one float32 result per view
    (``shapes``; ``floats`` and ``kernels`` hold all views' samples, in order): ``load(view, x,
    rows)`` writes the images ``rows`` of ``view`` (float, uint8 values) into ``x``, their rows of
    the view's result, and returns it; then all stages run on them in place, while they are in
    cache. One result per view rather than one for all: a CPU allocator recycles buffers below
    32 MB (glibc), and a fresh buffer's first write costs a page fault every 4 kB."""
    results, first = [], 0
    for view, shape in enumerate(shapes):
        out = torch.empty(shape, dtype=torch.float32, device=device)
        group = _images_per_pass(shape, device)
        for start in range(0, shape[0], group):
            rows = slice(start, min(start + group, shape[0]))
            samples = slice(first + rows.start, first + rows.stop)
            _run_pass(program, load(view, out[rows], rows), floats[samples], kernels[samples], constants)
        results.append(out)
        first += shape[0]
    return tuple(results)


def _run_pass(program: _Program, x: torch.Tensor, floats: torch.Tensor, kernels: torch.Tensor,
              constants: "_Constants") -> None:
    """All stages over the float images ``x`` [n, 3, H, W] holding uint8 values, in place."""
    flat = x.flatten(2).div_(255.0)
    values = iter(floats.split(program.split_sizes, dim=1))
    for kind, used in zip(_SCHEDULE, program.jitter):
        stage_values = [next(values) for _ in _STAGE_WIDTHS[kind]]
        if not used:
            continue
        if kind == "rgb":
            _rgb_stage(flat, *stage_values, out=flat)
        else:
            *parameters, taken = stage_values
            flat.lerp_(_hsv_stage(flat, *parameters, constants), taken)
    grayscale, solarize_ceiling, _ = (next(values) for _ in _COIN_SLOTS)  # the sigma made the kernels
    if program.grayscale:
        flat.lerp_(_mix_channels(constants.gray_weights, flat), grayscale)
    if program.blur_taps:  # identity kernels for the samples that are not blurred
        x.copy_(_separable_blur(x, kernels, constants.blur_rows, constants.blur_columns))
    if program.solarize:  # solarize(x) = min(x, 1 - x); min(x, 3 - x) = x for the others
        torch.minimum(flat, torch.sub(solarize_ceiling, flat), out=flat)
    torch.sub(flat, constants.mean, out=flat).div_(constants.std)


class _Constants(nn.Module):
    """The pipeline's constant tensors, as buffers (they follow the module to the device)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], blur_taps: int):
        super().__init__()
        for name, values in (("mean", mean), ("std", std), ("sextant_offsets", _SEXTANT_OFFSETS)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1), persistent=False)
        self.register_buffer("gray_weights", torch.tensor([_GRAY_WEIGHTS]), persistent=False)
        self.register_buffer("channel_differences", torch.tensor(_CHANNEL_DIFFERENCES), persistent=False)
        rows, columns = _blur_block_tables(blur_taps) if blur_taps else (None, None)
        self.register_buffer("blur_rows", rows, persistent=False)
        self.register_buffer("blur_columns", columns, persistent=False)


def _pack(program: _Program, values: torch.Tensor,
          negative_half_squares: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Host: the per-sample values [N, 31] (:meth:`PhotometricAugment.encode`) shaped [N, 31, 1] to
    broadcast over flattened images, and the blur kernels [N, taps + 1] from their last column, the
    blur sigma (an empty [N, 0] without blur)."""
    kernels = (_blur_kernels(values[:, -1], negative_half_squares) if program.blur_taps
               else values.new_zeros(len(values), 0))
    return values.view(*values.shape, 1), kernels


def _to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list:
    """CPU tensors to ``device`` without blocking the host (pinned memory on CUDA)."""
    if device.type == "cpu":
        return list(tensors)
    if device.type == "cuda":
        tensors = [t.pin_memory() for t in tensors]
    return [t.to(device, non_blocking=True) for t in tensors]


class PhotometricAugment(nn.Module):
    """Batched, on the training device: colour jitter (p ``jitter_p``: brightness, contrast,
    saturation and hue in a random order per sample, each followed by a clip), grayscale, Gaussian
    blur, solarize (in the order of appendix B), then normalisation with the dataset mean/std.

    Static shapes, as the reference computes its conditional ops under ``vmap`` (a select): every
    sample goes through the same fixed program (the jitter schedule above, then grayscale, blur and
    solarize), with neutral parameters, an identity kernel or a 0/1 weight where its draws skip an
    op. The random parameters are drawn on the CPU (from the global CPU torch RNG, which the trial
    seeds with seed and global step); :meth:`encode` turns them on the host into per-sample stage
    parameters (table look-ups, no per-sample Python), which travel to the device with the blur
    kernels in two copies per batch (pinned, non-blocking on CUDA). The device never waits for the
    host, the ops are the same for any batch and any draws, and ``torch.compile`` sees one static
    graph. :class:`PhotometricViews` runs several views (T and T') as one batch.
    """

    def __init__(self, view: ViewAugmentation, mean: Sequence[float], std: Sequence[float], image_size: int):
        super().__init__()
        self.view = view
        self.kernel_size = blur_kernel_size(image_size)
        self.normalize = Normalize(mean, std)
        # Host-side constants (plain attributes: they stay on the CPU when the module moves).
        self._negative_half_squares = _negative_half_squares(self.kernel_size)
        self._slot_table, used = self._jitter_tables(view)
        blur_taps = self.kernel_size if view.blur_p > 0 and self.kernel_size > 1 else 0  # 1 tap: the identity
        self.program = _Program(used, view.grayscale_p > 0, blur_taps, view.solarize_p > 0)
        self.constants = _Constants(mean, std, self.kernel_size)
        ranges = [(0.0, 1.0), (-view.brightness, view.brightness),
                  (max(0.0, 1.0 - view.contrast), 1.0 + view.contrast),
                  (max(0.0, 1.0 - view.saturation), 1.0 + view.saturation), (-view.hue, view.hue),
                  (0.0, 1.0), (0.0, 1.0), view.blur_sigma, (0.0, 1.0)]
        # Each row as ``low + (high - low) * u`` in float32 (the coins' rows: u itself).
        self._draw_scale = torch.tensor([high - low for low, high in ranges]).view(-1, 1)
        self._draw_low = torch.tensor([low for low, _ in ranges]).view(-1, 1)
        self._coin_p = torch.tensor([view.jitter_p, view.grayscale_p, view.blur_p, view.solarize_p]).view(-1, 1)

    @staticmethod
    def _jitter_tables(view: ViewAugmentation) -> Tuple[torch.Tensor, Tuple[bool, ...]]:
        """For each order code: the candidate column of every per-sample value [256, 31] (the
        schedule's stage slots, hsv stages' "taken" included, then the coins' slots), and which
        stages any order uses. An op of zero strength is the identity and is left out (as the
        reference)."""
        enabled = [view.jitter_p > 0 and strength > 0
                   for strength in (view.brightness, view.contrast, view.saturation, view.hue)]
        starts = list(itertools.accumulate((len(_NEUTRAL_SLOTS[kind]) for kind in _SCHEDULE), initial=0))
        neutral = [_CANDIDATE_INDEX[name] for kind in _SCHEDULE for name in _NEUTRAL_SLOTS[kind]]
        slots = torch.tensor(neutral + [_CANDIDATE_INDEX[name] for name in _COIN_SLOTS]).repeat(256, 1)
        used = [False] * len(_SCHEDULE)
        # slot offsets within a stage and candidate columns of each op (an hsv op sets its stage's "taken")
        op_slots = {0: {1: "brightness"}, 1: {0: "contrast", 2: "one_minus_contrast"}, 2: {0: "saturation", 4: "one"},
                    3: {**{1 + n: f"hue{n}" for n in range(3)}, 4: "one"}}
        for order in itertools.permutations(range(4)):
            code = sum(op * weight for op, weight in zip(order, _ORDER_CODE.tolist()))
            for op, stage in _jitter_stages(order, enabled).items():
                used[stage] = True
                for offset, name in op_slots[op].items():
                    slots[code, starts[stage] + offset] = _CANDIDATE_INDEX[name]
        return slots, tuple(used)

    def sample_parameters(self, batch: int) -> dict:
        """All random draws for ``batch`` samples (a fixed number, whatever the settings or the data),
        from the global CPU torch RNG; CPU tensors, one row per sample. One ``torch.rand`` of
        13 x ``batch`` values, in this order: jitter coin, the four jitter factors, the order
        (``batch`` x 4), grayscale coin, blur coin, blur sigma, solarize coin (the same values as
        drawing each of them in turn)."""
        draws = torch.rand(13, batch)
        uniform = draws[_UNIFORM_ROWS] * self._draw_scale + self._draw_low
        jitter, grayscale, blur, solarize_coin = (uniform[_COIN_ROWS] < self._coin_p).unbind(0)
        return {
            "jitter": jitter,
            "factors": uniform[1:5].t(),  # columns: brightness delta, contrast, saturation, hue delta
            "order": draws[5:9].view(batch, 4).argsort(dim=1),
            "grayscale": grayscale,
            "blur": blur,
            "sigma": uniform[7],
            "solarize": solarize_coin,
        }

    @staticmethod
    def select(params: dict, rows) -> dict:
        """The parameters of the samples ``rows`` (an index or slice into a larger draw)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu()
        return {key: value[rows] for key, value in params.items()}

    def encode(self, params: dict) -> torch.Tensor:
        """Host: the draws (CPU tensors; ``order`` rows are permutations) -> per-sample values
        [B, 31]: the candidate value each stage parameter takes (by a table look-up of the sample's
        order), hsv stages taken, grayscale weight, solarize ceiling and blur sigma
        (:data:`_NO_BLUR_SIGMA`, an identity kernel, where the sample is not blurred)."""
        codes = torch.where(params["jitter"], params["order"] @ _ORDER_CODE, _NO_JITTER)
        sigma = torch.where(params["blur"], params["sigma"], _NO_BLUR_SIGMA)
        sources = torch.cat([params["factors"], torch.stack([params["grayscale"], params["solarize"], sigma], dim=1)],
                            dim=1)
        candidates = torch.addcmul(_CANDIDATE_OFFSET, sources[:, _CANDIDATE_SOURCE], _CANDIDATE_SCALE)
        return candidates.gather(1, self._slot_table[codes])

    def forward(self, images: torch.Tensor, params: Optional[dict] = None) -> torch.Tensor:
        """Augments a uint8 batch. ``params`` (from :meth:`sample_parameters`, one row per image)
        lets the caller draw them, e.g. once for a whole global batch so that any number of
        processes apply the same augmentation to the same image."""
        _check_uint8_batch(images)
        if params is None:
            params = self.sample_parameters(images.shape[0])
        elif len(params["sigma"]) != images.shape[0]:
            raise ValueError(f"params hold {len(params['sigma'])} samples for a batch of {images.shape[0]}")
        floats, kernels = _to_device(_pack(self.program, self.encode(params), self._negative_half_squares),
                                     images.device)
        constants = self.constants
        if constants.mean.device != images.device:  # a module left on another device: copies, not moved
            constants = types.SimpleNamespace(**{name: buffer.to(images.device)
                                                 for name, buffer in constants.named_buffers()})
        return _run_program(self.program, [images], floats, kernels, constants)[0]


class PhotometricViews(nn.Module):
    """Several views (T and T' of table 6) of uint8 batches through ONE pipeline, as one batch:
    the views differ only in their draws (probabilities and ranges), so they share one program
    (the union of the views' stages) and every op runs once for all of them.

    :meth:`device_parameters` (host: encode each view's draws, two copies to the device) and
    :meth:`forward` (device only, static: what ``torch.compile`` compiles) are split so that a
    caller can compile the second; :meth:`views` does both.
    """

    def __init__(self, augments: Sequence[PhotometricAugment]):
        super().__init__()
        if not augments:
            raise ValueError("PhotometricViews needs at least one view")
        first = augments[0]
        program = first.program
        for other in augments[1:]:
            if not all(torch.equal(getattr(other.constants, name).cpu(), getattr(first.constants, name).cpu())
                       for name in ("mean", "std")):
                raise ValueError("views of one pipeline need the same normalisation mean and std")
            program = program.union(other.program)
        self.augments = nn.ModuleList(augments)
        self.program = program

    def device_parameters(self, params: Sequence[dict], device: torch.device,
                          rows=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Host: each view's draws (CPU, one dict per view, in order), their samples ``rows`` (an
        index or slice; all when None) -> packed per-sample floats and blur kernels of all views, on
        ``device``."""
        encoded = [augment.encode(view_params) for augment, view_params in zip(self.augments, params)]
        if rows is not None:
            rows = rows.cpu() if isinstance(rows, torch.Tensor) else rows
            encoded = [values[rows] for values in encoded]
        values = torch.cat(encoded) if len(encoded) > 1 else encoded[0]
        floats, kernels = _to_device(_pack(self.program, values, self.augments[0]._negative_half_squares), device)
        return floats, kernels

    def forward(self, images: Sequence[torch.Tensor], floats: torch.Tensor, kernels: torch.Tensor,
                channels_last: bool = False) -> Tuple[torch.Tensor, ...]:
        """uint8 batches (one per view, on the device) -> normalised float32 views, every op run once
        over all of them; ``channels_last`` lays the result out NHWC."""
        for batch in images:
            _check_uint8_batch(batch)
        out = _run_program(self.program, list(images), floats, kernels, self.augments[0].constants)
        return tuple(view.contiguous(memory_format=torch.channels_last) for view in out) if channels_last else out

    def views(self, images: Sequence[torch.Tensor], params: Sequence[dict], rows=None,
              channels_last: bool = False) -> Tuple[torch.Tensor, ...]:
        """Both steps: draws on the host (``rows`` of them) -> normalised views on the images' device."""
        return self(images, *self.device_parameters(params, images[0].device, rows), channels_last=channels_last)


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
    """Per-sample random resized crop and horizontal flip of a whole batch (table 6).

    On an accelerator, ``torchvision.ops.roi_align`` crops and bilinearly resizes every sample's own
    box in one call (static shapes, no host read); that is why this is ours rather than
    torchvision's ``RandomResizedCrop``, which draws one crop per call. On the CPU, where there is no
    launch to save, each sample's box (rounded to whole pixels) goes through torchvision's own
    antialiased bilinear resize of uint8 images, the kernel its ``RandomResizedCrop`` uses for
    tensors, an order of magnitude faster on one thread than ``roi_align`` of float images (the
    library row of ``python bench/throughput.py --only augment --image-size 224``). The boxes and
    flips come from the same draws on either path. (The Determined trial crops per image
    in data-loader workers instead, :func:`geometric_transform`.)
    """

    def __init__(self, image_size: int, scale=(0.08, 1.0), flip_p: float = 0.5):
        super().__init__()
        self.image_size, self.scale, self.flip_p = image_size, tuple(scale), flip_p

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        boxes = random_resized_crop_boxes(batch, height, width, self.scale, device=images.device)
        flip = torch.rand(batch, device=images.device) < self.flip_p
        if images.device.type == "cpu" and not torch.compiler.is_compiling():
            return self.crop_each(images, boxes, flip)
        return self.crop_batched(images, boxes, flip)

    def crop_batched(self, images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """All crops in one ``roi_align`` (boxes in continuous pixel coordinates)."""
        from torchvision.ops import roi_align

        rois = torch.cat([torch.arange(len(boxes), device=images.device, dtype=boxes.dtype)[:, None], boxes], 1)
        crops = roi_align(images.float(), rois, output_size=self.image_size, aligned=True)
        crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
        return crops.round().clamp(0, 255).to(torch.uint8) if not images.is_floating_point() else crops

    def crop_each(self, images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Each box rounded to whole pixels, cropped and resized with torchvision's
        ``resized_crop`` (antialiased bilinear; uint8 stays uint8), flipped where drawn."""
        from torchvision.transforms.v2 import functional as TF

        height, width = images.shape[-2:]
        out = images.new_empty(len(boxes), images.shape[1], self.image_size, self.image_size)
        for index, ((x1, y1, x2, y2), flipped) in enumerate(zip(boxes.tolist(), flip.tolist())):
            left, top = min(int(round(x1)), width - 1), min(int(round(y1)), height - 1)
            w, h = min(max(int(round(x2 - x1)), 1), width - left), min(max(int(round(y2 - y1)), 1), height - top)
            crop = TF.resized_crop(images[index], top, left, h, w, [self.image_size, self.image_size],
                                   interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            out[index] = crop.flip(-1) if flipped else crop
        return out


class TwoViewAugmentation(nn.Module):
    """The library's default: table 6's T and T' of a batch ([B, 3, H, W], float in [0, 1] or
    uint8) -> (view 1, view 2), normalised with ImageNet's statistics. Both views are one batch of
    2B: one crop-and-flip call (T and T' share crop and flip settings) and one photometric pipeline
    (:class:`PhotometricViews`, the crops of T and of T' as its two views: one result each, made
    in cache-sized groups on a CPU); static shapes, no host reads on an accelerator."""

    def __init__(self, image_size: int):
        super().__init__()
        view1, view2 = paper_view_augmentations()
        self.to_uint8 = _ToUint8()
        self.crop = BatchedCropFlip(image_size, view1.crop_scale, view1.flip_p)
        self.photometric = PhotometricViews([PhotometricAugment(view, IMAGENET_MEAN, IMAGENET_STD, image_size)
                                             for view in (view1, view2)])

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        images = self.to_uint8(images)
        crops = self.crop(torch.cat([images, images]))
        drawn = [augment.sample_parameters(images.shape[0]) for augment in self.photometric.augments]
        view1, view2 = self.photometric(crops.chunk(2), *self.photometric.device_parameters(drawn, images.device))
        return view1, view2


class _ToUint8(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.is_floating_point():
            return (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return images
