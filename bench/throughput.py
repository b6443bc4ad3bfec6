"""Benchmark: BYOL images/s, ours beside byol-pytorch and lightly, in one run on the same data.

BYOL's step (Grill et al. 2020, arXiv 2006.07733, section 3.1) is two views forward and backward
through the online network and forward through the target; its views come from table 6's
augmentations. Rows (images per second; one image = one source image, i.e. two views):

* ``ours library``: ``byol.BYOL`` as a library (README "Using the method as a library"):
  ``learner(images)`` augments both views itself (``augment.TwoViewAugmentation``: batched crop and
  photometric ops on the device), SGD with momentum, EMA update; "no aug" passes prepared views.
* ``ours trial step``: ``model_def.BYOLTrial.train_batch`` (its ``step_loss`` and ``after_step``:
  photometric views of the global batch, LARS, EMA; the non-finite watch): what a Determined run
  executes per step; the crops are made per image in data-loader workers and timed in the
  augmentation rows. "no aug" skips the
  photometric ops (normalisation only).
* ``byol-pytorch``: ``byol_pytorch.BYOL`` with its defaults (its batch-level augmentation, which
  draws one set of parameters per batch, and its simplicial embedding), same backbone, projector
  sizes and optimiser; "no aug" gives it an identity augmentation.
* ``lightly``: lightly's BYOL blocks (``BYOLProjectionHead``, ``BYOLPredictionHead``,
  ``NegativeCosineSimilarity``, ``update_momentum``); "aug" runs ``BYOLTransform`` per image
  (PIL, as its data-loader workers would) inside the timed step.
* augmentation alone (two views): ours batched (library), ours trial pipeline (per-image crops as in
  the workers + batched photometric ops), lightly's per-image ``BYOLTransform``, byol-pytorch's
  batch-level default.
* decode alone (two views of a ``--decode-size`` JPEG, crops included): PIL (decode whole,
  ``augment.TwoViewTransform``), PIL draft (``jpeg_decode.DraftTwoViewTransform``), torchvision
  on the CPU and on the GPU (``jpeg_decode.EncodedBatch.decode``).

``--done-when`` (issue 16's acceptance rows; fixed sizes, other size options ignored; about 5
minutes on 1 CPU thread) prints instead, in one run:

* (a) top-level aten ops of one real trial step, ``model_def.BYOLTrial.train_batch`` (Determined's
  local-mode context), ResNet-50, 64 px, batch 32, counted with ``torch.profiler`` (an op counts when
  no aten op encloses it; backward and optimiser included), split by phase (augmentation, forward
  and loss, backward, optimiser, EMA) with ``record_function`` labels around the trial's methods;
* (b) top-level ops of one batch-norm layer's forward + backward made by
  ``runtime.sync_batchnorm.convert_sync_batchnorm``, profiled on rank 0 of a real 2-process gloo
  group (world size 1 takes the local path), beside ``nn.BatchNorm2d``; collectives counted apart;
* (c) two-view augmentation at 224 px, batch 32: ours (trial pipeline and library) vs lightly;
* (d) the ResNet-50 64 px batch-32 training step: the trial step (per-view batch-norm statistics,
  LARS, EMA) and the library vs byol-pytorch, with augmentation;
  (c) and (d) timed alternated in one ``measure``; each ratio is the median (min-max) over rounds of
  the two rows' rates in the same round.

All rows run in one process with ``--threads`` intra-op threads, interleaved: each of ``--repeats``
rounds times every row once (``--steps`` steps after ``--warmup``), in a rotated order, and the
table reports each row's median over rounds; below it, issue 16's ratios (c) and (d) among the
measured rows, per round (median, min-max). The CPU of a shared machine is noisy: compare rows of
one run, not runs. Peers come from requirements-bench.txt; a missing peer's rows say so.

    python bench/throughput.py                                   # CPU: resnet18_cifar, 32 px, batch 32
    python bench/throughput.py --only augment,decode --image-size 224 --batch-size 32
    python bench/throughput.py --device cuda --backbone resnet50 --image-size 224 --batch-size 128 --precision bf16
    python bench/throughput.py --done-when                       # issue 16's rows (make done-when)
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import augment
import backbone as backbones
from augment import IMAGENET_MEAN, IMAGENET_STD
from byol import BYOL
from runtime import jpeg_decode, performance

GROUPS = ("model", "augment", "decode")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbone", default="resnet18_cifar", help=f"one of {', '.join(backbones.BACKBONES)}")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="autocast of every row's forward")
    parser.add_argument("--projection-size", type=int, default=256)
    parser.add_argument("--projection-hidden-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every row")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each row's median is reported")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row before its first round")
    parser.add_argument("--decode-size", type=int, default=500, help="side of the JPEGs of the decode rows")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of rows: {', '.join(GROUPS)}")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--compile", action="store_true",
                        help="add a row: the trial pipeline's photometric part compiled (inductor; minutes on a CPU)")
    parser.add_argument("--done-when", action="store_true",
                        help="issue 16's acceptance rows: op counts and ratios at fixed sizes (module docstring)")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= set(GROUPS):
        parser.error(f"--only {args.only!r}: groups are {', '.join(GROUPS)}")
    args.only = only
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible")
    for key in ("image_size", "batch_size", "repeats", "steps", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


# ----------------------------------------------------------------------------- data, once
def source_images(args) -> torch.Tensor:
    """The same uint8 batch [B, 3, S, S] for every row (smooth random colours, not noise)."""
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(args.batch_size, 3, 4, 4, generator=generator)
    images = nn.functional.interpolate(low, size=args.image_size, mode="bilinear", align_corners=False)
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def jpeg_files(count: int, size: int) -> List[bytes]:
    rng = np.random.default_rng(0)
    files = []
    for index in range(count):
        y, x = np.mgrid[0:size, 0:size * 4 // 3]
        pixels = np.stack([128 + 100 * np.sin(x / (11.0 + index) + c) * np.cos(y / 23.0 - c) for c in range(3)], -1)
        pixels = np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- rows
class Row:
    """A named step over ``images_per_step`` images; ``run()`` does one step."""

    def __init__(self, group: str, name: str, images_per_step: int, run: Callable[[], None]):
        self.group, self.name, self.images_per_step, self.run = group, name, images_per_step, run
        self.rates: List[float] = []


def sgd(parameters) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=0.01, momentum=0.9)


def encoder(args) -> nn.Module:
    torch.manual_seed(0)
    return backbones.build_backbone(args.backbone)


def ours_library_rows(args, device, images, autocast) -> List[Row]:
    learner = BYOL(encoder(args), args.image_size, hidden_layer=None, projection_size=args.projection_size,
                   projection_hidden_size=args.projection_hidden_size,
                   feature_size=backbones.feature_size(args.backbone)).to(device)
    if performance.use_channels_last(None, device):
        learner = performance.to_channels_last(learner)
    optimizer = sgd([p for p in learner.parameters() if p.requires_grad])
    on_device = images.to(device)
    normalize = augment.Normalize(IMAGENET_MEAN, IMAGENET_STD).to(device)
    views = (normalize(on_device), normalize(on_device.flip(-1)))

    def step(*inputs):
        with autocast():
            loss = learner(*inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_moving_average()

    return [Row("model", "ours library, with augmentation", len(images), lambda: step(on_device)),
            Row("model", "ours library, no augmentation", len(images), lambda: step(*views))]


def ours_trial_rows(args, device, images, directory, **extra_hparams) -> List[Row]:
    """The real trial (Determined's local-mode context), fed the same uint8 batch as both views.
    ``rows[0].trial`` is the trial, ``rows[0].step(calls)`` one ``train_batch``."""
    from model_def import BYOLTrial
    from runtime import launch
    from runtime.settings import parse_settings

    hparams = {"backbone": args.backbone, "image_size": args.image_size, "global_batch_size": args.batch_size,
               "projection_size": args.projection_size, "projection_hidden_size": args.projection_hidden_size,
               "train_length": {"batches": 10 ** 6}, "precision": args.precision, "classifier_validation": False,
               **extra_hparams}
    data = {"dataset": "digits", "root": os.path.join(directory, "data"), "num_workers": 0}
    settings = parse_settings(hparams, data)
    stack = launch.local_trial_context(hparams, {"hyperparameters": hparams, "data": data}, None,
                                       os.path.join(directory, "checkpoints"))
    context = stack.__enter__()
    trial = BYOLTrial(context, settings)
    trial.model.train()
    batch = ((images, images.flip(-1)), torch.zeros(len(images), dtype=torch.int64))

    class SwitchableViews(augment.PhotometricViews):
        """The trial's photometric views, or ("no aug") normalisation only."""
        augmenting = True

        def forward(self, images, floats, kernels, channels_last=False):
            if self.augmenting:
                return super().forward(images, floats, kernels, channels_last)
            return tuple(trial.normalize(view) for view in images)

    trial.photometric = views = SwitchableViews(list(trial.photometric.augments))

    def step(augmenting: bool):
        views.augmenting = augmenting
        context._current_batch_idx = trial.global_step  # what the harness's loop sets before a step
        trial.train_batch(batch, 0, trial.global_step)

    rows = [Row("model", "ours trial step, with photometric augmentation", len(images), lambda: step(True)),
            Row("model", "ours trial step, no augmentation", len(images), lambda: step(False))]
    rows[0].context = stack  # kept open for the whole run
    rows[0].trial, rows[0].with_augmentation = trial, lambda: step(True)
    return rows


def byol_pytorch_rows(args, device, images, autocast) -> List[Row]:
    try:
        import byol_pytorch
    except ImportError:
        return [Row("model", "byol-pytorch (not installed: pip install -r requirements-bench.txt)", 0, None)]
    net = encoder(args).to(device)
    learners = {}
    for name, augment_fn in (("with augmentation", None), ("no augmentation", nn.Identity())):
        learners[name] = byol_pytorch.BYOL(copy.deepcopy(net), image_size=args.image_size, hidden_layer=-1,
                                           projection_size=args.projection_size,
                                           projection_hidden_size=args.projection_hidden_size,
                                           augment_fn=augment_fn).to(device)
    floats = images.to(device).float() / 255

    def make(learner):
        optimizer = sgd([p for p in learner.parameters() if p.requires_grad])

        def step():
            with autocast():
                loss = learner(floats)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            learner.update_moving_average()
        return step

    return [Row("model", f"byol-pytorch, {name}", len(images), make(learner)) for name, learner in learners.items()]


def lightly_rows(args, device, images, autocast) -> List[Row]:
    try:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import update_momentum
        from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    except ImportError:
        return [Row("model", "lightly (not installed: pip install -r requirements-bench.txt)", 0, None)]
    features = backbones.feature_size(args.backbone)
    online = nn.ModuleDict({"backbone": encoder(args),
                            "projector": BYOLProjectionHead(features, args.projection_hidden_size,
                                                            args.projection_size),
                            "predictor": BYOLPredictionHead(args.projection_size, args.projection_hidden_size,
                                                            args.projection_size)}).to(device)
    target = copy.deepcopy(online)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    criterion = NegativeCosineSimilarity()
    optimizer = sgd(online.parameters())
    transform = BYOLTransform(BYOLView1Transform(input_size=args.image_size),
                              BYOLView2Transform(input_size=args.image_size))
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    normalize = augment.Normalize(IMAGENET_MEAN, IMAGENET_STD).to(device)
    prepared = (normalize(images.to(device)), normalize(images.flip(-1).to(device)))

    def step(augmented: bool):
        if augmented:
            pairs = [transform(image) for image in pil_images]
            x0 = torch.stack([pair[0] for pair in pairs]).to(device)
            x1 = torch.stack([pair[1] for pair in pairs]).to(device)
        else:
            x0, x1 = prepared
        update_momentum(online, target, m=0.99)
        with autocast():
            both = torch.cat([x0, x1])
            prediction = online["predictor"](online["projector"](online["backbone"](both).flatten(1)))
            with torch.no_grad():
                projection = target["projector"](target["backbone"](both).flatten(1))
            p0, p1 = prediction.float().chunk(2)
            z0, z1 = projection.float().chunk(2)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return [Row("model", "lightly, with augmentation (per-image BYOLTransform)", len(images), lambda: step(True)),
            Row("model", "lightly, no augmentation", len(images), lambda: step(False))]


def augmentation_rows(args, device, images) -> List[Row]:
    rows = []
    on_device = images.to(device)
    both_views = augment.TwoViewAugmentation(args.image_size).to(device)
    rows.append(Row("augment", "ours batched two views (library: crop + photometric on the device)", len(images),
                    lambda: both_views(on_device)))
    views = augment.paper_view_augmentations()
    geometric = augment.TwoViewTransform(args.image_size, *views)
    photometric = augment.PhotometricViews([augment.PhotometricAugment(v, IMAGENET_MEAN, IMAGENET_STD, args.image_size)
                                            for v in views]).to(device)
    pil_images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]

    def trial_pipeline(apply):
        pairs = [geometric(image) for image in pil_images]   # what the data-loader workers do
        first = torch.stack([pair[0] for pair in pairs]).to(device)
        second = torch.stack([pair[1] for pair in pairs]).to(device)
        drawn = [module.sample_parameters(len(pil_images)) for module in photometric.augments]
        apply((first, second), *photometric.device_parameters(drawn, device))   # both views as one batch

    rows.append(Row("augment", "ours trial pipeline (per-image crops as in workers + batched photometric)",
                    len(images), lambda: trial_pipeline(photometric)))
    if args.compile:  # the photometric part as compile: true runs it (compiled once, in the warm-up)
        compiled = performance.maybe_compile(photometric, True)
        rows.append(Row("augment", "ours trial pipeline, photometric part compiled (compile: true)", len(images),
                        lambda: trial_pipeline(compiled)))
    try:
        from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform

        transform = BYOLTransform(BYOLView1Transform(input_size=args.image_size),
                                  BYOLView2Transform(input_size=args.image_size))
        rows.append(Row("augment", "lightly BYOLTransform (per image, PIL)", len(images),
                        lambda: [transform(image) for image in pil_images]))
    except ImportError:
        rows.append(Row("augment", "lightly (not installed)", 0, None))
    try:
        import byol_pytorch

        probe = byol_pytorch.BYOL(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
                                  image_size=args.image_size, hidden_layer=-1, projection_size=4,
                                  projection_hidden_size=8)
        default = probe.augment1.to(device)
        floats = on_device.float() / 255
        rows.append(Row("augment", "byol-pytorch default (batch-level parameters)", len(images),
                        lambda: (default(floats), default(floats))))
    except ImportError:
        rows.append(Row("augment", "byol-pytorch (not installed)", 0, None))
    return rows


