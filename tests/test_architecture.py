"""The project's own imports run one way (docs/architecture.md), and the code passes the lint.

* the top level holds the design card's files; the machinery is in one package, ``runtime``;
* no import cycle; ``runtime`` never imports an entry file;
* every module sits in one layer of :data:`LAYERS` and imports only from its own layer or below;
* a project import inside a function carries a comment saying why (an optional heavy dependency);
* the README's file table and docs/architecture.md name every module;
* ``ruff check`` (configured in pyproject.toml) passes.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "runtime"
ENTRY_FILES = ("model_def", "evaluate_result", "generate_blob_list")
DESIGN_CARD = ("augment", "backbone", "byol", "data", "evaluate_result", "generate_blob_list", "model_def", "optim",
               "reducers", "utils")

# The layers of docs/architecture.md, lowest first: a module may import from its own layer and the
# layers below it, never from a layer above.
LAYERS = (
    ("foundation", ("utils", "optim", "reducers", "runtime.cli", "runtime.progress", "runtime.sampling",
                    "runtime.stops", "runtime.nonfinite", "runtime.performance", "runtime.replicas",
                    "runtime.sync_batchnorm", "runtime.plots")),
    ("method", ("augment", "backbone", "byol")),
    ("data", ("data", "runtime.jpeg_decode", "runtime.gcs_client", "runtime.gcs", "runtime.preflight")),
    ("heads, checkpoints and faults", ("runtime.classifier", "runtime.knn", "runtime.checkpoints", "runtime.faults")),
    ("settings and pipelines", ("runtime.settings", "runtime.loaders")),
    ("evaluation", ("runtime.linear_eval", "runtime.feature_probes")),
    ("launching", ("runtime.launch",)),
    ("entry files", ENTRY_FILES),
)
LAYER_OF = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}


def project_modules() -> dict[str, Path]:
    modules = {path.stem: path for path in sorted(ROOT.glob("*.py"))}
    modules.update({f"{PACKAGE}.{path.stem}": path for path in sorted((ROOT / PACKAGE).glob("*.py"))
                    if path.stem != "__init__"})
    return modules


MODULES = project_modules()


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(project module, line, inside a function)`` for each import of a project module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                targets = {alias.name for alias in child.names}
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(name.split(".")[:-child.level] + ([base] if base else []))
                targets = {base} | {f"{base}.{alias.name}" for alias in child.names}
            else:
                targets = set()
            for target in sorted(t for t in targets if t in MODULES and t != name):
                found.append((target, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_top_level_is_the_design_card_and_the_machinery_one_package():
    top = sorted(name for name in MODULES if "." not in name)
    assert top == sorted(DESIGN_CARD), ("top-level modules beyond the design card belong in runtime/ "
                                        f"(docs/architecture.md): {sorted(set(top) - set(DESIGN_CARD))}")
    assert (ROOT / PACKAGE / "__init__.py").is_file()


def test_every_module_has_a_layer():
    assert sorted(set(MODULES) - set(LAYER_OF)) == [], "place new modules in LAYERS and docs/architecture.md"
    assert sorted(set(LAYER_OF) - set(MODULES)) == [], "LAYERS names modules that do not exist"


def test_no_import_cycle():
    edges = {name: sorted({target for target, _, _ in found}) for name, found in GRAPH.items()}
    state: dict[str, str] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in edges[node]:
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                walk(target, trail + [target])
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            walk(name, [name])


def test_imports_never_go_up_a_layer():
    upward = [f"{name}:{line} imports {target} ({LAYERS[LAYER_OF[target]][0]} is above {LAYERS[LAYER_OF[name]][0]})"
              for name, found in GRAPH.items() for target, line, _ in found
              if LAYER_OF.get(target, 0) > LAYER_OF.get(name, len(LAYERS))]
    assert upward == []


def test_the_package_never_imports_an_entry_file():
    upward = [(name, target, line) for name, found in GRAPH.items() if name.startswith(PACKAGE + ".")
              for target, line, _ in found if target in ENTRY_FILES]
    assert upward == [], f"the {PACKAGE} package imports entry files (pass what it needs down instead): {upward}"


def test_project_imports_inside_functions_say_why():
    unexplained = []
    for name, found in GRAPH.items():
        lines = MODULES[name].read_text().splitlines()
        for target, line, in_function in found:
            text, above = lines[line - 1], lines[line - 2].strip() if line > 1 else ""
            if in_function and "#" not in text and not above.startswith("#"):
                unexplained.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert unexplained == [], "import at the top, or say why not in a comment: " + "; ".join(unexplained)


def test_readme_and_architecture_doc_name_every_module():
    readme = (ROOT / "README.md").read_text()
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    for path in MODULES.values():
        file = str(path.relative_to(ROOT))
        assert f"`{file}`" in readme or f"`{path.name}`" in readme, f"README's file table misses {file}"
        assert path.name in architecture, f"docs/architecture.md misses {file}"


def test_lint_passes():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: pip install -r requirements-dev.txt"
    result = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check (pyproject.toml) failed:\n{result.stdout[-4000:]}{result.stderr}"
