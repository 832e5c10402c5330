"""GPU tier: LoRA refitted into real TensorRT engines (``ldm-export engines --refittable``).

Skipped, with the reason printed, where TensorRT, cuda-python, Polygraphy or a CUDA GPU is
missing — so far every machine this project has run on: these tests have not run yet. The
same paths run against fakes in tests/unit/test_tensorrt_lora.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from helpers import run_cli

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline
from ldm_edge.runtime.lora.safetensors_read import write_safetensors

from test_tensorrt import KW, MIN_PSNR_DB, SIZES, WHY_NOT, _latents  # noqa: F401

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

MODULES = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
           "mid_block.attentions.0.transformer_blocks.0.ff.net.2")


def _lora(path, seed: int, bundle):
    """A kohya-layout LoRA of the tiny SD1 model's layers above, shapes from the weights map."""
    import json

    params = json.loads((bundle / "unet.weights-map.json").read_text())["params"]
    rng = np.random.default_rng(seed)
    t = {}
    for m in MODULES:
        out, inp = params[f"{m}.weight"]["shape"][:2]
        stem = "lora_unet_" + m.replace(".", "_")
        t[f"{stem}.lora_down.weight"] = rng.standard_normal((4, inp), dtype=np.float32)
        t[f"{stem}.lora_up.weight"] = rng.standard_normal((out, 4), dtype=np.float32)
    write_safetensors(path, t)
    return path


@pytest.fixture(scope="module")
def refit_bundle(tiny_bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt-lora") / "bundle"
    shutil.copytree(tiny_bundles["sd1"], root)
    r = run_cli("-m", "ldm_edge.export.cli", "engines", str(root), "--precision", "fp32",
                "--refittable", *SIZES, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def test_refitted_engine_draws_the_onnxruntime_lora_picture(refit_bundle, tmp_path):
    lora = [(_lora(tmp_path / "a.safetensors", 1, refit_bundle), 0.8)]
    ref = Pipeline(refit_bundle, backend="onnxruntime", device="cpu", loras=lora)(
        "a red cat", latents=_latents(), **KW).images
    base = Pipeline(refit_bundle, backend="onnxruntime", device="cpu")(
        "a red cat", latents=_latents(), **KW).images
    pipe = Pipeline(refit_bundle, backend="tensorrt", loras=lora)
    out = pipe("a red cat", latents=_latents(), **KW).images
    assert type(pipe.backend("unet")).__name__ == "TensorRTBackend"
    assert psnr(out, ref) >= MIN_PSNR_DB and psnr(base, ref) < MIN_PSNR_DB
    pipe.close()


def test_switching_refits_from_the_base(refit_bundle, tmp_path):
    a = [(_lora(tmp_path / "a.safetensors", 1, refit_bundle), 0.8)]
    b = [(_lora(tmp_path / "b.safetensors", 2, refit_bundle), 0.8)]
    pipe = Pipeline(refit_bundle, backend="tensorrt")
    base = pipe("a red cat", latents=_latents(), **KW).images
    pipe.set_loras(a)
    first = pipe("a red cat", latents=_latents(), **KW).images
    pipe.set_loras(b)
    pipe("a red cat", latents=_latents(), **KW)
    pipe.set_loras(a)
    np.testing.assert_array_equal(pipe("a red cat", latents=_latents(), **KW).images, first)
    pipe.set_loras([])
    np.testing.assert_array_equal(pipe("a red cat", latents=_latents(), **KW).images, base)
    pipe.close()