def decode_rows(args, device) -> List[Row]:
    files = jpeg_files(16, args.decode_size)
    views = augment.paper_view_augmentations()
    size = args.image_size
    plain = augment.TwoViewTransform(size, *views)
    draft = jpeg_decode.DraftTwoViewTransform(size, *views)
    encode = jpeg_decode.EncodedTwoViewTransform(size, *views)
    encoded, _ = jpeg_decode.collate_encoded([(encode(jpeg_decode.open_lazy(data)), 0) for data in files])
    rows = [
        Row("decode", f"PIL, whole image ({args.decode_size} px JPEG, two crops)", len(files),
            lambda: [plain(Image.open(io.BytesIO(data)).convert("RGB")) for data in files]),
        Row("decode", "PIL draft mode (only what the crops need)", len(files),
            lambda: [draft(jpeg_decode.open_lazy(data)) for data in files]),
        Row("decode", "torchvision decode_jpeg on the CPU, batched (+ crops)", len(files),
            lambda: encoded.decode(size, torch.device("cpu"))),
    ]
    if device.type == "cuda":
        rows.append(Row("decode", "torchvision decode_jpeg on the GPU (nvJPEG), batched (+ crops)", len(files),
                        lambda: encoded.decode(size, device)))
    else:
        rows.append(Row("decode", "torchvision decode_jpeg on the GPU: not measured (no CUDA device)", 0, None))
    return rows


