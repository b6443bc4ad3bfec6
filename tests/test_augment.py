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
@pytest.mark.parametrize("flip_p", [0, 1])
def test_geometric_full_crop_and_flip_probability(flip_p):
    image = _pil()
    original = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    transform = augment.geometric_transform(24, ViewAugmentation(crop_scale=(1, 1), flip_p=flip_p))
    torch.manual_seed(0)
    for _ in range(10):
        out = transform(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
        assert torch.equal(out, original.flip(-1) if flip_p else original)


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


# ------------------------------------------------- photometric ops equal torchvision's per sample
def _reference(op, images, factors):
    return torch.stack([op(image, float(factor)) for image, factor in zip(images, factors)])


@pytest.mark.parametrize("mine, theirs, factors", [
    (augment.adjust_brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.4, 2.5]),
    (augment.adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 2.5]),
    (augment.adjust_saturation, TF.adjust_saturation, [0.0, 0.8, 1.0, 1.2, 3.0]),
    (augment.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.07, 0.5]),
])
@pytest.mark.parametrize("levels", [256, 3])
def test_jitter_ops_match_torchvision(mine, theirs, factors, levels):
    images = _images(batch=len(factors), levels=levels).float() / 255
    factors = torch.tensor(factors)
    expected = _reference(theirs, images, factors)
    assert torch.allclose(mine(images, factors.view(-1, 1, 1, 1)), expected, atol=1e-5)


def test_grayscale_solarize_blur_match_torchvision():
    images = _images(batch=4, size=20).float() / 255
    assert torch.allclose(augment.rgb_to_grayscale(images), TF.rgb_to_grayscale(images, num_output_channels=3),
                          atol=1e-6)
    assert torch.equal(augment.solarize(images), TF.solarize(images, threshold=0.5))
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    expected = torch.stack([TF.gaussian_blur(image, [7, 7], [float(s)] * 2) for image, s in zip(images, sigmas)])
    assert torch.allclose(augment.gaussian_blur(images, 7, sigmas), expected, atol=1e-5)


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
    assert torch.equal(augment.solarize(values), TF.solarize(values, threshold=0.5))
    assert augment.solarize(values).flatten().tolist() == pytest.approx([0.0, 0.25, 0.4999, 0.5, 0.25, 0.0])


def test_color_jitter_applies_ops_in_each_samples_order():
    images = _images(batch=3).float() / 255
    factors = torch.tensor([[1.3, 0.6, 1.5, 0.2]] * 3)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]])
    out = augment.color_jitter(images, factors, orders, torch.tensor([True, True, False]))
    theirs = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(2):
        expected = images[i]
        for op in orders[i].tolist():
            expected = theirs[op](expected, float(factors[i, op]))
        assert torch.allclose(out[i], expected, atol=1e-5)
    assert torch.equal(out[2], images[2])
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # same factors, different order


def test_blur_kernel_size_scales_with_image_size():
    assert augment.blur_kernel_size(224) == 23
    assert augment.blur_kernel_size(32) == 3 and augment.blur_kernel_size(96) == 11
    assert all(augment.blur_kernel_size(s) % 2 == 1 for s in range(8, 300))


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
    expected = TF.gaussian_blur(images.float() / 255, [3, 3], [1.5, 1.5])
    assert torch.allclose(out, expected, atol=1e-5)


def test_photometric_samples_get_independent_parameters():
    same = _images(batch=1).expand(16, -1, -1, -1).contiguous()
    torch.manual_seed(0)
    view = ViewAugmentation(**dict(NOTHING, jitter_p=1.0))
    out = PhotometricAugment(view, MEAN, STD, 16)(same)
    distinct = {tuple(o.flatten()[:50].round(decimals=4).tolist()) for o in out}
    assert len(distinct) == 16
    params = PhotometricAugment(ViewAugmentation(), MEAN, STD, 16).sample_parameters(1000, torch.device("cpu"))
    assert 0.7 < params["jitter"].float().mean() < 0.9 and 0.15 < params["grayscale"].float().mean() < 0.25
    assert params["sigma"].min() >= 0.1 and params["sigma"].max() <= 2.0 and params["blur"].all()
    assert params["factors"][:, 0].min() >= 0.6 and params["factors"][:, 0].max() <= 1.4
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
