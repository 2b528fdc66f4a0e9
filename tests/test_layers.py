"""The package's import graph follows the process diagram: each layer imports only the layers below.

    frontend ──> engine_core ──> ipc ──> config, gguf_metadata, lora, sampling_params, seeds
        └──────────────────────> gpu_worker ──> kernels

Imports inside functions count too: a lazy import is still a dependency. Nor do imports go round in a
cycle.
"""

import ast
import functools
import pathlib
import subprocess
import sys
from collections.abc import Collection

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent

# Each layer and the layers it may import (besides itself).
ALLOWED = {
    "base": set(),
    "kernels": set(),
    "ipc": {"base"},
    "gpu_worker": {"base", "ipc", "kernels"},
    "engine_core": {"base", "ipc"},
    "frontend": {"base", "ipc", "engine_core"},
    "tools": {"base", "ipc", "kernels", "gpu_worker", "engine_core", "frontend", "tools"},
}
BASE_MODULES = {"config", "gguf_metadata", "lora", "sampling_params", "seeds", "__init__"}


def layer_of(module: str) -> str:
    """`conveyor.engine_core.scheduler` -> "engine_core"; the root's own modules are "base"."""
    top = module.split(".")[1] if "." in module else "__init__"
    if top in BASE_MODULES:
        return "base"
    assert top in ALLOWED, f"{module} is in no layer: add its package to ALLOWED"
    return top


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(("conveyor",) + parts)


def imported_modules(path: pathlib.Path, modules: Collection[str]) -> set[str]:
    """Every `conveyor.*` module the file imports, at module level or inside a function;
    `from conveyor.frontend import launcher` imports the package and its module `launcher`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(name for alias in node.names if (name := f"{node.module}.{alias.name}") in modules)
    return {name for name in found if name == "conveyor" or name.startswith("conveyor.")}


def package_files() -> list[pathlib.Path]:
    def ours(path: pathlib.Path) -> bool:  # not tests, examples, builds, nor a virtualenv or .git
        parts = path.relative_to(PACKAGE).parts
        return not ({"tests", "examples", "build"} & set(parts) or any(
            part.startswith(".") or "venv" in part for part in parts))

    return sorted(p for p in PACKAGE.rglob("*.py") if ours(p))


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in package_files()}
    return {module: imported_modules(path, files) - {"conveyor"} for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `graph`: its modules in import order, the first repeated at the end; None if it has none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if cycle := visit(target):
                return cycle
        path.pop()
        done.add(module)
        return None

    return next((cycle for module in sorted(graph) if (cycle := visit(module))), None)


def test_package_files_are_found():
    graph = import_graph()
    assert "conveyor.engine_core.scheduler" in graph
    assert "conveyor.sampling_params" in graph["conveyor.ipc.messages"]


@pytest.mark.parametrize("module", sorted(import_graph()))
def test_no_module_imports_a_higher_layer(module):
    own = layer_of(module)
    upward = sorted(target for target in import_graph()[module]
                    if layer_of(target) != own and layer_of(target) not in ALLOWED[own])
    assert not upward, f"{module} ({own}) imports a higher layer: {upward}"


def test_base_modules_import_no_layer():
    for module, targets in import_graph().items():
        if layer_of(module) == "base" and module != "conveyor":
            assert {layer_of(t) for t in targets} <= {"base"}, (module, targets)


def test_an_import_of_a_module_from_its_package_counts():
    assert "conveyor.frontend.launcher" in import_graph()["conveyor.frontend.cli"]


def test_find_cycle_names_the_modules_of_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": set()}
    assert find_cycle(graph) == ["b", "c", "b"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_package_imports_have_no_cycle():
    """Nor through imports inside functions: a module that needs a lazy import to break a cycle
    belongs elsewhere."""
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_a_checkout_on_sys_path_shadows_no_distribution():
    """Run from a checkout, the package's own directory is on sys.path; importing `conveyor` takes it
    off, so `kernels` (Hugging Face's, which transformers imports) is not Conveyor's subpackage."""
    probe = (
        "import importlib.util, conveyor; "
        "spec = importlib.util.find_spec('kernels'); "
        "print(spec.origin if spec else None)"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], cwd=PACKAGE, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert not found.startswith(str(PACKAGE)), found
