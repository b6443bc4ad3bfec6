"""Tests of augment.py: settings validation, the per-image geometric part, and the batched
photometric ops checked against torchvision.transforms.v2.functional (paper appendix B, table 6)."""
import itertools
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


def _dense_banded_blur(images, kernel_size, sigmas):
    """The blur as the whole banded (Toeplitz) matrix of each sample, ``K_H @ x @ K_W`` with
    K[a, b] = k[b - a + half] for |b - a| <= half, else 0: zero padding, every tap (the formula the
    block version replaced)."""
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    out = []
    for image, sigma in zip(images.double(), sigmas.double()):
        kernel = torch.exp(-taps.square() / (2 * sigma ** 2))
        kernel = kernel / kernel.sum()

        def band(size, kernel=kernel):
            offsets = torch.arange(size).view(1, -1) - torch.arange(size).view(-1, 1)
            return torch.where(offsets.abs() <= half, kernel[(offsets + half).clamp(0, kernel_size - 1)], 0.0)

        out.append(band(image.shape[-2]) @ image @ band(image.shape[-1]))
    return torch.stack(out).float()


@pytest.mark.parametrize("shape,kernel_size", [((3, 3, 20, 20), 7), ((2, 3, 17, 70), 7), ((2, 3, 5, 9), 7),
                                               ((2, 3, 64, 33), 23), ((1, 2, 40, 40), 3), ((2, 1, 50, 45), 37)])
def test_blur_blocks_equal_the_dense_banded_matrix(shape, kernel_size):
    """The blur in blocks of the banded matrix (and its padding, strides and spare blocks) equals
    the whole banded matrix to float rounding, for sizes below, at and above one block and not
    multiples of it; a sigma of _NO_BLUR_SIGMA is exactly the identity (what samples that are not
    blurred get)."""
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    sigmas = torch.linspace(0.1, 2.0, shape[0])
    out = augment.gaussian_blur(images, kernel_size, sigmas)
    assert out.shape == images.shape
    assert (out - _dense_banded_blur(images, kernel_size, sigmas)).abs().max() < 1e-6
    assert torch.equal(augment.gaussian_blur(images, kernel_size, torch.full((shape[0],), augment._NO_BLUR_SIGMA)),
                       images)


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
    """Each sample's ops, run by the fixed schedule with neutral parameters and masks, equal doing
    each sample alone (bit for bit: the same arithmetic); both views of table 6 (all ops, solarize
    and rare blur included)."""
    images = _images(batch=48, size=32)
    module = PhotometricAugment(augment.paper_view_augmentations()[view], MEAN, STD, 32)
    torch.manual_seed(view)
    params = module.sample_parameters(48)
    assert params["jitter"].any() and not params["jitter"].all() and params["grayscale"].any()
    assert torch.allclose(module(images, params), _per_sample_loop(module, images, params), atol=1e-6)


def test_every_jitter_order_fits_the_static_schedule():
    """Each of the 24 orders, with any ops switched off, runs in order through the fixed stages
    (each op in a stage of its kind, strictly later than the previous op's); the tables send every
    order's ops to those stages and nothing else."""
    for order in itertools.permutations(range(4)):
        for enabled in itertools.product((False, True), repeat=4):
            stages = augment._jitter_stages(order, enabled)
            assert sorted(stages) == [op for op in range(4) if enabled[op]]
            positions = [stages[op] for op in order if enabled[op]]
            assert positions == sorted(set(positions))
            assert all(augment._SCHEDULE[stage] == augment._JITTER_KIND[op] for op, stage in stages.items())
    module = PhotometricAugment(ViewAugmentation(**dict(NOTHING, jitter_p=1.0, saturation=0.0, hue=0.0)), MEAN, STD, 16)
    assert [kind for kind, used in zip(augment._SCHEDULE, module.program.jitter) if used] == ["rgb", "rgb"]
    assert not any(PhotometricAugment(ViewAugmentation(**NOTHING), MEAN, STD, 16).program.jitter)


