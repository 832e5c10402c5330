"""No function or method in the library's source folders is longer than MAX_FUNCTION_LINES.

Read from the source with ``ast`` (nothing is imported), so a new subpackage is covered as
soon as its files exist."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("runtime", "calibration", "bundletools", "export")
# A function that fits a screen can be read whole; STYLE.md asks for ~50 lines, and this
# leaves room for a long docstring or signature. Counted from the def line to the last line
# of the body, decorators excluded.
MAX_FUNCTION_LINES = 60


def function_lengths(path: Path) -> list[tuple[int, str, int]]:
    """(line, qualified name, length) of every function and method defined in ``path``."""
    out = []

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                out.append((child.lineno, name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "")
    return out


def source_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_the_walk_sees_the_tree():
    # guards the walker: nested packages, methods and nested functions are all seen
    files = source_files()
    assert ROOT / "runtime" / "schedulers" / "__init__.py" in files
    names = {name for line, name, n in function_lengths(ROOT / "runtime" / "bundle" / "manifest.py")}
    assert "Manifest.validate" in names


def test_the_length_counts_from_def_to_last_line(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("@decorator\ndef f():\n    x = 1\n\n    return x\n\n\n"
                   "class C:\n    def g(self):\n        def h():\n            pass\n"
                   "        return h\n")
    assert function_lengths(src) == [(2, "f", 4), (9, "C.g", 4), (10, "C.g.h", 2)]


def test_no_function_is_longer_than_the_limit():
    long = [f"{p.relative_to(ROOT)}:{line} {name} {n} lines"
            for p in source_files() for line, name, n in function_lengths(p)
            if n > MAX_FUNCTION_LINES]
    assert not long, (f"functions over {MAX_FUNCTION_LINES} lines (split them into named "
                      f"steps):\n" + "\n".join(long))