# ----------------------------------------------------------------------------- the run
def measure(rows: List[Row], args, device) -> None:
    live = [row for row in rows if row.run is not None]
    for row in live:
        for _ in range(args.warmup):
            row.run()
    synchronise(device)
    for round_index in range(args.repeats):
        shift = round_index % max(len(live), 1)
        for row in live[shift:] + live[:shift]:   # rotated: no row always runs first or last
            synchronise(device)
            started = time.perf_counter()
            for _ in range(args.steps):
                row.run()
            synchronise(device)
            row.rates.append(row.images_per_step * args.steps / (time.perf_counter() - started))
        print(f"[bench] round {round_index + 1}/{args.repeats} done", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    performance.configure_device(device)
    if args.done_when:
        return done_when(args, argv)
    precision = args.precision

    def autocast():
        return performance.autocast(device, precision)

    images = source_images(args)
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as directory:
        if "model" in args.only:
            rows += ours_library_rows(args, device, images, autocast)
            rows += ours_trial_rows(args, device, images, directory)
            rows += byol_pytorch_rows(args, device, images, autocast)
            rows += lightly_rows(args, device, images, autocast)
        if "augment" in args.only:
            rows += augmentation_rows(args, device, images)
        if "decode" in args.only:
            rows += decode_rows(args, device)
        measure(rows, args, device)
        for row in rows:
            stack = getattr(row, "context", None)
            if stack is not None:
                stack.__exit__(None, None, None)
    report(rows, args, device, argv)
    return 0


# ----------------------------------------------------------------------------- issue 16's rows
OP_PREFIXES = ("aten::", "c10d::")


def top_level_ops(run: Callable[[], None], phases=()) -> Dict[str, collections.Counter]:
    """Ops of one ``run()`` as ``torch.profiler`` records them on the CPU, counting an op only when no
    other aten/c10d op encloses it (what a device would be asked to launch), grouped by the nearest
    enclosing ``record_function`` label among ``phases`` ("other" when none)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    counts: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for event in prof.events():
        if not event.name.startswith(OP_PREFIXES):
            continue
        parent, phase, top = event.cpu_parent, "other", True
        while parent is not None:
            if parent.name.startswith(OP_PREFIXES):
                top = False
                break
            if parent.name in phases and phase == "other":
                phase = parent.name
            parent = parent.cpu_parent
        if top:
            counts[phase][event.name] += 1
    return counts


def labelled(label: str, function: Callable) -> Callable:
    def call(*args, **kwargs):
        with torch.profiler.record_function(label):
            return function(*args, **kwargs)
    return call


TRIAL_PHASES = {  # the trial's methods (or its context's) whose ops make each phase
    # the photometric draws on the host, then both views on the device inside the step function
    "augmentation": ("trial", "view_parameters"), "augmentation (device)": ("trial", "photometric"),
    "forward + loss": ("trial", "step_call"),
    "backward": ("context", "backward"), "optimiser (LARS)": ("context", "step_optimizer"),
    "EMA and after-step": ("trial", "after_step")}


def trial_step_ops(row: Row) -> Dict[str, int]:
    """(a): one real ``train_batch`` of the trial behind ``row``, its top-level ops by phase."""
    trial = row.trial
    owners = {"trial": trial, "context": trial.context}
    saved = []
    for label, (owner, name) in TRIAL_PHASES.items():
        target = owners[owner]
        if isinstance(getattr(target, name, None), torch.nn.Module):  # a module: label its forward, keep it
            target, name = getattr(target, name), "forward"
        if callable(getattr(target, name, None)):   # a method others may rename: skipped, then "other"
            saved.append((target, name, target.__dict__.get(name)))
            setattr(target, name, labelled(label, getattr(target, name)))
    try:
        counts = top_level_ops(row.with_augmentation, phases=tuple(TRIAL_PHASES))
    finally:
        for target, name, previous in saved:
            if previous is None:
                delattr(target, name)
            else:
                setattr(target, name, previous)
    by_phase = {label: sum(counts.get(label, {}).values()) for label in (*TRIAL_PHASES, "other")}
    by_phase["total"] = sum(by_phase.values())
    by_phase["nonzero"] = sum(counter.get("aten::nonzero", 0) for counter in counts.values())
    by_phase["item / _local_scalar_dense"] = sum(counter.get("aten::item", 0) +
                                                 counter.get("aten::_local_scalar_dense", 0)
                                                 for counter in counts.values())
    return by_phase


BN_SHAPE = (32, 64, 16, 16)   # a ResNet-50 64 px stage-1 layer: batch 32 per process


def _batch_norm_ops(layer: nn.Module) -> Dict[str, int]:
    torch.manual_seed(0)
    x = torch.randn(*BN_SHAPE, requires_grad=True)
    grad = torch.randn(*BN_SHAPE)

    def run():
        layer(x).backward(grad)

    run()  # warm-up (and, synchronised, one collective in step with the other rank)
    counts = top_level_ops(run)["other"]
    collectives = sum(n for name, n in counts.items() if name.startswith("c10d::"))
    return {"ops": sum(counts.values()) - collectives, "collectives": collectives}


def _sync_batch_norm_worker(rank: int, init_file: str, result_file: str) -> None:
    import torch.distributed as dist

    from runtime import faults, sync_batchnorm

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with faults.process_group_torn_down():  # barrier, then destroy: gloo may abort at exit otherwise
        synced = _batch_norm_ops(sync_batchnorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(BN_SHAPE[1]))))
        dist.barrier()
        if rank == 0:
            plain = _batch_norm_ops(nn.Sequential(nn.BatchNorm2d(BN_SHAPE[1])))
            with open(result_file, "w") as handle:
                json.dump({"synchronised": synced, "plain": plain}, handle)


def sync_batch_norm_ops(directory: str) -> Dict[str, Dict[str, int]]:
    """(b): one batch-norm layer's forward + backward, synchronised over a real 2-process gloo group
    (rank 0 profiled) and plain ``nn.BatchNorm2d``."""
    import torch.multiprocessing as mp

    init_file, result_file = os.path.join(directory, "gloo-init"), os.path.join(directory, "bn-ops.json")
    mp.spawn(_sync_batch_norm_worker, args=(init_file, result_file), nprocs=2, join=True)
    with open(result_file) as handle:
        return json.load(handle)


DONE_WHEN_RATIOS = (  # (c) and (d): (ours, peer, target)
    ("ours trial pipeline (per-image crops as in workers + batched photometric)",
     "lightly BYOLTransform (per image, PIL)", 1.0),
    ("ours batched two views (library: crop + photometric on the device)", "lightly BYOLTransform (per image, PIL)",
     1.0),
    ("ours trial step, with photometric augmentation", "byol-pytorch, with augmentation", 1.0),
    ("ours library, with augmentation", "byol-pytorch, with augmentation", 1.0),
)


def done_when(args, argv) -> int:
    """Issue 16's acceptance rows (module docstring), printed as one table."""
    device = torch.device(args.device)
    model_args = argparse.Namespace(**{**vars(args), "backbone": "resnet50", "image_size": 64, "batch_size": 32})
    augment_args = argparse.Namespace(**{**vars(args), "image_size": 224, "batch_size": 32})

    def autocast():
        return performance.autocast(device, args.precision)

    wanted = {name for pair in DONE_WHEN_RATIOS for name in pair[:2]}
    with tempfile.TemporaryDirectory() as directory:
        print("[bench] (b) synchronised batch norm on 2 gloo processes", file=sys.stderr, flush=True)
        batch_norm = sync_batch_norm_ops(directory)
        model_images, augment_images = source_images(model_args), source_images(augment_args)
        trial_rows = ours_trial_rows(model_args, device, model_images, directory)
        rows = [row for row in (trial_rows + ours_library_rows(model_args, device, model_images, autocast) +
                                byol_pytorch_rows(model_args, device, model_images, autocast) +
                                augmentation_rows(augment_args, device, augment_images)) if row.name in wanted]
        measure(rows, args, device)
        print("[bench] (a) profiling one trial step", file=sys.stderr, flush=True)
        step_ops = trial_step_ops(trial_rows[0])
        trial_rows[0].context.__exit__(None, None, None)
    report_done_when(step_ops, batch_norm, rows, args, argv)
    return 0


def report_done_when(step_ops, batch_norm, rows: List[Row], args, argv) -> None:
    command = "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible); torch {torch.__version__}; "
          f"{args.threads} thread(s); {args.precision}; timings: median (min-max) of {args.repeats} interleaved "
          f"rounds of {args.steps} steps\n`{command.strip()}`\n")
    print("| issue 16 row | measured | target |")
    print("| --- | --- | --- |")
    phases = ", ".join(f"{label} {step_ops[label]}" for label in (*TRIAL_PHASES, "other"))
    print(f"| (a) top-level aten ops per trial step (ResNet-50, 64 px, batch 32; real train_batch) | "
          f"{step_ops['total']:,} ({phases}; nonzero {step_ops['nonzero']}, "
          f"item {step_ops['item / _local_scalar_dense']}) | <= 1,200 |")
    synced, plain = batch_norm["synchronised"], batch_norm["plain"]
    print(f"| (b) synchronised batch norm, one layer fwd + bwd, 2 gloo processes (vs nn.BatchNorm2d) | "
          f"{synced['ops']} ops + {synced['collectives']} collectives vs {plain['ops']} "
          f"({synced['ops'] / max(plain['ops'], 1):.1f}x) | <= 2x |")
    by_name = {row.name: row for row in rows}
    for ours, peer, target in DONE_WHEN_RATIOS:
        mine, theirs = by_name.get(ours), by_name.get(peer)
        label = "(c) two-view augmentation, 224 px, batch 32" if "lightly" in peer else \
            "(d) ResNet-50 64 px step, batch 32"
        if not (mine and theirs and mine.rates and theirs.rates):
            print(f"| {label}: {ours} / {peer} | not measured (peer missing: pip install -r requirements-bench.txt) "
                  f"| >= {target}x |")
            continue
        ratios = [a / b for a, b in zip(mine.rates, theirs.rates)]
        print(f"| {label}: {ours} / {peer} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}); "
              f"{statistics.median(mine.rates):.1f} vs {statistics.median(theirs.rates):.1f} images/s "
              f"| >= {target}x |")


