"""Benchmark: images per second per data-loader worker streaming from Cloud Storage.

BYOL pre-trains on the 1.28M ImageNet training images (Grill et al. 2020, arXiv 2006.07733,
section 4); on the cluster they stream from a bucket where each GET costs tens of milliseconds of
latency. This benchmark puts a real storage server (``gcp-storage-emulator``) behind the
fault-injecting proxy of ``tests/fault_proxy.py`` adding ``--latency`` (default 20 ms) to every
request, and measures, in the same run and against the same server:

* ``naive``: one image fetched at a time per worker (``max_in_flight=1``), and
* ``ours``: ``GCSImageFolder.__getitems__`` with ``max_in_flight`` downloads in flight,

each through a ``torch.utils.data.DataLoader`` with ONE worker process (so the figure is per
worker), decoding to RGB and converting to a uint8 tensor as the training transform would. Every
mode runs in a fresh process; its worker's peak resident memory (``ru_maxrss``) is reported.
The emulator and the proxy are separate processes (as the remote service would be).

CPU pinning (``--pin``, the default): on a real cluster the storage service runs on other
machines, so here the "server side" -- proxy, emulator, this script's main process and the
benchmark's main (consuming) process -- is pinned with ``os.sched_setaffinity`` to the other
CPUs, and the measured DataLoader worker process (all its threads) to one CPU of its own. The
figure is then images/s of one worker owning one core, without the local stand-in for the remote
service taking CPU time from it. ``--no-pin`` lets everything share all CPUs (on a 2-core machine
the server then competes with the measured worker). Needs >= 2 CPUs; the choice is printed.

    python bench/bench_gcs.py                       # defaults: 20 ms, 64x64 JPEGs
    python bench/bench_gcs.py --image-size 160 --in-flight 32,64 --output bench_gcs.json
    python bench/bench_gcs.py --no-pin              # everything shares all CPUs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
BUCKET = "bench"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_cpus() -> tuple[set[int], set[int]]:
    """(worker CPUs, server CPUs): the first CPU this process may use for the measured worker,
    the rest for everything else (computed once, before pinning, and handed to the mode
    processes in ``BENCH_GCS_CPUS``). Raises SystemExit with fewer than 2 CPUs."""
    if "BENCH_GCS_CPUS" in os.environ:
        worker, server = os.environ["BENCH_GCS_CPUS"].split(":")
        return {int(worker)}, {int(c) for c in server.split(",")}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs at least 2 CPUs; rerun with --no-pin")
    os.environ["BENCH_GCS_CPUS"] = f"{cpus[0]}:{','.join(map(str, cpus[1:]))}"
    return {cpus[0]}, set(cpus[1:])


def set_process_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` (sched_setaffinity acts on one thread at a time;
    threads started later inherit their creator's mask)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread just exited
            pass


def _pin_worker(worker_id: int) -> None:
    set_process_affinity(os.getpid(), pin_cpus()[0])


def run_mode(args: argparse.Namespace, in_flight: int, images: int) -> dict:
    """Measure one mode in this (fresh) process: one DataLoader worker, ``images`` images."""
    import torch
    from PIL import Image  # noqa: F401  (imported before timing)
    from torch.utils.data import DataLoader, Subset
    from torchvision.transforms.functional import pil_to_tensor

    from runtime.gcs import GCSImageFolder

    ds = GCSImageFolder(BUCKET, f"gs://{BUCKET}/train.txt", transform=pil_to_tensor,
                        max_in_flight=in_flight)
    order = [i % len(ds) for i in range(images)]
    if args.pin:  # this (consuming) process on the server CPUs, the worker on its own CPU
        set_process_affinity(os.getpid(), pin_cpus()[1])
    loader = DataLoader(Subset(ds, order), batch_size=args.batch_size, num_workers=1,
                        worker_init_fn=_pin_worker if args.pin else None)
    it = iter(loader)
    first = next(it)  # worker start-up and the first batch are not timed
    start, seen, main_cpu = time.perf_counter(), 0, time.process_time()
    for images_batch, _ in it:
        seen += len(images_batch)
    elapsed = time.perf_counter() - start
    main_cpu = time.process_time() - main_cpu
    del it, loader  # joins the worker, so RUSAGE_CHILDREN covers it
    worker = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert first[0].dtype == torch.uint8
    total = seen + args.batch_size
    return {"max_in_flight": in_flight, "images": seen, "seconds": round(elapsed, 3),
            "images_per_s": round(seen / elapsed, 1),
            "worker_peak_rss_mb": round(worker.ru_maxrss / 1024, 1),
            "worker_cpu_ms_per_image": round((worker.ru_utime + worker.ru_stime) / total * 1e3, 3),
            "main_cpu_ms_per_image": round(main_cpu / seen * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.020, help="seconds added per request")
    parser.add_argument("--num-images", type=int, default=600, help="objects uploaded")
    parser.add_argument("--image-size", type=int, default=64, help="JPEG side length, pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--in-flight", default="32,64", help="max_in_flight values for 'ours'")
    parser.add_argument("--naive-images", type=int, default=192)
    parser.add_argument("--ours-images", type=int, default=3200)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="pin the measured worker to one CPU and the proxy, emulator and "
                             "main processes to the others (default: --pin)")
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode
    args = parser.parse_args()
    if args.mode:
        in_flight, images = map(int, args.mode.split(":"))
        print(json.dumps(run_mode(args, in_flight, images)))
        return

    if args.pin:  # this process and its children (emulator, proxy) on the server CPUs
        set_process_affinity(os.getpid(), pin_cpus()[1])
    from fault_proxy import main as _proxy_main  # noqa: F401  (fail early if tests/ is missing)
    from gcs_fixtures import Emulator, jpeg_bytes

    emulator = Emulator()
    proxy = None
    try:
        from runtime.gcs import make_client

        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        bucket = make_client().create_bucket(BUCKET)
        names = [f"train/c{i % 10:02d}/{i:06d}.jpg" for i in range(args.num_images)]
        sizes = []
        for i, name in enumerate(names):
            data = jpeg_bytes(i, args.image_size)
            sizes.append(len(data))
            bucket.blob(name).upload_from_string(data, content_type="image/jpeg")
        bucket.blob("train.txt").upload_from_string("\n".join(names))

        proxy = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests", "fault_proxy.py"), str(emulator.port),
             "--latency", str(args.latency)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        proxy_port = int(proxy.stdout.readline().split()[1])
        env = dict(os.environ, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{proxy_port}")

        at_least = 3 * args.batch_size  # one untimed batch, then at least two timed ones
        modes = [("naive", 1, max(args.naive_images, at_least))]
        modes += [("ours", int(k), max(args.ours_images, at_least))
                  for k in args.in_flight.split(",")]
        results = []
        for name, in_flight, images in modes:
            cpu0 = cpu_seconds(proxy.pid), cpu_seconds(emulator.proc.pid)
            out = subprocess.run([sys.executable, os.path.abspath(__file__),
                                  "--mode", f"{in_flight}:{images}",
                                  "--batch-size", str(args.batch_size),
                                  "--pin" if args.pin else "--no-pin"],
                                 env=env, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"benchmark mode {name} failed:\n{out.stderr[-3000:]}")
            result = {"mode": name, **json.loads(out.stdout.strip().splitlines()[-1])}
            n = result["images"] + args.batch_size  # the untimed first batch also hit the server
            result["proxy_cpu_ms_per_image"] = round(
                (cpu_seconds(proxy.pid) - cpu0[0]) / n * 1e3, 3)
            result["emulator_cpu_ms_per_image"] = round(
                (cpu_seconds(emulator.proc.pid) - cpu0[1]) / n * 1e3, 3)
            results.append(result)
        naive = results[0]["images_per_s"]
        for r in results:
            r["speedup_vs_naive"] = round(r["images_per_s"] / naive, 1)
        report = {"latency_ms": args.latency * 1e3, "cpu_count": os.cpu_count(),
                  "load_average": os.getloadavg(),
                  "objects": args.num_images, "image_size": args.image_size,
                  "mean_object_bytes": round(sum(sizes) / len(sizes)),
                  "batch_size": args.batch_size, "data_loader_workers": 1,
                  "pinned": args.pin, "results": results}
    finally:
        if proxy is not None:
            proxy.stdin.close()
            proxy.wait(10)
        emulator.stop()

    print(f"{args.latency * 1e3:.0f} ms added per request, {report['mean_object_bytes']} B JPEGs "
          f"({args.image_size}px), batch {args.batch_size}, 1 data-loader worker, "
          f"{os.cpu_count()} CPUs")
    if args.pin:
        worker_cpus, server_cpus = pin_cpus()
        print(f"pinned: measured worker on CPU {sorted(worker_cpus)}; proxy, emulator and main "
              f"processes on CPU {sorted(server_cpus)} (--no-pin to share all CPUs)")
    else:
        print("not pinned: worker, proxy, emulator and main processes share all CPUs")
    print(f"{'mode':6} {'in flight':>9} {'images/s':>9} {'x naive':>8} {'peak RSS MB':>12} "
          f"{'CPU ms/image: worker':>21} {'proxy':>6} {'server':>6}")
    for r in results:
        print(f"{r['mode']:6} {r['max_in_flight']:9d} {r['images_per_s']:9.1f} "
              f"{r['speedup_vs_naive']:8.1f} {r['worker_peak_rss_mb']:12.1f} "
              f"{r['worker_cpu_ms_per_image']:21.2f} {r['proxy_cpu_ms_per_image']:6.2f} "
              f"{r['emulator_cpu_ms_per_image']:6.2f}")
    print("load average at the end: %.1f %.1f %.1f" % os.getloadavg())
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
