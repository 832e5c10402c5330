"""FP16 and INT8 with ControlNets (issue #25): `ldm-export fp16` converts the ControlNets too
(each checked on its captured calls, every residual), `ldm-export int8` calibrates the U-Net on
runs with a ControlNet active (stand-in control images, bundletools/task_inputs.py) as well as
without, and both record their quality with a ControlNet active beside the plain figures
(manifest quality.<precision>.control). Tiny SD1 model, its two tiny ControlNets."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline

# The bars with a ControlNet active: FP16 >= 40 dB (an RMS error of 2.6 levels of
# 255, as tests/parity/test_fp16.py), INT8 >= 35 dB. Measured here (tiny SD1, its own PNDM
# scheduler, a VNNI CPU, quality.<precision>.control): FP16 64.0 dB, INT8 (U-Net and
# ControlNets) 46-47 dB with 7-bit weights; test_int8.py's floors sit 6-10 dB under the lowest
# measurement of either CPU kind, 35 dB sits 11 dB under.
FP16_MIN_PSNR_DB = 40.0
INT8_MIN_PSNR_DB = 35.0
# Content-independent, as tests/parity/test_int8.py (MIN_UNET_COSINE, the reasons there): the
# INT8 U-Net's output vs FP32's at every step of the FP32 trajectory, here with the
# ControlNet's residuals as inputs, and the INT8 ControlNets' residuals (all joined) on the
# same trajectory. Measured 0.9994 and 0.9987.
MIN_UNET_COSINE = 0.995
# the four default calibration prompts: runs 1 and 3 take the two ControlNets in turn
PROMPTS = ["a red cat", "a blue square on a white background", "a green tree", "a boat"]
STEPS = 4


@pytest.fixture(scope="module")
def precision_bundle(controlnet_bundle, tmp_path_factory):
    """The ControlNet bundle with FP16 then INT8 variants."""
    from ldm_edge.calibration import fp16, int8

    dst = tmp_path_factory.mktemp("cn_precision") / "bundle"
    shutil.copytree(controlnet_bundle, dst)
    fp16.make_fp16(dst, PROMPTS, steps=STEPS)
    int8.make_int8(dst, PROMPTS, calib_steps=STEPS, schedulers=["pndm"], fused_form=False,
                   progress=lambda m: None)
    return dst


def test_calibration_runs_take_each_controlnet_in_turn(controlnet_bundle):
    from ldm_edge.calibration.capture import capture_runs

    runs = capture_runs(controlnet_bundle, PROMPTS, steps=2)
    assert [sorted(k for k in r if k.startswith("controlnet/")) for r in runs] == \
        [[], ["controlnet/edges"], [], ["controlnet/depth"]]
    residual = "mid_block_residual"
    assert not np.any(runs[0]["unet"][0][residual])  # plain runs: zeros
    assert np.any(runs[1]["unet"][0][residual])  # controlled: the ControlNet's residuals


def test_fp16_converts_the_controlnets(precision_bundle):
    from ldm_edge.calibration.fp16 import FP16_MIN_COSINE

    m = open_bundle(precision_bundle)
    for name in ("controlnet/edges", "controlnet/depth"):
        v = m.schema.components[name].variants["fp16"]
        assert v.file == f"{name}.fp16.onnx" and v.parity["cosine"] >= FP16_MIN_COSINE
    q = m.schema.quality["fp16"]
    assert "controlnet/edges" not in (q.components_kept_fp32 or [])
    print(f"fp16 with control: {q.control}")
    assert q.control["psnr_db"] >= FP16_MIN_PSNR_DB
    assert q.control["controlnet_cosine_min"] >= FP16_MIN_COSINE
    assert q.control["controlnets"] == ["edges", "depth"]


def test_int8_quality_with_a_controlnet_active(precision_bundle):
    q = open_bundle(precision_bundle).schema.quality["int8"]
    print(f"int8 with control: {q.control}")
    assert q.control["psnr_db"] >= INT8_MIN_PSNR_DB
    assert q.control["unet_cosine_min"] > MIN_UNET_COSINE
    assert q.control["controlnet_cosine_min"] > MIN_UNET_COSINE


def test_int8_controlnet_graphs(precision_bundle):
    """Each ControlNet quantised on its own calibration calls, every residual checked; one
    graph TensorRT reads as it is (no INT32 DequantizeLinear, zero points 0)."""
    from ldm_edge.calibration.int8_controlnet import CONTROLNET_MIN_COSINE
    from ldm_edge.export.engines import asymmetric_qdq, check_for_tensorrt
    from ldm_edge.runtime.bundle.onnx_scan import int32_dequantize

    m = open_bundle(precision_bundle)
    for name in ("controlnet/edges", "controlnet/depth"):
        v = m.schema.components[name].variants["int8"]
        assert v.file == f"{name}.int8.onnx" and v.quantized_nodes
        assert v.parity["cosine"] >= CONTROLNET_MIN_COSINE, v.parity
        path = m.variant(name, "int8").path
        assert int32_dequantize(path) == [] and asymmetric_qdq(path) == 0
        check_for_tensorrt(name, "int8", path)
        assert m.tensorrt_source(name, "int8")[0] == path


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_runs_with_control_at_each_precision(precision, precision_bundle, tmp_path):
    """`--precision P --control`: the ControlNet's graph of that precision runs, the picture
    within the bar of FP32's."""
    from PIL import Image

    png = tmp_path / "control.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 48, 3), np.uint8)).save(png)
    kw = dict(num_inference_steps=STEPS, seed=0, control=[f"edges:{png}:0.9"])
    ref = Pipeline(precision_bundle)
    var = Pipeline(precision_bundle, precision=precision)
    a = ref(request=ref.request(prompt="a red cat", **kw)).images
    b = var(request=var.request(prompt="a red cat", **kw)).images
    assert var.backend("controlnet/edges").precision == precision
    floor = FP16_MIN_PSNR_DB if precision == "fp16" else INT8_MIN_PSNR_DB
    assert psnr(b, a) >= floor, psnr(b, a)
