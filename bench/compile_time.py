"""Benchmark: what ``compile: true`` costs up front on this machine (runtime/performance.py).

Builds the real BYOL trial (Determined's local-mode context, like ``throughput.py``'s trial rows)
with ``compile: true`` and times its first training steps: step 1 includes torch.compile of the
whole step's device part (both photometric views, the learner's forward and loss, and AOT
autograd's backward) with the chosen backend; later steps show the compiled speed. The same steps
with ``compile: false`` run first, in the same process, for comparison.

    python bench/compile_time.py                          # small_cnn, 32 px, batch 32, inductor, CPU
    python bench/compile_time.py --backbone resnet18_cifar --steps 4
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model_def import BYOLTrial  # noqa: E402
from runtime import launch, performance  # noqa: E402
from runtime.settings import parse_settings  # noqa: E402


def step_times(args, compile_step: bool, directory: str) -> list:
    hparams = {"backbone": args.backbone, "image_size": args.image_size, "global_batch_size": args.batch_size,
               "projection_size": 64, "projection_hidden_size": 256, "train_length": {"batches": 1000},
               "classifier_validation": False, "compile": compile_step}
    data = {"dataset": "digits", "root": os.path.join(directory, "data"), "num_workers": 0}
    generator = torch.Generator().manual_seed(0)
    times = []
    with launch.local_trial_context(hparams, {"hyperparameters": hparams, "data": data}, None,
                                    os.path.join(directory, f"checkpoints-{compile_step}")) as context:
        trial = BYOLTrial(context, parse_settings(hparams, data))
        for step in range(args.steps):
            images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                                   generator=generator)
            labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
            context._current_batch_idx = step  # what the harness's loop sets before a step
            started = time.perf_counter()
            trial.train_batch(((images, images.flip(-1)), labels), 0, step)
            times.append(time.perf_counter() - started)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    performance.COMPILE_BACKEND = args.backend
    with tempfile.TemporaryDirectory() as directory:
        eager = step_times(args, False, directory)
        compiled = step_times(args, True, directory)
    print(f"{args.backbone}, {args.image_size} px, batch {args.batch_size}, backend {args.backend}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("| step | eager s | compile: true s |\n| --- | --- | --- |")
    for index, (a, b) in enumerate(zip(eager, compiled), start=1):
        print(f"| {index} | {a:.2f} | {b:.2f} |")
    print(f"compile time (step 1 compiled - step 1 eager): {compiled[0] - eager[0]:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
