"""Benchmark: BYOL pretraining throughput (images/s) with 1 and 2 processes, and the scaling
efficiency.

The paper scales BYOL by data parallelism: a global batch of 4096 split over 512 TPU cores with
synchronised batch norm (Grill et al. 2020, arXiv 2006.07733, section 3.3). This runs the real
trial (``model_def.py``: the Determined harness in local mode, DDP over gloo, the all_reduce batch
norm of ``sync_batchnorm.py``) on the offline digits setting of ``config/local-digits.yaml``,
with the same GLOBAL batch in every configuration:

* ``1 proc x 1 thread``: the one-slot baseline;
* ``1 proc x T threads``: one process using every core (T = the machine's cores);
* ``N procs x 1 thread`` (``torchrun --nproc_per_node N``): N slots.

Each configuration runs for ``--short`` and for ``--long`` steps (the fastest of ``--repeats``
runs each), and the steady-state rate is
``(long - short) * global_batch / (time_long - time_short)``: start-up, the final validation and
the final checkpoint cost the same in both runs and cancel. The speedup is relative to the one-slot
baseline; the scaling efficiency is the speedup per core used,
``rate(N procs) / (N * rate(1 proc x 1 thread))``.

    python bench/bench_scaling.py                   # digits, 32 px, global batch 128, N = 2
    python bench/bench_scaling.py --image-size 16 --global-batch 64 --short 4 --long 16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def bench_config(directory: str, args: argparse.Namespace) -> str:
    with open(os.path.join(ROOT, "config", "local-digits.yaml")) as handle:
        config = yaml.safe_load(handle)
    hp = config["hyperparameters"]
    hp.update({"image_size": args.image_size, "global_batch_size": args.global_batch, "validation_period": None,
               "checkpoint_period": None, "classifier_validation": False, "compare_random_init": False})
    hp.pop("sync_batch_norm", None)  # the default: synchronised whenever there are several processes
    config["data"] = {**config["data"], "root": os.path.join(directory, "data"), "num_workers": 0}
    path = os.path.join(directory, "bench.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def timed_run(config: str, steps: int, procs: int, threads: int, directory: str) -> float:
    """Wall seconds of one training run of ``steps`` steps (the whole command)."""
    out = tempfile.mkdtemp(dir=directory)
    args = ["--config", config, "--batches", str(steps), "--checkpoint-dir", os.path.join(out, "ck")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if procs == 1:
        command = [sys.executable, os.path.join(ROOT, "model_def.py"), *args]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [TORCHRUN, "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1", "--master_port",
                   str(port), os.path.join(ROOT, "model_def.py"), *args]
        env["USE_TORCH_DISTRIBUTED"] = "1"
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--procs", type=int, default=2, help="processes of the multi-process configuration")
    parser.add_argument("--short", type=int, default=3, help="steps of the short run")
    parser.add_argument("--long", type=int, default=15, help="steps of the long run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per length; the fastest counts (other load on the machine only slows runs)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.long <= args.short:
        parser.error("--long must be larger than --short")
    cores = os.cpu_count() or 1
    configurations = [("1 proc x 1 thread", 1, 1), (f"1 proc x {cores} threads", 1, cores),
                      (f"{args.procs} procs x 1 thread", args.procs, 1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as directory:
        config = bench_config(directory, args)
        for name, procs, threads in configurations:
            short = min(timed_run(config, args.short, procs, threads, directory) for _ in range(args.repeats))
            long = min(timed_run(config, args.long, procs, threads, directory) for _ in range(args.repeats))
            rate = (args.long - args.short) * args.global_batch / max(long - short, 1e-9)
            rows.append({"configuration": name, "processes": procs, "threads_per_process": threads,
                         "seconds_short": round(short, 2), "seconds_long": round(long, 2),
                         "images_per_second": round(rate, 1)})
            print(f"  {name}: {rate:.1f} images/s", flush=True)
    baseline = rows[0]["images_per_second"]
    for row in rows:
        row["speedup"] = round(row["images_per_second"] / baseline, 3)
        row["efficiency"] = round(row["speedup"] / (row["processes"] * row["threads_per_process"]), 3)
    load = os.getloadavg()[0]
    print(f"\nBYOL small_cnn, digits {args.image_size}px, global batch {args.global_batch}, steps "
          f"{args.short}->{args.long}, {cores} cores, load average {load:.2f} at the end")
    print(f"{'configuration':<22}{'images/s':>10}{'speedup':>10}{'efficiency':>12}")
    for row in rows:
        print(f"{row['configuration']:<22}{row['images_per_second']:>10.1f}{row['speedup']:>10.2f}"
              f"{row['efficiency']:>12.2f}")
    multi, whole = rows[2]["images_per_second"], rows[1]["images_per_second"]
    print(f"{args.procs} processes vs 1 process on all {cores} cores: x{multi / whole:.2f}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"settings": vars(args), "cores": cores, "load_average": load, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
