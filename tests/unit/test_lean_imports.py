"""The lean half never pulls in the heavy one."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "onnx")


def test_importing_runtime_loads_no_torch():
    code = ("import sys, ldm_edge.runtime, ldm_edge.runtime.pipeline, ldm_edge.runtime.cli; "
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_engine_building_needs_no_torch():
    # engines are built on devices (Jetsons) without PyTorch
    code = ("import sys, ldm_edge.export.engines, ldm_edge.bundletools.files; "
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