def _old_sample_parameters(view, batch):
    """The draws as the first implementation made them, one ``torch.rand`` per kind in turn."""
    def uniform(low, high):
        return low + (high - low) * torch.rand(batch)

    def coin(p):
        return torch.rand(batch) < p

    return {"jitter": coin(view.jitter_p),
            "factors": torch.stack([uniform(-view.brightness, view.brightness),
                                    uniform(max(0.0, 1.0 - view.contrast), 1.0 + view.contrast),
                                    uniform(max(0.0, 1.0 - view.saturation), 1.0 + view.saturation),
                                    uniform(-view.hue, view.hue)], dim=1),
            "order": torch.rand(batch, 4).argsort(dim=1), "grayscale": coin(view.grayscale_p),
            "blur": coin(view.blur_p), "sigma": uniform(*view.blur_sigma), "solarize": coin(view.solarize_p)}


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_draws_are_those_of_drawing_each_kind_in_turn(batch):
    """One torch.rand for all draws gives the values of the first implementation's sequence of
    draws (resume and any number of processes depend on them), and leaves the RNG in the same state."""
    odd = ViewAugmentation(flip_p=0.3, jitter_p=0.55, brightness=0.3, contrast=0.9, saturation=1.2, hue=0.45,
                           grayscale_p=0.35, blur_p=0.6, blur_sigma=(0.3, 1.7), solarize_p=0.45)
    for view in (*augment.paper_view_augmentations(), odd):
        torch.manual_seed(batch)
        new = PhotometricAugment(view, MEAN, STD, 32).sample_parameters(batch)
        after_new = torch.rand(3)
        torch.manual_seed(batch)
        old = _old_sample_parameters(view, batch)
        assert torch.equal(torch.rand(3), after_new)
        assert new.keys() == old.keys()
        for key in old:
            assert new[key].dtype == old[key].dtype and torch.equal(new[key], old[key]), key


def _round_trip_loop(module, images, params):
    """Each sample alone with the textbook ops: contrast as (x - mean) * f + mean, saturation and
    hue through rgb_to_hsv / hsv_to_rgb, grayscale as a weighted sum of the three channels."""
    out = []
    for i in range(images.shape[0]):
        x = images[i:i + 1].float() / 255
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                value = float(params["factors"][i, op])
                if op == 0:
                    x = (x + value).clamp(0, 1)
                elif op == 1:
                    mean = x.mean(dim=(2, 3), keepdim=True)
                    x = ((x - mean) * value + mean).clamp(0, 1)
                else:
                    hue, saturation, brightness = augment.rgb_to_hsv(x).unbind(1)
                    if op == 2:
                        saturation = (saturation * value).clamp(0, 1)
                    else:
                        hue = (hue + value).remainder(1.0)
                    x = augment.hsv_to_rgb(torch.stack([hue, saturation, brightness], 1)).clamp(0, 1)
        if params["grayscale"][i]:
            x = (0.2989 * x[:, 0] + 0.5870 * x[:, 1] + 0.1140 * x[:, 2]).unsqueeze(1).expand_as(x)
        if params["blur"][i] and module.kernel_size > 1:
            half, sigma = module.kernel_size // 2, float(params["sigma"][i])
            padded = torch.nn.functional.pad(x, [half] * 4)  # zeros: the reference's 'SAME' convolution
            x = TF.gaussian_blur(padded, [module.kernel_size] * 2, [sigma] * 2)[..., half:-half, half:-half]
        if params["solarize"][i]:
            x = torch.where(x < 0.5, x, 1 - x)
        out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("view", [0, 1])
def test_static_pipeline_equals_the_textbook_ops_per_sample(view):
    """The masked, fixed-schedule pipeline equals each sample done alone with the textbook formulas
    (HSV round trips, torchvision's blur on a zero-padded image) to float rounding."""
    images = _images(batch=32, size=32)
    module = PhotometricAugment(augment.paper_view_augmentations()[view], (0, 0, 0), (1, 1, 1), 32)
    torch.manual_seed(10 + view)
    params = module.sample_parameters(32)
    assert params["blur"].any() and (view == 0 or params["solarize"].any())
    assert (module(images, params) - _round_trip_loop(module, images, params)).abs().max() < 1e-5


def _two_views(batch, size=32):
    modules = [PhotometricAugment(view, MEAN, STD, size) for view in augment.paper_view_augmentations()]
    images = [_images(batch=batch, size=size, seed=seed) for seed in (1, 2)]
    return augment.PhotometricViews(modules), images


