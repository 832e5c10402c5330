"""The pipeline's public seam and the task plans' house rules, read from the source:

* nothing outside runtime/pipeline.py reaches the Pipeline's underscored names (its private
  methods are not an extension API: renaming one must not silently turn calibration capture
  into a no-op); subclasses do not override them;
* no task name is compared outside the task plans (runtime/tasks/): code asks the plan;
* the pipeline's stages and its denoise loop name no task and no family.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from ldm_edge.runtime import pipeline as pipeline_module
from ldm_edge.runtime.pipeline import Pipeline
from ldm_edge.runtime.tasks import PLANS, VARIANTS

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("runtime", "bundletools", "calibration", "export", "serve", "benchmarks", "demo",
               "tests")
# where a task's name may be compared: the plans and their registry
TASK_HOME = ROOT / "runtime" / "tasks"
TASK_CONSTANTS = {"TEXT_TO_IMAGE", "UNCONDITIONAL", "INPAINT", "SUPER_RESOLUTION", "UPSCALE"}
TASK_NAMES = set(PLANS) | set(VARIANTS)
FAMILY_WORDS = ("sd1", "sd2", "ldm-bert", "ldm-uncond", "ldm-sr", "family")


def _files(dirs=SOURCE_DIRS):
    for d in dirs:
        yield from sorted((ROOT / d).rglob("*.py"))


def private_names() -> set[str]:
    """The Pipeline's own underscored attributes: methods and ``self._x`` assignments."""
    tree = ast.parse(inspect.getsource(Pipeline))
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def private_uses(path: Path, private: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [f"{path.relative_to(ROOT)}:{n.lineno} .{n.attr}" for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and n.attr in private]
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        if any(getattr(b, "id", getattr(b, "attr", None)) == "Pipeline" for b in cls.bases):
            found += [f"{path.relative_to(ROOT)}:{f.lineno} {cls.name}.{f.name} overrides it"
                      for f in cls.body if isinstance(f, ast.FunctionDef) and f.name in private]
    return found


def test_the_private_names_are_found():
    """The scan below sees what it must refuse (else it proves nothing)."""
    private = private_names()
    assert {"_run_stages", "_denoise", "_backends", "_loras", "_hooks"} <= private
    assert "_backends" not in {"call_component", "add_call_hook"}
    bad = ROOT / "tests" / "unit" / "data" / "_seam_probe.py"
    try:
        bad.write_text("class P(Pipeline):\n    def _denoise(self):\n        return x._loras\n")
        assert len(private_uses(bad, private)) == 2
    finally:
        bad.unlink()


def test_nothing_outside_the_pipeline_reaches_its_private_names():
    private = private_names()
    mine = Path(pipeline_module.__file__).resolve()
    found = [u for p in _files() if p.resolve() != mine for u in private_uses(p, private)]
    assert not found, ("the Pipeline's private names used outside runtime/pipeline.py (use "
                       "call_component, add_call_hook, components=, open_components, loras):\n"
                       + "\n".join(found))


def task_comparisons(path: Path, root: Path = ROOT) -> list[str]:
    """Comparisons (==, !=, in, not in) with a task's name or its constant."""
    def names_task(node) -> bool:
        if isinstance(node, ast.Constant) and node.value in TASK_NAMES:
            return True
        if isinstance(node, (ast.Name, ast.Attribute)):
            return getattr(node, "id", getattr(node, "attr", None)) in TASK_CONSTANTS
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(names_task(e) for e in node.elts)
        return False

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(root)}:{n.lineno}" for n in ast.walk(tree)
            if isinstance(n, ast.Compare) and any(names_task(x) for x in [n.left, *n.comparators])]


def test_no_task_name_is_compared_outside_the_task_plans(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("if task == 'inpaint' or t in (UPSCALE, 'x'):\n    pass\n")
    assert len(task_comparisons(probe, tmp_path)) == 2  # the scan sees what it refuses
    found = [c for p in _files(("runtime", "bundletools", "calibration", "export", "serve"))
             if TASK_HOME not in p.parents for c in task_comparisons(p)]
    assert not found, ("a task name compared outside runtime/tasks/ (ask the task's plan "
                       "instead):\n" + "\n".join(found))


def test_the_stages_and_the_loop_name_no_task_or_family():
    for name in ("_run_stages", "_denoise", "_unet"):  # by name: this file uses none of them
        code = inspect.getsource(getattr(Pipeline, name)).split('"""')[-1]  # past the docstring
        words = [w for w in (*TASK_NAMES, *TASK_CONSTANTS, *FAMILY_WORDS, "mask",
                             "noise_level", "init_image") if w in code]
        assert not words, f"Pipeline.{name} names {words}"
