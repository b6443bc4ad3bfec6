"""Real training runs for the distributed, resume and fault tests: ``python model_def.py`` or
``torchrun --nproc_per_node N model_def.py`` (gloo) in subprocesses, on a tiny digits setting.

The straight runs that several tests compare against are made once per test session
(:func:`straight_run`) in a temporary directory removed at exit.
"""
from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from runtime import checkpoints, replicas

TINY_HPARAMS = {
    "training_mode": "SELF_SUPERVISED", "seed": 0, "backbone": "small_cnn", "image_size": 8,
    "global_batch_size": 32, "train_length": {"batches": 4}, "warmup_epochs": 0.05, "base_lr": 1.0,
    "projection_size": 16, "projection_hidden_size": 32, "checkpoint_period": {"batches": 1},
    "classifier_validation": False, "compare_random_init": False,
    "classifier": {"learning_rates": [0.4, 0.1], "train_epochs": 2, "batch_size": 64},
}


def write_config(directory: str, data: Optional[dict] = None, **hparams) -> str:
    """A tiny experiment yaml (digits by default) in ``directory``."""
    config = {
        "name": "tiny", "entrypoint": "python3 model_def.py --config tiny.yaml",
        "resources": {"slots_per_trial": 1}, "max_restarts": 0,
        "searcher": {"name": "single", "metric": "validation_byol_loss", "smaller_is_better": True},
        "hyperparameters": {**TINY_HPARAMS, **hparams},
        "data": data or {"dataset": "digits", "root": os.path.join(directory, "data"), "validation_size": 50,
                         "num_workers": 0},
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tiny.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def command(args: List[str], nproc: int = 1) -> List[str]:
    if nproc == 1:
        return [PYTHON, os.path.join(ROOT, "model_def.py"), *args]
    return [*torchrun(nproc), os.path.join(ROOT, "model_def.py"), *args]


def torchrun(nproc: int) -> List[str]:
    """``torchrun`` for one machine; ``--standalone`` binds its rendezvous to a free port itself."""
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(nproc)]


def environment(nproc: int = 1) -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if nproc > 1:
        env["USE_TORCH_DISTRIBUTED"] = "1"
    return env



# Runs a two-rank check script, then tears its process group down as every run of the product does
# (faults.end_process_group): left to the interpreter's exit, gloo aborts a rank now and then.
TWO_RANK_RUNNER = """
import runpy, sys
sys.path.insert(0, {root!r})
from runtime import faults
script = sys.argv.pop(1)
with faults.process_group_torn_down():
    runpy.run_path(script, run_name="__main__")
"""


def run_on_two_ranks(directory, name: str, source: str, timeout: float = 120) -> None:
    """Writes ``source`` (a script that takes ``directory`` as argv[1] and writes ``rank{r}.ok`` there
    when its checks pass) and runs it under torchrun on 2 gloo processes, its process group torn
    down at the end (:data:`TWO_RANK_RUNNER`); fails with its output."""
    script = os.path.join(str(directory), name)
    with open(script, "w") as handle:
        handle.write(source)
    runner = os.path.join(str(directory), "two_rank_runner.py")
    with open(runner, "w") as handle:
        handle.write(TWO_RANK_RUNNER.format(root=ROOT))
    result = subprocess.run([*torchrun(2), runner, script, str(directory)], env=environment(2), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for rank in (0, 1):
        assert os.path.exists(os.path.join(str(directory), f"rank{rank}.ok")), f"rank {rank} did not finish its checks"


def train(args: List[str], nproc: int = 1, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the trial's command line; the working directory is the repository (its .detignore keeps
    the per-checkpoint code copy small)."""
    result = subprocess.run(command(args, nproc), cwd=ROOT, env=environment(nproc), capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"run failed ({result.returncode}): {' '.join(args)}\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def complete(directory: str) -> List[Tuple[int, str]]:
    """``(global_step, path)`` of the complete checkpoints in ``directory``, oldest first."""
    return checkpoints.complete_checkpoints(directory)


def at_step(directory: str, step: int) -> str:
    found = [path for s, path in complete(directory) if s == step]
    assert len(found) == 1, f"expected one checkpoint at step {step} in {directory}: {complete(directory)}"
    return found[0]


def load(path: str) -> dict:
    """A checkpoint's state, loaded as every checkpoint here is: ``weights_only=True``."""
    checkpoints.allow_harness_checkpoints()
    return torch.load(os.path.join(path, checkpoints.STATE_FILE), map_location="cpu", weights_only=True)


def training_state(checkpoint: dict) -> dict:
    """What must be bit-identical after an exact resume: networks, optimiser (LARS momentum),
    schedule position and heads."""
    return {"models": checkpoint["models_state_dict"], "optimizers": checkpoint["optimizers_state_dict"],
            "byol_state": checkpoint["callbacks"]["byol_state"]}


def assert_identical(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: differs by up to {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def saved_digests(path: str) -> Dict[str, str]:
    """:func:`replicas.trial_digests` recomputed from a checkpoint on disk."""
    state = load(path)
    digests = replicas.state_digests(state["models_state_dict"][0])
    digests.update(replicas.state_digests(state["callbacks"]["byol_state"]["heads"], prefix="heads."))
    return digests


_SESSION = tempfile.mkdtemp(prefix="byol-runs-")
atexit.register(shutil.rmtree, _SESSION, True)


@functools.lru_cache(maxsize=None)
def straight_run(nproc: int) -> Tuple[str, str, str]:
    """4 batches straight, a checkpoint after every batch: ``(config, checkpoint_dir, stdout)``."""
    directory = os.path.join(_SESSION, f"straight{nproc}")
    config = write_config(directory)
    result = train(["--config", config, "--checkpoint-dir", os.path.join(directory, "ckpt")], nproc)
    return config, os.path.join(directory, "ckpt"), result.stdout


def metrics(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


def train_in_process(config_path, out_dir, name: str = "run") -> dict:
    """Runs ``model_def.py``'s command line in this process (checkpoints under ``out_dir/<name>``)
    and returns the metrics it wrote; fails the test on a non-zero exit."""
    import model_def

    metrics_file = os.path.join(str(out_dir), f"{name}.json")
    code = model_def.main(["--config", str(config_path), "--checkpoint-dir", os.path.join(str(out_dir), name),
                        "--metrics-out", metrics_file])
    assert code == 0, f"model_def.py exited with {code}"
    return metrics(metrics_file)


def top_level_aten_ops(work) -> collections.Counter:
    """The aten ops that ``work()`` calls at the top level (not from inside another aten op), as
    ``torch.profiler`` records them on the CPU: the host's op-by-op work (collectives, ``c10d::``,
    are not aten ops and are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        work()
    counts = collections.Counter()
    for event in prof.events():
        parent, nested = event.cpu_parent, False
        while parent is not None and not nested:
            nested = parent.name.startswith(("aten::", "c10d::"))
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and not nested:
            counts[event.name] += 1
    return counts


def batch_norm_layer_ops(layer, views: int) -> collections.Counter:
    """:func:`top_level_aten_ops` of one batch-norm layer's forward and backward on a batch of
    ``views`` view groups (a sum as the loss), after one warm-up step."""
    import torch

    from batchnorm import view_groups

    x = torch.randn(8, 8, 5, 5, requires_grad=True)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with view_groups(views):
            layer(x).sum().backward()
    step()
    return top_level_aten_ops(step)

