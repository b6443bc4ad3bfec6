"""Issue 16 row (a) under ``compile: true``: the real trial step (ResNet-50, 64 px, batch 32, fp32,
the CPU) compiled with inductor, as ``bench/throughput.py --done-when`` builds it. Prints the compile
time (step 1), the number of kernels inductor generated for the step's graphs (FX graph cache off,
so that they are generated here), later steps' times, and the top-level aten ops of one compiled
step (``throughput.top_level_ops``; the generated kernels are not aten ops, which is why both
numbers are printed).

    python bench/compiled_step_ops.py [--steps 3]

Takes about 2-4 minutes on one CPU thread.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import throughput  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the compiling one")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    import torch._inductor.config as inductor_config
    import torch._inductor.metrics as inductor_metrics

    inductor_config.fx_graph_cache = False
    torch.set_num_threads(1)
    bench_args = throughput.parse_args(["--backbone", "resnet50", "--image-size", "64", "--batch-size", "32"])
    images = throughput.source_images(bench_args)
    with tempfile.TemporaryDirectory() as directory:
        rows = throughput.ours_trial_rows(bench_args, torch.device("cpu"), images, directory, compile=True)
        step = rows[0].with_augmentation
        try:
            start = time.perf_counter()
            step()
            print(f"step 1 (compiles): {time.perf_counter() - start:.1f} s; inductor generated "
                  f"{inductor_metrics.generated_kernel_count} kernels", flush=True)
            for index in range(args.steps):
                start = time.perf_counter()
                step()
                print(f"step {index + 2}: {time.perf_counter() - start:.2f} s", flush=True)
            counts = throughput.top_level_ops(step)["other"]
            print(f"top-level aten ops of one compiled step: {sum(counts.values())} "
                  f"(most: {', '.join(f'{name} {n}' for name, n in counts.most_common(6))})")
        finally:
            rows[0].context.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
