"""Shared fixtures: tiny random SD1/SD2 models (built here, nothing downloaded) and their bundles.

Tiers are folders (unit/, parity/, cli/, gpu/, serve/, rtx/) and markers (parity, cli, gpu,
serve, rtx, slow). rtx/: a real TensorRT-RTX parser and builder on the CPU (docs/tensorrt.md).
GPU tests are skipped on machines without CUDA/TensorRT, with the reason printed (-ra).
"""

from __future__ import annotations

import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

# Tiny models gain nothing from threads, and on a shared 2-core machine torch's OpenMP
# workers spinning against onnxruntime's pool made one parity test 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the manifest reader's hash cache: one per test run, never the user's
os.environ["LDM_EDGE_CACHE"] = tempfile.mkdtemp(prefix="ldm-edge-cache-")
# onnxruntime's optimised-graph cache is on by default for users; a test run opens thousands
# of throwaway graphs: off here, on in the tests of the cache itself (tests/parity/test_ort_cache.py)
os.environ["LDM_EDGE_ORT_CACHE"] = "0"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "cli"))

FAMILIES = ("sd1", "sd2")

# defined in helpers (a module no other file shadows: each tier's conftest.py is imported as
# `conftest`), kept importable from here for the tests that take them from conftest
from helpers import EXPORT_MODULES, TorchNoise, need_export_extra  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("parity", "cli", "gpu", "serve", "rtx"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    need_export_extra()
    from ldm_edge.export.tiny import save_tiny

    root = tmp_path_factory.mktemp("models")
    return {fam: save_tiny(root / f"tiny_{fam}", fam, seed=0) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_models, tmp_path_factory) -> dict[str, Path]:
    return _export_all(tiny_models, tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def controlnet_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Two tiny ControlNets for the tiny SD1 model, "edges" and "depth", their zero convs
    randomised (export/tiny_controlnet.py: diffusers' zeros would prove nothing)."""
    from ldm_edge.export.tiny_controlnet import save_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {name: save_tiny_controlnet(root / name, tiny_models["sd1"], seed=i + 1)
            for i, name in enumerate(("edges", "depth"))}


@pytest.fixture(scope="session")
def controlnet_bundle(tiny_models, controlnet_models, tmp_path_factory) -> Path:
    """The tiny SD1 model exported with both ControlNets (its U-Net takes their residuals)."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    out = tmp_path_factory.mktemp("controlnet_bundle") / "bundle"
    nets = tuple(str(p) for p in controlnet_models.values())
    export_bundle(load_model(tiny_models["sd1"]), out, ExportOptions(controlnets=nets))
    return out


def _export_all(models: dict[str, Path], root: Path) -> dict[str, Path]:
    """Each model folder exported (default options) to ``root/bundle_<key>``."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    out = {}
    for key, path in models.items():
        out[key] = root / f"bundle_{key}"
        export_bundle(load_model(path), out[key], ExportOptions())
    return out


@pytest.fixture(scope="session")
def ldm_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models in the LDM paper's layouts (export/tiny.py LDM_FAMILIES) and an
    SD inpainting one (key "inpaint") and an SD x4 upscaler (key "upscale")."""
    need_export_extra()
    from ldm_edge.export.tiny import (LDM_FAMILIES, save_tiny_inpaint, save_tiny_ldm,
                                      save_tiny_upscale)

    root = tmp_path_factory.mktemp("ldm_models")
    out = {fam: save_tiny_ldm(root / fam, fam, seed=0) for fam in LDM_FAMILIES}
    out["inpaint"] = save_tiny_inpaint(root / "inpaint", seed=0)
    out["upscale"] = save_tiny_upscale(root / "upscale", seed=0)
    return out


@pytest.fixture(scope="session")
def ldm_bundles(ldm_models, tmp_path_factory) -> dict[str, Path]:
    return _export_all(ldm_models, tmp_path_factory.mktemp("ldm_bundles"))


@pytest.fixture(scope="session")
def taesd_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A tiny random TAESD (AutoencoderTiny folder, key "taesd") and the tiny SD1 pipeline
    with it as its only VAE (key "only")."""
    from ldm_edge.export.tiny import save_tiny_taesd, save_tiny_with_taesd

    root = tmp_path_factory.mktemp("taesd")
    return {"taesd": save_tiny_taesd(root / "taesd", seed=0),
            "only": save_tiny_with_taesd(root / "tiny_sd1_taesd", seed=0)}


@pytest.fixture(scope="session")
def taesd_bundles(tiny_models, taesd_models, tmp_path_factory) -> dict[str, Path]:
    """"beside": the tiny SD1 model exported with `--tiny-vae` (both VAEs); "only": the model
    whose vae/ is the AutoencoderTiny (the tiny VAE alone)."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import attach_tiny_vae, load_model

    root = tmp_path_factory.mktemp("taesd_bundles")
    beside = attach_tiny_vae(load_model(tiny_models["sd1"]), taesd_models["taesd"])
    export_bundle(beside, root / "beside", ExportOptions())
    export_bundle(load_model(taesd_models["only"]), root / "only", ExportOptions())
    return {"beside": root / "beside", "only": root / "only"}


@pytest.fixture
def bundle(tiny_bundles, tmp_path):
    """A private copy of the tiny SD1 bundle, for commands that add to it."""
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], b)
    return b


class FakeTensorRTEnvironment:
    """A TensorRT environment made of the parts a test gives; any other part is refused as
    missing, so a test never reaches this machine's real TensorRT, CUDA or Polygraphy."""

    def __init__(self, *, facts=None, tensorrt=None, cudart=None, polygraphy=None):
        self.parts = {"facts": facts, "tensorrt": tensorrt, "cudart": cudart,
                      "polygraphy": polygraphy}

    def _part(self, name):
        from ldm_edge.runtime.backends.trt_engines import TensorRTUnavailable

        part = self.parts[name]
        if part is None:
            raise TensorRTUnavailable(f"this test's fake TensorRT environment has no {name}")
        return part() if isinstance(part, types.FunctionType) else part

    def tensorrt(self):
        return self._part("tensorrt")

    def cudart(self):
        return self._part("cudart")

    def polygraphy(self):
        return self._part("polygraphy")

    def facts(self, device: int = 0):
        return self._part("facts")


@pytest.fixture
def fake_trt():
    """``fake_trt(facts=..., tensorrt=..., cudart=..., polygraphy=...)`` installs one fake
    TensorRT environment for this test (every module sees it); the real one comes back after.
    A part given as a function is called on each ask (e.g. to raise)."""
    from ldm_edge.runtime.backends import trt_engines

    previous = trt_engines.environment()

    def install(**parts):
        env = FakeTensorRTEnvironment(**parts)
        trt_engines.set_environment(env)
        return env

    yield install
    trt_engines.set_environment(previous)


@pytest.fixture(scope="session")
def control_png(tmp_path_factory):
    """A control image for the ControlNet parity tests: a blocky picture of another size and
    shape than the output (so it is resized)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("control") / "control.png"
    Image.fromarray(blocks).resize((96, 80), Image.Resampling.NEAREST).save(path)
    return path
