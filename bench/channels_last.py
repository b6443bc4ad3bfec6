"""What ``channels_last: null`` chooses on the CPU (runtime/performance.py): one forward + backward
of each backbone we ship in NCHW beside the same network in NHWC (channels_last), alternated in one
process, ``--rounds`` rounds, the median (min-max) of the per-round time ratios NCHW / NHWC (above 1:
NHWC is faster).

    python bench/channels_last.py [--rounds 5] [--threads 1]

Sizes are each backbone's usual training size here, with a batch that keeps a round short.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbone  # noqa: E402

CASES = (("small_cnn", 32, 128), ("resnet18_cifar", 32, 64), ("resnet18", 64, 64), ("resnet50", 64, 32))


def step_seconds(network: torch.nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    network(images).sum().backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error(f"--rounds and --threads must be >= 1, got {args.rounds} and {args.threads}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; {args.threads} thread(s); forward + backward, fp32; "
          f"median (min-max) of {args.rounds} alternated rounds")
    print("| backbone | image size | batch | NCHW / NHWC time |")
    print("| --- | --- | --- | --- |")
    for name, size, batch in CASES:
        torch.manual_seed(0)
        nchw = backbone.build_backbone(name)
        nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
        images = torch.randn(batch, 3, size, size)
        images_nhwc = images.contiguous(memory_format=torch.channels_last)
        step_seconds(nchw, images), step_seconds(nhwc, images_nhwc)   # warm-up
        ratios = []
        for round_index in range(args.rounds):
            if round_index % 2:   # alternate which goes first
                b, a = step_seconds(nhwc, images_nhwc), step_seconds(nchw, images)
            else:
                a, b = step_seconds(nchw, images), step_seconds(nhwc, images_nhwc)
            ratios.append(a / b)
        print(f"| {name} | {size} | {batch} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
