"""bench/gpu_check.sh and bench/gpu_check.py (issue 16, item 9) cannot rot unnoticed: without a GPU
they stop with one clear line, and the CPU dry run (``--device cpu --tiny``) goes through every part
of the check (trial step, device-decode prefetcher, peers, decode rows, the table). No timing is
asserted: the figures belong to bench/RESULTS.md."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")


@no_gpu
def test_without_a_gpu_the_check_stops_with_one_error_line():
    shell = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert shell.returncode == 2 and shell.stderr.startswith("error: ") and "NVIDIA GPU" in shell.stderr, shell
    script = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert script.returncode == 2 and "error: --device cuda: no CUDA device" in script.stderr, script.stderr
    assert script.stdout == ""
    cpu = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert cpu.returncode == 2 and "--tiny" in cpu.stderr


@pytest.mark.slow
def test_the_cpu_dry_run_goes_through_every_row():
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    rates = {}
    for line in table[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rates[cells[0]] = cells[1]
    # The peers are optional (requirements-bench.txt, not in `make test`'s venv): measured when installed,
    # else named as not installed.
    peers = {"byol-pytorch, with augmentation": "byol_pytorch",
             "lightly, with augmentation (per-image BYOLTransform)": "lightly"}
    measured = ["ours trial step, eager", "ours trial step, data.decode: device (prefetcher)"]
    for row, module in peers.items():
        if importlib.util.find_spec(module) is not None:
            measured.append(row)
        else:
            peer = row.split(",")[0]
            assert any(name.startswith(f"{peer} (not installed") and rate == "not measured"
                       for name, rate in rates.items()), (peer, rates)
    for row in measured:
        assert re.fullmatch(r"[0-9.]+", rates.get(row, "")), (row, rates)
    assert any(name.startswith("decode + two views' crops") and re.fullmatch(r"[0-9.]+", rate)
               for name, rate in rates.items()), rates
    assert rates["device tensors returned by train_batch (each a harness .cpu() sync)"] == "n/a (CPU)"