def report_ratios(pairs, rows: List[Row]) -> None:
    """Issue 16's ratios among the measured rows, per round (rows of one round ran back to back, so a
    round's ratio cancels most of a shared machine's drift): median (min-max)."""
    by_name = {row.name: row for row in rows if row.rates}
    lines = [f"| {ours} / {peer} | {statistics.median(r):.2f}x | {min(r):.2f}-{max(r):.2f} |"
             for ours, peer in pairs if ours in by_name and peer in by_name
             for r in [[a / b for a, b in zip(by_name[ours].rates, by_name[peer].rates)]]]
    if lines:
        print("\n| ratio, per round | median | min-max |\n| --- | --- | --- |\n" + "\n".join(lines))


def report(rows: List[Row], args, device, argv) -> None:
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    command = "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {name}; torch {torch.__version__}; "
          f"{args.threads} thread(s); {args.backbone}, {args.image_size} px, batch {args.batch_size}, "
          f"{args.precision}; "
          f"median of {args.repeats} interleaved rounds of {args.steps} steps\n`{command.strip()}`\n")
    print("| group | row | images/s (median) | min-max |")
    print("| --- | --- | --- | --- |")
    results: Dict[str, Optional[float]] = {}
    for row in rows:
        if not row.rates:
            print(f"| {row.group} | {row.name} | not measured | |")
            results[row.name] = None
            continue
        median = statistics.median(row.rates)
        results[row.name] = median
        print(f"| {row.group} | {row.name} | {median:.1f} | {min(row.rates):.1f}-{max(row.rates):.1f} |")
    report_ratios([(ours, peer) for ours, peer, _ in DONE_WHEN_RATIOS], rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
                       "device": name, "results": results}, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
