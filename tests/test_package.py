"""The method is installable: ``pip install .`` into a fresh virtual environment installs the
method modules (pyproject.toml ``py-modules``), and the README's library example runs from another
directory against the installed copy, not this folder.

No network: the fresh venv sees this environment's packages (torch, setuptools, pip) through a
``.pth`` file, and pip installs with ``--no-deps --no-build-isolation --no-index``; the declared
dependencies are checked against the method's imports instead."""
from __future__ import annotations

import ast
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pyproject_list(key: str) -> list[str]:
    """A one-line string list of pyproject.toml (tomllib is Python >= 3.11; the code supports 3.10)."""
    line = re.search(rf"^{key} = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    return re.findall(r'"([^"]+)"', line)


def readme_library_example() -> str:
    """The python block of the README's "Using the method as a library" section."""
    section = (ROOT / "README.md").read_text().split("## Using the method as a library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_installed_modules_import_only_each_other_and_declared_dependencies():
    """What ``py-modules`` installs is closed under its own imports, and every third-party import is
    a declared dependency (so an install with dependencies is complete)."""
    modules = set(pyproject_list("py-modules"))
    declared = {re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0].lower() for dep in pyproject_list("dependencies")}
    import_names = {"pillow": "PIL"}
    allowed = {import_names.get(name, name) for name in declared}
    for module in sorted(modules):
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "__future__":
                    continue
                assert top in modules or top in allowed, f"{module}.py imports {name}, neither installed nor declared"


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_and_the_readme_example_runs_elsewhere(tmp_path):
    source = tmp_path / "source"  # a copy: the in-tree build writes build/ and *.egg-info
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "data", "outputs", "runs", "checkpoints", "build", "*.egg-info", "__pycache__",
        ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    # This environment's packages (torch, pip, setuptools), visible after the fresh site-packages.
    Path(fresh_site, "shared-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                "--no-index", "."], cwd=source, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    on_disk = sorted(p.name for p in Path(fresh_site).iterdir() if p.suffix == ".py")
    assert on_disk == sorted(f"{m}.py" for m in pyproject_list("py-modules"))
    assert not Path(fresh_site, "runtime").exists() and not Path(fresh_site, "model_def.py").exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = elsewhere / "example.py"
    script.write_text("import byol, sys\nprint('FROM', byol.__file__)\n" + readme_library_example())
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    ran = subprocess.run([str(python), str(script)], cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    assert f"FROM {os.path.join(fresh_site, 'byol.py')}" in ran.stdout
    assert (elsewhere / "improved-net.pt").stat().st_size > 1_000_000