def test_two_views_in_one_pipeline_equal_each_view_alone():
    views, images = _two_views(24)
    torch.manual_seed(0)
    drawn = [module.sample_parameters(48) for module in views.augments]
    rows = slice(24, 48)
    together = views.views(images, drawn, rows=rows)
    alone = [module(batch, module.select(params, rows)) for module, batch, params in zip(views.augments, images, drawn)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    last = views.views(images, drawn, rows=torch.arange(24, 48), channels_last=True)
    assert last[0].is_contiguous(memory_format=torch.channels_last) and torch.equal(last[1], together[1])


def test_batched_crop_flip_flips_the_crops_it_draws():
    """The library's crop: uint8 crops of the requested size inside the value range, and flip_p 1
    gives the mirror images of the crops flip_p 0 gives from the same draws."""
    images = _images(batch=6, size=40)
    torch.manual_seed(0)
    kept = augment.BatchedCropFlip(24, flip_p=0.0)(images)
    torch.manual_seed(0)
    flipped = augment.BatchedCropFlip(24, flip_p=1.0)(images)
    assert kept.dtype == torch.uint8 and kept.shape == (6, 3, 24, 24)
    assert torch.equal(flipped, kept.flip(-1)) and not torch.equal(flipped, kept)


def _passes(monkeypatch):
    """Forces the CPU's cache blocking down to one image per pass and counts the passes."""
    monkeypatch.setattr(augment, "_CPU_PASS_BYTES", 1)
    monkeypatch.setattr(augment, "_CPU_ONE_PASS_BYTES", 0)
    calls = []
    run_pass = augment._run_pass

    def counted(program, x, *args):
        calls.append(len(x))
        return run_pass(program, x, *args)

    monkeypatch.setattr(augment, "_run_pass", counted)
    return calls


def test_cpu_passes_over_groups_of_images_equal_one_pass(monkeypatch):
    """The CPU's cache blocking (the program over groups of images, written into per-view results)
    gives the one-pass results: both views, one view alone, and the library's crop + photometric."""
    views, images = _two_views(6, size=32)
    torch.manual_seed(0)
    drawn = [module.sample_parameters(6) for module in views.augments]
    one_pass = views.views(images, drawn)
    alone = views.augments[1](images[1], drawn[1])
    torch.manual_seed(1)
    library = augment.TwoViewAugmentation(32)
    sources = _images(batch=5, size=40)
    library_one_pass = library(sources)
    calls = _passes(monkeypatch)
    grouped = views.views(images, drawn)
    assert calls == [1] * 12
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grouped, one_pass))
    assert torch.allclose(views.augments[1](images[1], drawn[1]), alone, atol=1e-6) and len(calls) == 18
    torch.manual_seed(1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(library(sources), library_one_pass))
    assert len(calls) == 28


def _top_level_aten_ops(function) -> list:
    """Names of the aten ops ``function`` calls itself (not those an op calls), from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        function()
    names = []
    for event in profiler.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            names.append(event.name)
    return names


def test_two_views_take_a_fixed_small_number_of_ops():
    """Issue 16: both views, from the draws for the global batch to normalised views, in at most
    150 top-level aten ops, the same number for any batch size, and never a data-dependent op
    (nonzero, boolean masks, index_copy) or a host read."""
    def step(views, images, batch):
        drawn = [module.sample_parameters(2 * batch) for module in views.augments]
        views.views(images, drawn, rows=slice(batch, 2 * batch))

    counts = []
    for batch in (4, 32):
        views, images = _two_views(batch, size=48)
        step(views, images, batch)
        names = _top_level_aten_ops(lambda: step(views, images, batch))  # noqa: B023 (called at once)
        counts.append(len(names))
        assert not {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::index_copy_",
                    "aten::index_select", "aten::masked_select", "aten::index_put_"} & set(names)
    assert counts[0] == counts[1] <= 150, counts


def test_photometric_views_compile_to_one_graph_without_recompiles():
    """The device part compiles whole (no graph break) and is not recompiled for new draws."""
    from torch._dynamo.utils import counters

    views, images = _two_views(8)
    compiled = torch.compile(views, dynamic=False, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        for seed in range(3):
            torch.manual_seed(seed)
            parameters = views.device_parameters([module.sample_parameters(8) for module in views.augments],
                                                 torch.device("cpu"))
            assert all(torch.equal(a, b) for a, b in zip(compiled(images, *parameters), views(images, *parameters)))
        assert dict(counters["graph_break"]) == {}
        assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
    finally:
        torch._dynamo.reset()


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
    """Parameters and their encoding live on the CPU; the packed values travel by non-blocking
    copies: torch's sync debug mode raises on any synchronising call inside the forward pass."""
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


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_batched_crop_flip_on_the_cpu_crops_each_box_as_the_batched_path(dtype):
    """The library's crop on the CPU (each box through torchvision's antialiased resize) and the
    one-call ``roi_align`` path an accelerator takes give the same crops and flips from the same
    draws, up to the box's rounding to whole pixels and the two resampling kernels (a few levels of
    255 on average; a crop flipped the other way would differ by about 50)."""
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(8, 3, 6, 6, generator=generator)
    images = torch.nn.functional.interpolate(low, size=64, mode="bilinear", align_corners=False) * 255
    images = images.round().to(torch.uint8) if dtype == torch.uint8 else images / 255
    crop = augment.BatchedCropFlip(32)
    torch.manual_seed(1)
    each = crop(images)
    torch.manual_seed(1)
    boxes = augment.random_resized_crop_boxes(8, 64, 64, crop.scale)
    flip = torch.rand(8) < crop.flip_p
    batched = crop.crop_batched(images, boxes, flip)
    assert each.dtype == batched.dtype == dtype and each.shape == batched.shape == (8, 3, 32, 32)
    scale = 255.0 if dtype == torch.float32 else 1.0
    error = ((each.float() - batched.float()) * scale).abs().mean(dim=(1, 2, 3))
    assert 0 < flip.sum() < 8 and error.max() < 6, error
