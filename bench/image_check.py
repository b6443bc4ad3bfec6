"""What the check of every image file before the first step costs (runtime/preflight.py): the header
check (``data.image_check: header``, the default) beside the full decode (``full``), alternated in
one process over ``--rounds`` rounds on the same files, medians and min-max, and the time either
would take for ImageNet's 1,281,167 training images in one process.

    python bench/image_check.py [--files 300] [--size 500x375] [--rounds 3]

The files are random-content JPEGs (quality 90) at ImageNet's typical size, written to a temporary
folder (read from the page cache after the first round).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from runtime import preflight  # noqa: E402

IMAGENET_TRAIN = 1_281_167


class Files:
    """The image folder stand-in that ``preflight.image_files`` reads (a ``samples`` list)."""

    def __init__(self, paths):
        self.samples = [(path, 0) for path in paths]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--size", default="500x375")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        smooth = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        paths = []
        for i in range(args.files):
            image = Image.fromarray(np.roll(smooth, i, axis=1)).resize((width, height), Image.Resampling.BILINEAR)
            paths.append(os.path.join(folder, f"{i}.jpg"))
            image.save(paths[-1], quality=90)
        dataset = Files(paths)
        rates = {"header": [], "full": []}
        for round_ in range(args.rounds):
            order = ("header", "full") if round_ % 2 == 0 else ("full", "header")
            for kind in order:
                start = time.perf_counter()
                preflight.check_image_headers([dataset], full=kind == "full")
                rates[kind].append(args.files / (time.perf_counter() - start))
    for kind, values in rates.items():
        median = statistics.median(values)
        print(f"{kind:>6}: {median:8.0f} files/s (min-max {min(values):.0f}-{max(values):.0f}); ImageNet train in one "
              f"process: {IMAGENET_TRAIN / median / 60:.0f} min")
    print(f"full / header time: {statistics.median(rates['header']) / statistics.median(rates['full']):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
