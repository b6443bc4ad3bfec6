"""One-shot GPU check (issue 16, item 9): what the hot path does on one CUDA device, in one table.

Run on a bare GPU machine with ``bash bench/gpu_check.sh`` (it installs the pinned requirements
and the bench peers into a venv first, then runs this script); under 8 minutes on one H100/H200.
Rows, all in one process, alternated (``throughput.measure``: rotated rounds, medians, min-max):

* ``model_def.BYOLTrial.train_batch`` at ResNet-50, 224 px, batch 64, bf16 autocast, channels_last,
  with the photometric augmentation: eager; ``compile: true`` (its compile time, the first steps,
  printed apart); and with ``data.decode: device``, each batch taken from
  ``runtime.loaders.prefetch_to_device`` over JPEGs made here (nvJPEG decode and the batched crops
  one batch ahead on a side stream, ``jpeg_decode.decode_batch``);
* byol-pytorch and lightly at the same sizes and precision (``throughput`` rows), with and without
  their augmentation;
* nvJPEG decode alone and decode + the two views' crops (images/s);
* peak device memory of one step of each row (``torch.cuda.max_memory_allocated``);
* ``torch.cuda.set_sync_debug_mode("error")`` over 20 trial steps (eager, and with device decode):
  "ok", or the first synchronising call; and how many device tensors ``train_batch`` returned
  (Determined's harness calls ``.cpu()`` on each: a sync per step).

Without CUDA it stops with one ``error:`` line (exit 2). ``--device cpu --tiny`` is a dry run of
every part on a tiny model (no compile, no sync mode: those need CUDA), run by
tests/test_gpu_check.py so that this script cannot rot unnoticed.

    bash bench/gpu_check.sh                       # on the GPU machine, from the repository root
    python bench/gpu_check.py --device cpu --tiny  # the dry run
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (bench/throughput.py: rows, data and the alternated measure)
from throughput import Row  # noqa: E402

import augment  # noqa: E402  (sys.path: the repository root, set by throughput)
from runtime import jpeg_decode, loaders, performance  # noqa: E402

SYNC_STEPS = 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: a dry run)")
    parser.add_argument("--tiny", action="store_true", help="resnet18_cifar, 32 px, batch 4, 2 rounds of 1 step")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.device.startswith(("cuda", "cpu")):
        parser.error(f"--device {args.device!r}: cuda or cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA device is visible (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False): run it on a GPU machine, or `--device cpu --tiny` for a "
              f"dry run", file=sys.stderr)
        raise SystemExit(2)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu: only with --tiny (a dry run; the figures need CUDA)")
    tiny = args.tiny
    # The fields throughput's row builders read.
    args.backbone = "resnet18_cifar" if tiny else "resnet50"
    args.image_size = 32 if tiny else 224
    args.batch_size = 4 if tiny else args.batch_size
    args.repeats, args.steps, args.warmup = (2, 1, 1) if tiny else (args.repeats, args.steps, 2)
    args.precision = "bf16"
    args.projection_size, args.projection_hidden_size = (16, 32) if tiny else (256, 4096)
    args.threads = 1 if tiny else 4
    args.decode_size = 48 if tiny else 375
    return args


def trial_rows(args, device, images, directory) -> Dict[str, Row]:
    """The trial step eager, compiled (CUDA only) and fed by the device-decode prefetcher."""
    common = {"precision": "bf16", "channels_last": device.type == "cuda", "finite_check_period": 10 ** 6}
    eager = throughput.ours_trial_rows(args, device, images, directory, **common)[0]
    eager.name = "ours trial step, eager"
    rows = {"eager": eager}
    if device.type == "cuda":
        compiled = throughput.ours_trial_rows(args, device, images, os.path.join(directory, "compiled"),
                                              compile=True, **common)[0]
        compiled.name = "ours trial step, compile: true"
        rows["compiled"] = compiled
    # data.decode: device: the JPEG batch made once, decoded and cropped by the prefetcher each step.
    views = augment.paper_view_augmentations()
    worker = jpeg_decode.EncodedTwoViewTransform(args.image_size, *views)
    files = itertools.islice(itertools.cycle(throughput.jpeg_files(min(args.batch_size, 16), args.decode_size)),
                             args.batch_size)
    torch.manual_seed(0)
    encoded = jpeg_decode.collate_encoded([(worker(jpeg_decode.open_lazy(data)), 0) for data in files])
    if device.type == "cuda":
        encoded = (encoded[0].pin_memory(), encoded[1].pin_memory())
    prepare = functools.partial(jpeg_decode.decode_batch, image_size=args.image_size, device=device)
    batches = loaders.prefetch_to_device(itertools.repeat(encoded), device, prepare)
    trial = eager.trial

    def decoded_step():
        trial.context._current_batch_idx = trial.global_step
        trial.last_metrics = trial.train_batch(next(batches), 0, trial.global_step)

    rows["decode"] = Row("model", "ours trial step, data.decode: device (prefetcher)", args.batch_size, decoded_step)
    rows["decode"].trial = trial
    return rows


def decode_rows(args, device) -> List[Row]:
    from torchvision.io import ImageReadMode, decode_jpeg

    files = throughput.jpeg_files(args.batch_size, args.decode_size)
    torch.manual_seed(0)
    worker = jpeg_decode.EncodedTwoViewTransform(args.image_size, *augment.paper_view_augmentations())
    encoded, _ = jpeg_decode.collate_encoded([(worker(jpeg_decode.open_lazy(data)), 0) for data in files])
    where = "nvJPEG" if device.type == "cuda" else "CPU"
    size = f"{args.decode_size}x{args.decode_size * 4 // 3}"
    return [Row("decode", f"decode_jpeg alone ({where}, {size} JPEGs, batched)", len(files),
                lambda: decode_jpeg(encoded.data, mode=ImageReadMode.RGB, device=device)),
            Row("decode", f"decode + two views' crops ({where}, EncodedBatch.decode)", len(files),
                lambda: encoded.decode(args.image_size, device))]


def peak_memory(row: Row, device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    row.run()
    torch.cuda.synchronize(device)
    return f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"


def sync_check(row: Row, device) -> str:
    """``set_sync_debug_mode("error")`` over SYNC_STEPS steps of ``row``: "ok" or the first sync."""
    if device.type != "cuda":
        return "n/a (CPU)"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    done = 0
    try:
        while done < SYNC_STEPS:
            row.run()
            done += 1
    except RuntimeError as error:
        return f"FAILED at step {done + 1}: {str(error).splitlines()[0][:160]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return f"ok ({SYNC_STEPS} steps)"


def device_tensors_returned(trial, row: Row) -> int:
    """Device tensors in what one ``train_batch`` returns (the harness's ``.cpu()`` syncs on each)."""
    metrics = {}
    original = trial.train_batch

    def recording(*args, **kwargs):
        metrics.update(original(*args, **kwargs))
        return metrics

    trial.train_batch = recording
    try:
        row.run()
    finally:
        del trial.train_batch
    return sum(isinstance(value, torch.Tensor) and value.device.type != "cpu" for value in metrics.values())


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    performance.configure_device(device)

    def autocast():
        return performance.autocast(device, args.precision)

    images = throughput.source_images(args)
    with tempfile.TemporaryDirectory() as directory:
        trial = trial_rows(args, device, images, directory)
        rows = list(trial.values())
        rows += throughput.byol_pytorch_rows(args, device, images, autocast)
        rows += throughput.lightly_rows(args, device, images, autocast)
        rows += decode_rows(args, device)
        compile_time = None
        if "compiled" in trial:   # compile before timing: the warm-up would otherwise hide it
            compile_started = time.perf_counter()
            trial["compiled"].run()
            throughput.synchronise(device)
            compile_time = time.perf_counter() - compile_started
        print("[gpu_check] timing rows, alternated", file=sys.stderr, flush=True)
        throughput.measure(rows, args, device)
        memory = {row.name: peak_memory(row, device) for row in rows if row.run is not None}
        print("[gpu_check] sync debug mode", file=sys.stderr, flush=True)
        syncs = {name: sync_check(trial[name], device) for name in ("eager", "decode")}
        returned = (device_tensors_returned(trial["eager"].trial, trial["eager"]) if device.type == "cuda"
                    else "n/a (CPU)")
        for row in rows:
            if getattr(row, "context", None) is not None:
                row.context.__exit__(None, None, None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, --tiny)"
    print(f"\n{name}; torch {torch.__version__}; {args.backbone}, {args.image_size} px, batch {args.batch_size}, "
          f"bf16, channels_last {device.type == 'cuda'}; median (min-max) of {args.repeats} alternated rounds of "
          f"{args.steps} steps\n`python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    print("| row | images/s | min-max | peak memory |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        if not row.rates:
            print(f"| {row.name} | not measured | | |")
            continue
        print(f"| {row.name} | {statistics.median(row.rates):.1f} | {min(row.rates):.1f}-{max(row.rates):.1f} "
              f"| {memory.get(row.name, '')} |")
    print(f"| compile time of the trial step (first compiled step) | "
          f"{'n/a (no compile on CPU)' if compile_time is None else f'{compile_time:.1f} s'} | | |")
    for key, result in syncs.items():
        print(f"| sync debug mode 'error', {SYNC_STEPS} steps, {trial[key].name} | {result} | | |")
    print(f"| device tensors returned by train_batch (each a harness .cpu() sync) | {returned} | | |")
    print(f"| whole check | {time.perf_counter() - started:.0f} s | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
