"""GPU tier: FP16 TensorRT engines built for a tiny bundle, run through the pipeline.

Skipped, with the reason printed, where TensorRT, cuda-python, Polygraphy or a CUDA GPU is
missing (this project's build and CI machines have none of them); `make gpu-check --pytest`
(benchmarks/gpu_check.py --pytest) runs it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import run_cli

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.errors import BundleError, UsageError
from ldm_edge.runtime.pipeline import Pipeline
from ldm_edge.runtime.backends.trt_engines import (TensorRTUnavailable, device_facts,
                                                   engine_dir_name)


def _why_not() -> str | None:
    try:
        device_facts()
        import polygraphy  # noqa: F401
    except TensorRTUnavailable as e:
        return str(e)
    except ImportError:
        return "Polygraphy is not installed (pip install polygraphy)"
    return None


WHY_NOT = _why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))]

# The FP16 engine against the FP32 graph in onnxruntime on the CPU, 8-bit images. 35 dB is
# Apple's ml-stable-diffusion bar for a converted model (ABSOLUTE_MIN_PSNR): below it the
# difference starts to show. FP16 in onnxruntime reaches >= 40 dB on these models
# (tests/parity/test_fp16.py); TensorRT's FP16 kernels may accumulate differently.
MIN_PSNR_DB = 35.0
STEPS = 8
SIZES = ("--min-size", "64", "--max-size", "256", "--max-batch", "2")


@pytest.fixture(scope="module")
def trt_bundle(tiny_bundles, tmp_path_factory):
    """A copy of the tiny SD1 bundle with FP16 graphs and FP16 engines for 64-256 px, 1-2 images."""
    from ldm_edge.calibration.fp16 import make_fp16

    root = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundles["sd1"], root)
    make_fp16(root, ["a red cat", "a blue square on a white background"], steps=4)
    r = run_cli("-m", "ldm_edge.export.cli", "engines", str(root), "--precision", "fp16", *SIZES,
                timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def _latents(n=1):
    return np.random.default_rng(0).standard_normal((n, 4, 16, 16), dtype=np.float32)


KW = dict(num_inference_steps=STEPS, guidance_scale=7.5, scheduler="ddim")


def test_engines_are_recorded_for_this_gpu(trt_bundle):
    m = json.loads((trt_bundle / "manifest.json").read_text())
    folder = f"engines/{engine_dir_name(device_facts())}/"
    for comp in m["components"].values():
        (rec,) = comp["engines"]
        assert rec["file"].startswith(folder) and (trt_bundle / rec["file"]).is_file()
        assert rec["precision"] in comp["variants"] and rec["backend"] == "tensorrt"
    unet = m["components"]["unet"]["engines"][0]
    assert unet["precision"] == "fp16"
    assert unet["profile"]["sample"]["max"] == [4, 4, 32, 32]  # 2 images, doubled for guidance


def test_tensorrt_fp16_matches_onnxruntime_fp32(trt_bundle):
    ref = Pipeline(trt_bundle, backend="onnxruntime", device="cpu")("a red cat", latents=_latents(),
                                                                     **KW)
    pipe = Pipeline(trt_bundle, backend="tensorrt", precision="fp16")
    out = pipe("a red cat", latents=_latents(), **KW)
    assert type(pipe.backend("unet")).__name__ == "TensorRTBackend"
    assert psnr(out.images, ref.images) >= MIN_PSNR_DB
    pipe.close()


def test_repeat_calls_and_batch_changes_give_the_same_images(trt_bundle):
    from ldm_edge.runtime.backends.tensorrt import SharedScratch

    pipe = Pipeline(trt_bundle, backend="tensorrt", precision="fp16")
    a = pipe("a red cat", latents=_latents(), **KW).images
    two = pipe(["a red cat", "a blue dog"], latents=_latents(2), **KW).images  # buffers grow
    b = pipe("a red cat", latents=_latents(), **KW).images
    np.testing.assert_array_equal(a, b)
    assert two.shape[0] == 2
    shared = SharedScratch._instance  # text encoder, U-Net, decoder: one scratch area
    contexts = [b.context for b in pipe.open_components.values()]
    assert len(contexts) == 3 and all(any(c is s for s in shared.contexts) for c in contexts)
    pipe.close()
    assert all(not any(c is s for s in shared.contexts) for c in contexts)


def test_shape_outside_the_engine_profile_is_refused(trt_bundle):
    pipe = Pipeline(trt_bundle, backend="tensorrt", precision="fp16")
    with pytest.raises(UsageError, match="outside the engine's profile.*ldm-export engines"):
        pipe("a red cat", height=512, width=512, **KW)  # exported up to 1024, engine up to 256
    pipe.close()


def test_engine_for_another_compute_capability_is_refused(trt_bundle, tmp_path):
    from ldm_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend

    b = tmp_path / "doctored"
    shutil.copytree(trt_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["components"]["unet"]["engines"][0]["compute_capability"] = "1.0"
    (b / "manifest.json").write_text(json.dumps(m))
    pipe = Pipeline(b, backend="tensorrt", precision="fp16")
    with pytest.raises(BundleError, match=r"sm10, .*ldm-export engines .* --precision fp16"):
        pipe("a red cat", latents=_latents(), **KW)
    auto = Pipeline(b, backend="auto", precision="fp16")
    assert isinstance(auto.backend("unet"), OnnxRuntimeBackend)
    assert type(auto.backend("vae_decoder")).__name__ == "TensorRTBackend"
    pipe.close()
    auto.close()


def test_ldm_run_backend_tensorrt_writes_png(trt_bundle, tmp_path):
    out = tmp_path / "trt.png"
    r = run_cli("-m", "ldm_edge.runtime", str(trt_bundle), "-p", "a red cat", "--steps", "4",
                "--backend", "tensorrt", "--precision", "fp16", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.is_file()


# The INT8 engine (built from the U-Net's TensorRT form) against that form in onnxruntime on
# the CPU without graph optimisations (calibration/trt_form.tensorrt_like: each DequantizeLinear,
# then float layers): the same quantisation, so only kernel accumulation order differs. The
# form itself is measured against FP32 when it is made (tests/parity/test_int8.py).
MIN_INT8_ENGINE_PSNR_DB = 35.0


def test_tensorrt_int8_engine_from_the_tensorrt_form(trt_bundle, tmp_path):
    from ldm_edge.calibration.int8 import make_int8
    from ldm_edge.calibration.trt_form import tensorrt_like

    b = tmp_path / "int8"
    shutil.copytree(trt_bundle, b)
    m = make_int8(b, ["a red cat", "a blue dog"], calib_steps=4, schedulers=["ddim"],
                  progress=lambda *_: None)
    assert "tensorrt" in m.components["unet"].variants["int8"].forms
    r = run_cli("-m", "ldm_edge.export.cli", "engines", str(b), "--precision", "int8",
                "--components", "unet", *SIZES, timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = Pipeline(b, precision="int8", components=tensorrt_like)("a red cat",
                                                                   latents=_latents(), **KW)
    pipe = Pipeline(b, backend="tensorrt", precision="int8")
    out = pipe("a red cat", latents=_latents(), **KW)
    assert type(pipe.backend("unet")).__name__ == "TensorRTBackend"
    assert psnr(out.images, ref.images) >= MIN_INT8_ENGINE_PSNR_DB
    pipe.close()
