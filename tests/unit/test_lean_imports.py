"""The lean half never pulls in the heavy one."""

import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "onnx")


def test_importing_runtime_loads_no_torch():
    code = ("import sys, ldm_edge.runtime, ldm_edge.runtime.pipeline, ldm_edge.runtime.cli.run; "
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


def test_precision_variants_and_bundle_tools_load_no_torch():
    # ldm-export fp16 / int8 / import-optimum run on devices without PyTorch
    code = ("import sys, ldm_edge.bundletools.files, ldm_edge.bundletools.staging, "
            "ldm_edge.bundletools.save, ldm_edge.bundletools.quality, ldm_edge.calibration.fp16, "
            "ldm_edge.calibration.int8, ldm_edge.export.optimum_import, ldm_edge.export.cli; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
