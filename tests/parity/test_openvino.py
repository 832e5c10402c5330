"""The OpenVINO backend runs the same bundle and draws the same picture as onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline

pytest.importorskip("openvino", reason="OpenVINO not installed (pip install 'ldm-edge[openvino]')")

# Both run the FP32 graph in FP32 (INFERENCE_PRECISION_HINT=f32); only summation order differs.
MIN_PSNR_DB = 50.0


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_openvino_matches_onnxruntime(family, tiny_bundles):
    lat = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    kw = dict(num_inference_steps=6, guidance_scale=7.5, scheduler="euler", latents=lat)
    ort = Pipeline(tiny_bundles[family])("a red cat", **kw)
    ov = Pipeline(tiny_bundles[family], backend="openvino")("a red cat", **kw)
    assert psnr(ov.images, ort.images) >= MIN_PSNR_DB
