"""Tests of augment.py: settings validation, the per-image geometric part, and the batched
photometric ops checked against torchvision.transforms.v2.functional (paper appendix B, table 6)."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import augment
from augment import PhotometricAugment, ViewAugmentation

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
NOTHING = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def _images(batch=8, size=16, seed=0, levels=256):
    """uint8 batch; few ``levels`` give many ties between channels (edge cases for hue)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, (batch, 3, size, size), generator=generator)
    return (values * (255 // (levels - 1))).to(torch.uint8)


def _denormalise(out):
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return out * std + mean


def _pil(seed=0, size=24, mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    return image.convert(mode) if mode != "RGB" else image


# ------------------------------------------------------------------------------------- settings
def test_defaults_are_table_6():
    view1, view2 = augment.paper_view_augmentations()
    assert view1.crop_scale == (0.08, 1.0) and view1.flip_p == 0.5
    assert (view1.jitter_p, view1.brightness, view1.contrast, view1.saturation, view1.hue) == (0.8, 0.4, 0.4, 0.2, 0.1)
    assert view1.grayscale_p == 0.2 and view1.blur_sigma == (0.1, 2.0)
    assert (view1.blur_p, view1.solarize_p) == (1.0, 0.0)
    assert (view2.blur_p, view2.solarize_p) == (0.1, 0.2)
    assert dict(vars(view1), blur_p=0.1, solarize_p=0.2) == vars(view2)


def test_from_dict_accepts_lists_and_keeps_defaults():
    view = ViewAugmentation.from_dict({"crop_scale": [0.2, 1], "solarize_p": 1})
    assert view.crop_scale == (0.2, 1.0) and view.solarize_p == 1.0 and view.flip_p == 0.5
    assert ViewAugmentation.from_dict({}) == ViewAugmentation()


def test_from_dict_unknown_key_lists_allowed_keys():
    with pytest.raises(ValueError) as error:
        ViewAugmentation.from_dict({"blur_prob": 0.5})
    message = str(error.value)
    assert "blur_prob" in message and "blur_p" in message and "crop_scale" in message


@pytest.mark.parametrize("settings, key", [
    ({"flip_p": 1.5}, "flip_p"), ({"jitter_p": -0.1}, "jitter_p"), ({"grayscale_p": 2}, "grayscale_p"),
    ({"blur_p": -1}, "blur_p"), ({"solarize_p": 1.01}, "solarize_p"),
    ({"crop_scale": (0.0, 1.0)}, "crop_scale"), ({"crop_scale": (0.5, 0.2)}, "crop_scale"),
    ({"crop_scale": (0.5, 1.2)}, "crop_scale"), ({"crop_scale": 0.5}, "crop_scale"),
    ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"), ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
    ({"brightness": -0.1}, "brightness"), ({"hue": 0.6}, "hue"), ({"contrast": "high"}, "contrast"),
    ({"flip_p": True}, "flip_p"),
])
def test_from_dict_rejects_bad_values(settings, key):
    with pytest.raises(ValueError, match=key):
        ViewAugmentation.from_dict(settings)


def test_from_dict_needs_mapping():
    with pytest.raises(TypeError):
        ViewAugmentation.from_dict([("flip_p", 0.5)])


# ------------------------------------------------------------------------------ geometric, per image
def test_geometric_flip_probability():
    image = _pil()
    kept, flipped = (augment.geometric_transform(24, ViewAugmentation(flip_p=p)) for p in (0, 1))
    for seed in range(5):
        torch.manual_seed(seed)
        out = kept(image)
        torch.manual_seed(seed)
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
        assert torch.equal(flipped(image), out.flip(-1))


def test_crop_is_one_draw_clipped_to_the_image():
    """Area 1 with a non-square aspect ratio: the long side is clipped to the image, the other
    stays shorter (the reference; torchvision would redraw until the box fits)."""
    torch.manual_seed(0)
    boxes = [augment.sample_crop(40, 60, scale=(1.0, 1.0)) for _ in range(200)]
    assert all(0 <= top <= 40 - h and 0 <= left <= 60 - w and 1 <= h <= 40 and 1 <= w <= 60
               for top, left, h, w in boxes)
    assert sum(h * w < 40 * 60 for _, _, h, w in boxes) > 150
    image = _pil(size=24)
    full = augment.geometric_transform(24, ViewAugmentation(crop_scale=(1, 1), flip_p=0))
    assert full(image).shape == (3, 24, 24)


def test_geometric_small_crop_scale_zooms_in_and_resizes():
    torch.manual_seed(0)
    image = _pil(size=64)
    transform = augment.geometric_transform(32, ViewAugmentation(crop_scale=(0.1, 0.1), flip_p=0))
    full = augment.geometric_transform(32, ViewAugmentation(crop_scale=(1, 1), flip_p=0))(image)
    outs = [transform(image) for _ in range(3)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert not torch.equal(outs[0], full) and not torch.equal(outs[0], outs[1])


def test_geometric_converts_grayscale_to_rgb_and_uses_torch_rng():
    transform = augment.geometric_transform(16, ViewAugmentation())
    image = _pil(mode="L")
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    assert torch.equal(first, transform(image)) and first.shape == (3, 16, 16)
    assert torch.equal(first[0], first[1])


def test_two_view_transform_is_picklable_and_gives_two_uint8_views():
    view1, view2 = augment.paper_view_augmentations()
    transform = pickle.loads(pickle.dumps(augment.TwoViewTransform(20, view1, view2)))
    torch.manual_seed(0)
    a, b = transform(_pil(size=40))
    assert a.shape == b.shape == (3, 20, 20) and a.dtype == b.dtype == torch.uint8
    assert not torch.equal(a, b)


def test_eval_and_crop_flip_transforms():
    image = _pil(size=40)
    evaluated = augment.eval_transform(32)(image)
    assert evaluated.shape == (3, 32, 32) and evaluated.dtype == torch.uint8
    assert torch.equal(evaluated, augment.eval_transform(32)(image))
    assert torch.equal(augment.eval_transform(40, crop_fraction=1.0)(image),
                       torch.from_numpy(np.array(image)).permute(2, 0, 1))
    with pytest.raises(ValueError, match="crop_fraction"):
        augment.eval_transform(32, crop_fraction=0)
    torch.manual_seed(0)
    crops = [augment.crop_flip_transform(16)(image) for _ in range(2)]
    assert crops[0].shape == (3, 16, 16) and not torch.equal(crops[0], crops[1])


# ------------------------------------------- photometric ops: the reference's semantics (appendix B)
# tests/test_reference.py matches them against the reference's own outputs; these pin the formulas.
def test_brightness_adds_an_offset_per_sample_and_clips():
    images = _images(batch=3, levels=3).float() / 255
    deltas = torch.tensor([-0.4, 0.0, 0.25])
    out = augment.adjust_brightness(images, deltas)
    assert torch.equal(out, (images + deltas.view(-1, 1, 1, 1)).clamp(0, 1))
    assert torch.equal(out[1], images[1]) and out.min() == 0 and out.max() == 1


def test_contrast_scales_around_each_channels_mean():
    images = _images(batch=2).float() / 255
    factors = torch.tensor([0.6, 1.4])
    mean = images.mean(dim=(2, 3), keepdim=True)  # per channel, not the grayscale mean
    expected = ((images - mean) * factors.view(-1, 1, 1, 1) + mean).clamp(0, 1)
    assert torch.allclose(augment.adjust_contrast(images, factors), expected, atol=1e-6)
    flat = torch.tensor([0.2, 0.5, 0.9]).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.allclose(augment.adjust_contrast(flat, torch.tensor([0.0])), flat)  # uniform channels stay


def test_saturation_scales_hsv_saturation_and_keeps_hue_and_value():
    images = _images(batch=3, levels=5).float() / 255
    factors = torch.tensor([0.8, 1.0, 1.2])
    out = augment.adjust_saturation(images, factors)
    before, after = augment.rgb_to_hsv(images), augment.rgb_to_hsv(out)
    expected_s = (before[:, 1] * factors.view(-1, 1, 1)).clamp(0, 1)
    assert torch.allclose(after[:, 1], expected_s, atol=1e-5)
    assert torch.allclose(after[:, 2], before[:, 2], atol=1e-6)
    assert torch.allclose(out[1], images[1], atol=1e-6)
    grey = images.amax(1, keepdim=True).expand_as(images)
    assert torch.allclose(augment.adjust_saturation(images, torch.zeros(3)), grey)


@pytest.mark.parametrize("levels", [256, 3])
def test_hue_matches_torchvision_per_sample(levels):
    images = _images(batch=5, levels=levels).float() / 255
    deltas = torch.tensor([-0.5, -0.1, 0.0, 0.07, 0.5])
    expected = torch.stack([TF.adjust_hue(image, float(d)) for image, d in zip(images, deltas)])
    assert torch.allclose(augment.adjust_hue(images, deltas), expected, atol=1e-5)


def test_grayscale_and_solarize():
    images = _images(batch=4, size=20).float() / 255
    assert torch.allclose(augment.rgb_to_grayscale(images), TF.rgb_to_grayscale(images, num_output_channels=3),
                          atol=1e-6)
    assert torch.equal(augment.solarize(images), torch.where(images < 0.5, images, 1 - images))


def test_blur_zero_padding_darkens_borders_and_equals_torchvision_inside():
    images = _images(batch=4, size=20).float() / 255
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = augment.gaussian_blur(images, 7, sigmas)
    reflect = torch.stack([TF.gaussian_blur(image, [7, 7], [float(s)] * 2) for image, s in zip(images, sigmas)])
    assert torch.allclose(out[..., 3:-3, 3:-3], reflect[..., 3:-3, 3:-3], atol=1e-5)  # away from the border
    ones = augment.gaussian_blur(torch.ones(1, 3, 9, 9), 7, torch.tensor([2.0]))
    assert torch.allclose(ones[..., 4, 4], torch.ones(3)) and ones[0, 0, 0, 0] < 0.5  # 'SAME' zeros outside
    assert torch.equal(augment.gaussian_blur(images, 1, sigmas), images)
    with pytest.raises(ValueError, match="odd"):
        augment.gaussian_blur(images, 4, sigmas)


def test_hsv_round_trip_and_known_values():
    images = _images(batch=4, levels=5).float() / 255
    hsv = augment.rgb_to_hsv(images)
    assert hsv[:, 0].min() >= 0 and hsv[:, 0].max() < 1
    assert torch.allclose(augment.hsv_to_rgb(hsv), images, atol=1e-6)
    colours = torch.tensor([[1.0, 0, 1], [1, 0.5, 0], [0, 0.5, 1], [0.2, 0.2, 0.2], [0, 0, 0]]).view(5, 3, 1, 1)
    expected = torch.tensor([[5 / 6, 1, 1], [1 / 12, 1, 1], [7 / 12, 1, 1], [0, 0, 0.2], [0, 0, 0]])
    assert torch.allclose(augment.rgb_to_hsv(colours).view(5, 3), expected, atol=1e-6)


def test_solarize_inverts_values_from_half_up():
    values = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.75, 1.0]).view(1, 3, 1, 2)
    assert augment.solarize(values).flatten().tolist() == pytest.approx([0.0, 0.25, 0.4999, 0.5, 0.25, 0.0])


def test_blur_kernel_size_is_the_references_rule():
    assert augment.blur_kernel_size(224) == 23 and augment.blur_kernel_size(96) == 9
    assert augment.blur_kernel_size(32) == 3 and augment.blur_kernel_size(16) == 1
    assert all(augment.blur_kernel_size(s) % 2 == 1 for s in range(8, 300))


def _per_sample_loop(module, images, params):
    """The straightforward reference: one sample at a time, ops in its own order, each clipped."""
    out = []
    for i in range(images.shape[0]):
        x = images[i:i + 1].float() / 255
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                name = ("brightness", "contrast", "saturation", "hue")[op]
                x = getattr(augment, f"adjust_{name}")(x, params["factors"][i:i + 1, op])
        if params["grayscale"][i]:
            x = augment.rgb_to_grayscale(x)
        if params["blur"][i] and module.kernel_size > 1:
            x = augment.gaussian_blur(x, module.kernel_size, params["sigma"][i:i + 1])
        if params["solarize"][i]:
            x = augment.solarize(x)
        out.append(module.normalize.normalize_float(x))
    return torch.cat(out)


@pytest.mark.parametrize("view", [0, 1])
def test_batched_augment_equals_a_per_sample_loop(view):
    """Each sample's ops, gathered and scattered per (order position, op), equal doing each sample
    alone; both views of table 6 (all ops, solarize and rare blur included)."""
    images = _images(batch=48, size=32)
    module = PhotometricAugment(augment.paper_view_augmentations()[view], MEAN, STD, 32)
    torch.manual_seed(view)
    params = module.sample_parameters(48)
    assert params["jitter"].any() and not params["jitter"].all() and params["grayscale"].any()
    assert torch.allclose(module(images, params), _per_sample_loop(module, images, params), atol=1e-6)


def test_plan_touches_each_sample_once_per_op():
    module = PhotometricAugment(augment.paper_view_augmentations()[1], MEAN, STD, 32)
    torch.manual_seed(0)
    params = module.sample_parameters(64)
    steps = module.plan(params)
    jitter = [rows for name, rows, _ in steps if name in ("brightness", "contrast", "saturation", "hue")]
    assert len(jitter) <= 16 and sum(len(r) for r in jitter) == 4 * int(params["jitter"].sum())
    for name in ("grayscale", "blur", "solarize"):
        rows = [r for n, r, _ in steps if n == name]
        assert torch.equal(rows[0] if rows else torch.zeros(0, dtype=torch.long),
                           torch.nonzero(params[name]).flatten())
    off = PhotometricAugment(ViewAugmentation(**dict(NOTHING, jitter_p=1.0, saturation=0.0, hue=0.0)), MEAN, STD, 16)
    assert {name for name, _, _ in off.plan(off.sample_parameters(8))} == {"brightness", "contrast"}


# ------------------------------------------------------------------------- the batched module
def test_photometric_all_off_is_plain_normalisation():
    images = _images()
    out = PhotometricAugment(ViewAugmentation(**NOTHING), MEAN, STD, 16)(images)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.allclose(out, augment.Normalize(MEAN, STD)(images))
    assert torch.allclose(_denormalise(out), images.float() / 255, atol=1e-6)


def test_photometric_grayscale_p_one_gives_gray_outputs():
    out = _denormalise(PhotometricAugment(ViewAugmentation(**dict(NOTHING, grayscale_p=1.0)), MEAN, STD, 16)(_images()))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_photometric_solarize_p_one_inverts_above_threshold():
    images = _images()
    out = _denormalise(PhotometricAugment(ViewAugmentation(**dict(NOTHING, solarize_p=1.0)), MEAN, STD, 16)(images))
    x = images.float() / 255
    assert torch.allclose(out, torch.where(x >= 0.5, 1 - x, x), atol=1e-5)


def test_photometric_blur_uses_sigma_range_and_kernel_size():
    images = _images(size=32)
    view = ViewAugmentation(**dict(NOTHING, blur_p=1.0, blur_sigma=(1.5, 1.5)))
    out = _denormalise(PhotometricAugment(view, MEAN, STD, 32)(images))
    expected = augment.gaussian_blur(images.float() / 255, 3, torch.full((8,), 1.5))
    assert torch.allclose(out, expected, atol=1e-5)


def test_photometric_samples_get_independent_parameters():
    same = _images(batch=1).expand(16, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    view = ViewAugmentation(**dict(NOTHING, jitter_p=1.0))
    out = PhotometricAugment(view, MEAN, STD, 16)(same)
    distinct = {tuple(o.flatten()[:50].round(decimals=4).tolist()) for o in out}
    assert len(distinct) == 16
    params = PhotometricAugment(ViewAugmentation(), MEAN, STD, 16).sample_parameters(1000)
    assert 0.7 < params["jitter"].float().mean() < 0.9 and 0.15 < params["grayscale"].float().mean() < 0.25
    assert params["sigma"].min() >= 0.1 and params["sigma"].max() <= 2.0 and params["blur"].all()
    assert params["factors"][:, 0].min() >= -0.4 and params["factors"][:, 0].max() <= 0.4
    assert params["factors"][:, 1].min() >= 0.6 and params["factors"][:, 1].max() <= 1.4
    assert params["factors"][:, 3].abs().max() <= 0.1 and not params["solarize"].any()
    assert len({tuple(row) for row in params["order"].tolist()}) == 24  # all orders occur
    for values in (*params["factors"].unbind(dim=1), params["sigma"]):
        assert values.unique().numel() > 900  # drawn per sample


def test_photometric_jitter_p_selects_samples():
    images = _images(batch=64)
    torch.manual_seed(1)
    view = ViewAugmentation(**dict(NOTHING, jitter_p=0.5))
    out = _denormalise(PhotometricAugment(view, MEAN, STD, 16)(images))
    unchanged = torch.isclose(out, images.float() / 255, atol=1e-5).flatten(1).all(dim=1)
    assert 10 < unchanged.sum() < 54


def test_photometric_default_views_deterministic_under_seed():
    images = _images()
    module = PhotometricAugment(augment.paper_view_augmentations()[1], MEAN, STD, 16)
    torch.manual_seed(5)
    first = module(images)
    torch.manual_seed(5)
    assert torch.equal(first, module(images))
    assert torch.isfinite(first).all() and not torch.equal(first, module(images))


def test_photometric_rejects_bad_batches():
    module = PhotometricAugment(ViewAugmentation(), MEAN, STD, 16)
    with pytest.raises(TypeError, match="uint8"):
        module(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="3, H, W"):
        module(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="std"):
        augment.Normalize(MEAN, (0.2, 0.0, 0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the host-sync check is CUDA's)")
def test_photometric_augment_never_synchronises_the_device():
    """Parameters and the plan live on the CPU; indices and values travel by non-blocking copies:
    torch's sync debug mode raises on any synchronising call inside the forward pass."""
    module = PhotometricAugment(augment.paper_view_augmentations()[1], MEAN, STD, 96).cuda()
    images = _images(batch=64, size=96).cuda()
    torch.manual_seed(0)
    params = module.sample_parameters(64)
    expected = module(images.cpu(), params)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = module(images, params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.allclose(out.cpu(), expected, atol=1e-5)
