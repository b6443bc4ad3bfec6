"""The install the README describes (Makefile, requirements*.txt, constraints.txt), checked with
``make -n`` (what make would run, nothing installed): ``make run`` installs only what running needs,
``make test`` adds the test tools, a fresh clone installs both (CI's ``make test``), every pip install
takes the exact versions of constraints.txt, and TORCH_INDEX reaches the torch/torchvision install."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(tmp_path, *args: str) -> list[str]:
    """The commands ``make -n`` would run with a venv that does not exist yet (a fresh clone)."""
    # Run from `make test` (CI), a child make inherits MAKEFLAGS/MAKELEVEL and would add its own
    # "Entering/Leaving directory" lines: the dry run is made as a person's top-level make.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    result = subprocess.run(["make", "--no-print-directory", "-n", f"VENV={tmp_path / 'venv'}", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def pip_installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " -m pip install " in line]


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[name.lower().replace("_", "-")] = version
    return found


def test_run_installs_only_what_running_needs(tmp_path):
    installs = pip_installs(dry_run(tmp_path, "run"))
    assert [line.split()[-1] for line in installs] == ["requirements.txt"]
    assert "requirements-dev.txt" not in " ".join(dry_run(tmp_path, "run"))


def test_a_fresh_clone_test_installs_both_once_each(tmp_path):
    lines = dry_run(tmp_path, "test")
    assert [line.split()[-1] for line in pip_installs(lines)] == ["requirements.txt", "requirements-dev.txt"]
    assert any(line.endswith("/.installed-run") for line in lines)
    assert any(line.endswith("/.installed-dev") for line in lines)
    assert lines[-1].endswith("-m pytest -q")


def test_every_pip_install_takes_the_constraints(tmp_path):
    installs = pip_installs(dry_run(tmp_path, "test"))
    assert installs and all("-c constraints.txt" in line for line in installs)
    assert not any("-c constraints.txt" in line for line in pip_installs(dry_run(tmp_path, "test", "CONSTRAINTS=")))


def test_torch_index_reaches_the_torch_install_only(tmp_path):
    index = "https://download.pytorch.org/whl/cpu"
    installs = pip_installs(dry_run(tmp_path, "run", f"TORCH_INDEX={index}"))
    torch_pins = sorted(line for line in (ROOT / "requirements.txt").read_text().splitlines()
                        if re.match(r"torch(vision)?==", line))
    assert len(installs) == 2 and len(torch_pins) == 2
    assert installs[0].endswith(f"--extra-index-url {index} {' '.join(torch_pins)}")
    assert index not in installs[1]
    assert not any(index in line for line in dry_run(tmp_path, "run"))


def test_constraints_pin_every_requirement_and_keep_the_pinned_torch():
    constraints = pins()
    required = requirement_names(ROOT / "requirements.txt") | requirement_names(ROOT / "requirements-dev.txt")
    assert sorted(required - set(constraints)) == []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):  # torch, torchvision, determined: the same exact version
            name, version = line.split("#")[0].strip().split("==")
            assert constraints[name.lower()] == version
    assert "scikit-learn" in constraints  # the fair probe's numbers depend on its solver
