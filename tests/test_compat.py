"""The default cluster image (``determinedai/pytorch-ngc:0.38.1``: Python 3.10, torch 2.3) can run
every file: Python 3.10 syntax and library checked statically with vermin, and the torch >= 2.4
API (``torch.serialization.add_safe_globals``) feature-detected with a fallback that keeps
checkpoint loading code-free."""
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from runtime import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERMIN = [os.path.join(os.path.dirname(sys.executable), "vermin"), "--target=3.10-", "--no-tips", "--violations"]


def python_files() -> list:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:  # not a git checkout: every .py outside the ignored folders
        return [os.path.join(d, f) for d, dirs, files in os.walk(ROOT) for f in files
                if f.endswith(".py") and not any(p in d for p in (".venv", "outputs", "data"))]
    return [os.path.join(ROOT, name) for name in listed.stdout.split() if os.path.exists(os.path.join(ROOT, name))]


def test_every_file_runs_on_python_3_10():
    files = python_files()
    assert len(files) > 20
    done = subprocess.run(VERMIN + files, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_vermin_catches_newer_python(tmp_path):
    newer = tmp_path / "newer.py"
    newer.write_text("import tomllib\n")  # Python 3.11+
    done = subprocess.run(VERMIN + [str(newer)], capture_output=True, text=True)
    assert done.returncode != 0 and "tomllib" in done.stdout


def harness_like_checkpoint(path) -> dict:
    """What the harness's state_dict.pth holds: tensors plus numpy's and python's RNG state."""
    state = {"models_state_dict": [{"w": torch.arange(6.0).reshape(2, 3)}],
             "rng_state": {"cpu_rng_state": torch.random.get_rng_state(), "np_rng_state": np.random.get_state(),
                           "random_rng_state": random.getstate()},
             "callbacks": {"byol_state": {"global_step": 3}}}
    torch.save(state, path)
    return state


def test_fallback_loader_matches_weights_only(tmp_path):
    path = tmp_path / "state_dict.pth"
    saved = harness_like_checkpoint(path)
    fallback = checkpoints.load_state(str(path), force_fallback=True)
    assert torch.equal(fallback["models_state_dict"][0]["w"], saved["models_state_dict"][0]["w"])
    assert np.array_equal(fallback["rng_state"]["np_rng_state"][1], saved["rng_state"]["np_rng_state"][1])
    assert fallback["callbacks"]["byol_state"]["global_step"] == 3
    if checkpoints.has_safe_globals():
        modern = checkpoints.load_state(str(path))
        assert torch.equal(modern["models_state_dict"][0]["w"], fallback["models_state_dict"][0]["w"])


class NotData:
    def __reduce__(self):
        return (print, ("code would run here",))


def test_fallback_loader_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": NotData()}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"refused .*\.print"):
        checkpoints.load_state(str(path), force_fallback=True)


def test_without_add_safe_globals(monkeypatch, tmp_path):
    """On torch 2.3 (no add_safe_globals) importing the trial registers nothing and readers use the
    allowlisting unpickler."""
    monkeypatch.delattr(torch.serialization, "add_safe_globals")
    assert not checkpoints.has_safe_globals()
    checkpoints.allow_harness_checkpoints()  # no AttributeError at import of model_def
    path = tmp_path / "state_dict.pth"
    harness_like_checkpoint(path)
    assert checkpoints.load_state(str(path))["callbacks"]["byol_state"]["global_step"] == 3
