"""The ImageNet decode paths of jpeg_decode.py on real JPEGs made here: PIL draft mode decodes only
what the crops need, and the bytes-only worker path with one batched decode gives the crops of
the plain PIL path (augment.TwoViewTransform)."""
import io
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import augment
from run_helpers import load, train, train_in_process, write_config  # noqa: F401  (sys.path)
from runtime import jpeg_decode, loaders
from runtime.sampling import GlobalBatchSampler, SeededTransformDataset

SIZES = [(400, 300), (640, 480), (90, 120), (500, 375), (1024, 768)]


def jpeg_bytes(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([128 + 100 * np.sin(x / 17.0 + c) * np.cos(y / 23.0 - c) for c in range(3)], -1)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def pil_views(data: bytes, seed: int, size: int = 32):
    torch.manual_seed(seed)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return augment.TwoViewTransform(size, *augment.paper_view_augmentations())(image)


def test_draft_path_gives_the_pil_crops_and_decodes_less():
    views = augment.paper_view_augmentations()
    draft = jpeg_decode.DraftTwoViewTransform(32, *views)
    for seed, (width, height) in enumerate(SIZES):
        data = jpeg_bytes(width, height, seed)
        torch.manual_seed(seed)
        ours = draft(jpeg_decode.open_lazy(data))
        for expected, got in zip(pil_views(data, seed), ours):
            assert got.shape == expected.shape == (3, 32, 32) and got.dtype == torch.uint8
            difference = (got.int() - expected.int()).abs().float()
            assert difference.mean() < 1.5 and difference.max() <= 12, (width, height, difference.mean(),
                                                                          difference.max())
    # A 1024x768 image whose crops are all >= 8 x 32 pixels decodes at 1/8 scale.
    assert jpeg_decode.draft_scale(32, [(0, 0, 300, 400, False), (5, 5, 256, 700, True)]) == 8
    assert jpeg_decode.draft_scale(32, [(0, 0, 40, 400, False)]) == 1
    image = jpeg_decode.open_lazy(jpeg_bytes(1024, 768))
    image.draft("RGB", (128, 96))
    assert image.convert("RGB").size == (128, 96)  # libjpeg's DCT scaling: a smaller decode


def test_bytes_only_workers_and_one_batched_decode_give_the_pil_crops():
    views = augment.paper_view_augmentations()
    worker = jpeg_decode.EncodedTwoViewTransform(32, *views)
    items, expected = [], []
    for seed, (width, height) in enumerate(SIZES):
        data = jpeg_bytes(width, height, seed)
        torch.manual_seed(seed)
        items.append((worker(jpeg_decode.open_lazy(data)), seed))
        expected.append(pil_views(data, seed))
    # a CMYK JPEG (ImageNet has a few) is re-encoded by the worker and decodes the same way
    cmyk = jpeg_bytes(200, 150, 9, mode="CMYK")
    torch.manual_seed(9)
    items.append((worker(jpeg_decode.open_lazy(cmyk)), 9))
    batch, labels = jpeg_decode.collate_encoded(items)
    assert isinstance(batch, jpeg_decode.EncodedBatch) and labels.tolist() == [0, 1, 2, 3, 4, 9]
    assert all(d.dtype == torch.uint8 and d.dim() == 1 for d in batch.data) and batch.crops.shape == (6, 2, 5)
    view1, view2 = batch.decode(32, torch.device("cpu"))
    assert view1.is_contiguous() and view2.is_contiguous()
    assert view1.shape == view2.shape == (6, 3, 32, 32) and view1.dtype == torch.uint8
    for index, (first, second) in enumerate(expected):
        for got, want in ((view1[index], first), (view2[index], second)):
            difference = (got.int() - want.int()).abs()
            assert difference.float().mean() < 0.5 and difference.max() <= 2, index
    torch.manual_seed(9)
    reference = augment.TwoViewTransform(32, *views)(Image.open(io.BytesIO(cmyk)).convert("RGB"))
    assert (view1[5].int() - reference[0].int()).abs().float().mean() < 3


def per_view_crop(image: torch.Tensor, top, left, height, width, flip, size: int) -> torch.Tensor:
    """One view the way torchvision makes it on a GPU (float resize, clamp, round to uint8)."""
    view = TF.resized_crop(image.float(), top, left, height, width, [size, size],
                           interpolation=InterpolationMode.BICUBIC, antialias=True)
    view = view.clamp(0, 255).round().to(torch.uint8)
    return view.flip(-1) if flip else view


def test_one_batched_resized_crop_equals_the_per_view_crops():
    generator = torch.Generator().manual_seed(0)
    sizes = [(300, 400), (480, 640), (120, 90), (375, 500), (40, 30), (32, 32), (17, 200)]
    images = [torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in sizes]

    def draw(bound):
        return int(torch.randint(0, bound, (1,), generator=generator))

    crops = []
    for height, width in sizes:  # random boxes: strong downscales, upscales, thin strips, both flips
        per_image = []
        for flip in (0, 1):
            crop_height, crop_width = 1 + draw(height), 1 + draw(width)
            per_image.append([draw(height - crop_height + 1), draw(width - crop_width + 1), crop_height, crop_width,
                              flip])
        crops.append(per_image)
    crops[5][0] = [0, 0, 32, 32, 0]   # the whole image at the output size: no resize
    crops[6][1] = [0, 0, 17, 200, 1]  # the whole image, its edges in the weights' support
    size = 32
    got = jpeg_decode.resized_crops(images, torch.tensor(crops), size)
    assert got.shape == (2, len(sizes), 3, size, size) and got.dtype == torch.uint8
    for index, (image, per_image) in enumerate(zip(images, crops)):
        for view, box in enumerate(per_image):
            difference = (got[view, index].int() - per_view_crop(image, *box, size).int()).abs()
            # float rounding only: a value near .5 may round the other way
            assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01, (index, view, box)
    assert torch.equal(got[0, 5], images[5])


def test_the_prefetcher_hands_the_step_decoded_views():
    """data.decode: device: the training loader yields uint8 views already decoded and cropped (the
    trial's ``training_prepare``), the same as decoding the collated batch, in the sampler's order."""
    import model_def

    views = augment.paper_view_augmentations()
    images = [(jpeg_decode.open_lazy(jpeg_bytes(width, height, seed)), seed) for seed, (width, height) in
              enumerate(SIZES)]
    dataset = SeededTransformDataset(images, jpeg_decode.EncodedTwoViewTransform(24, *views))
    settings = types.SimpleNamespace(data=types.SimpleNamespace(decode="device"), image_size=24)
    trial = types.SimpleNamespace(settings=settings, device=torch.device("cpu"))
    prepare = model_def.BYOLTrial.training_prepare(trial)
    loader = loaders.LazyTrainingLoader(dataset, lambda: GlobalBatchSampler(len(images), 2, seed=3, infinite=False),
                                        0, torch.device("cpu"), jpeg_decode.collate_encoded, prepare)
    plain = iter(torch.utils.data.DataLoader(dataset, batch_sampler=GlobalBatchSampler(len(images), 2, seed=3,
                                                                                         infinite=False),
                                             collate_fn=jpeg_decode.collate_encoded))
    batches = list(loader)
    assert len(batches) == len(images) // 2
    for ((view1, view2), labels), (encoded, expected_labels) in zip(batches, plain):
        assert view1.shape == view2.shape == (2, 3, 24, 24) and view1.dtype == torch.uint8
        assert torch.equal(labels, expected_labels)
        want1, want2 = encoded.decode(24, torch.device("cpu"))
        assert torch.equal(view1, want1) and torch.equal(view2, want2)


def _jpeg_folder(root):
    for split, count in (("train", 6), ("val", 2)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                (folder / f"{index}.jpg").write_bytes(jpeg_bytes(80 + 8 * index, 60, index))


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["draft", "device"])
def test_trial_trains_with_each_decode_path(tmp_path, decode):
    _jpeg_folder(tmp_path / "images")
    data = {"dataset": "custom", "root": str(tmp_path / "images"), "validation_size": 2, "num_workers": 1,
            "decode": decode}
    config = write_config(str(tmp_path), data=data, image_size=16, global_batch_size=4,
                          train_length={"batches": 2}, checkpoint_period=None)
    result = train(["--config", config, "--checkpoint-dir", str(tmp_path / "ck")])
    assert "[byol] finished 2 steps" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_step_loss_receives_decoded_views(tmp_path, monkeypatch):
    """A real training run with data.decode: device: every batch step_loss sees holds uint8 views on
    the device, never the encoded batch (the prefetcher decoded it)."""
    import model_def

    seen = []
    step_loss = model_def.BYOLTrial.step_loss

    def recording(self, batch, step):
        seen.append(batch)
        return step_loss(self, batch, step)

    monkeypatch.setattr(model_def.BYOLTrial, "step_loss", recording)
    _jpeg_folder(tmp_path / "images")
    data = {"dataset": "custom", "root": str(tmp_path / "images"), "validation_size": 2, "num_workers": 0,
            "decode": "device"}
    config = write_config(str(tmp_path), data=data, image_size=16, global_batch_size=4,
                          train_length={"batches": 2}, checkpoint_period=None)
    train_in_process(config, tmp_path)
    assert len(seen) == 2
    for (view1, view2), labels in seen:
        for view in (view1, view2):
            assert isinstance(view, torch.Tensor) and view.dtype == torch.uint8 and view.shape == (4, 3, 16, 16)
        assert labels.shape == (4,)
