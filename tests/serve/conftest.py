"""The serving tier: a real tritonserver from the serving venv (``make serve-venv``: numpy<2,
nvidia-pytriton, tritonclient). The venv is made here when missing; only where it cannot be
made do these tests skip, with the reason printed (-ra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# making the venv downloads ~60 MB of wheels and installs them
MAKE_VENV_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def serve_venv() -> Path:
    venv = Path(os.environ.get("LDM_EDGE_SERVE_VENV") or ROOT / ".venv-serve")
    if not (venv / ".installed").exists():
        try:
            r = subprocess.run(["make", "-C", str(ROOT), "serve-venv", f"PY={sys.executable}"]
                               if not venv.exists() else ["make", "-C", str(ROOT), "serve-venv"],
                               capture_output=True, text=True, timeout=MAKE_VENV_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot make the serving venv ({e}); run `make serve-venv`")
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["?"])[-1]
            pytest.skip(f"cannot make the serving venv with `make serve-venv`: {last}")
    return venv


@pytest.fixture(autouse=True)
def local_runs_prepack_like_the_server(monkeypatch):
    """The server's pipeline is long-lived and pre-packs every graph; a local one-shot
    ``ldm-run`` skips pre-packing its few-call float graphs, which moves float rounding
    (runtime/backends/prepack.py). The served-vs-local byte-for-byte checks compare like with
    like: the local runs here pre-pack too."""
    monkeypatch.setenv("LDM_EDGE_ORT_PREPACK", "1")


@pytest.fixture(scope="session")
def served_files(tmp_path_factory) -> dict[str, str]:
    """The files the served bad-input rows name by placeholder (served_bad_inputs.py)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("served_files")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "init.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(d / "mask.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / "low.png")
    (d / "notimage.png").write_text("hello")
    return {"INIT": str(d / "init.png"), "MASK": str(d / "mask.png"),
            "LOW": str(d / "low.png"), "NOTIMAGE": str(d / "notimage.png"),
            "EDGES_INIT": f"edges:{d / 'init.png'}"}
