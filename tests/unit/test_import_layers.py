"""The layers of ldm_edge, read from the source (every import, at module level or inside a
function): no import cycle between modules, and each layer imports only those below it.

    runtime (torch-free) <- bundletools (torch-free) <- calibration, export (torch), serve

Only export/cli.py (the ``ldm-export`` command) may import calibration/, to register the
``fp16`` and ``int8`` subcommands.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A layer may import itself, the root package (``ldm_edge.__version__``) and these.
MAY_IMPORT = {
    "runtime": set(),
    "bundletools": {"runtime"},
    "calibration": {"runtime", "bundletools"},
    "export": {"runtime", "bundletools", "demo"},
    "serve": {"runtime", "bundletools"},
}
CLI_MAY_ALSO_IMPORT = {"ldm_edge.export.cli": {"calibration", "serve"}}

def module_files() -> dict[str, Path]:
    """Module name -> source file, for every package pyproject.toml maps."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for package in setup["packages"]:
        folder = ROOT / setup["package-dir"][package]
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The ldm_edge modules ``name`` imports, resolved to modules in ``known``."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [resolve(a.name) for a in node.names if a.name.startswith("ldm_edge")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            if not full.startswith("ldm_edge"):
                continue
            targets = [f"{full}.{a.name}" if f"{full}.{a.name}" in known else resolve(full)
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or not."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def one_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """A path a -> b -> ... -> a through ``group``, to name in the failure."""
    members, start = set(group), group[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [m for m in nxt if m == start]
        if back and len(path) > 1:
            return path + [start]
        fresh = [m for m in nxt if m not in seen]
        if not fresh:  # only old members ahead: close the loop at the first one met again
            m = nxt[0]
            return path[path.index(m):] + [m]
        path.append(fresh[0])
        seen.add(fresh[0])


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = import_graph()


def test_the_walk_sees_the_tree():
    # guards the walker itself: known edges of each kind (relative, absolute, in a function)
    assert "ldm_edge.bundletools.files" in GRAPH["ldm_edge.calibration.int8"]
    assert "ldm_edge.calibration.qdq" in GRAPH["ldm_edge.calibration.int8"]  # from . import qdq
    assert "ldm_edge.calibration.fp16" in GRAPH["ldm_edge.export.cli"]  # inside a function
    assert "ldm_edge.runtime.backends.sessions" in GRAPH["ldm_edge.runtime.backends.onnxruntime"]
    assert len(GRAPH) > 60


def test_no_import_cycles():
    cycles = [one_cycle(GRAPH, g) for g in strongly_connected(GRAPH)]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_layer_imports_only_the_layers_below(layer):
    wrong = []
    for module, targets in sorted(GRAPH.items()):
        if layer_of(module) != layer:
            continue
        allowed = MAY_IMPORT[layer] | CLI_MAY_ALSO_IMPORT.get(module, set()) | {layer, ""}
        wrong += [f"{module} imports {t}" for t in sorted(targets) if layer_of(t) not in allowed]
    assert not wrong, "\n".join(wrong)
