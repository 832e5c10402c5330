"""GPU tier: the same bundle through onnxruntime's CUDA execution provider.

Skipped, with the reason printed, where onnxruntime has no CUDA provider (this
project's build and CI machines have no GPU).
"""

from __future__ import annotations

import numpy as np
import pytest

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline

ort = pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="no CUDA execution provider in onnxruntime here "
                              "(needs a GPU and onnxruntime-gpu)"),
]

# CUDA kernels (TF32 off by default in ORT, different conv algorithms) differ from the CPU
# ones at ~1e-5; after a few steps that is still far below one 8-bit level in most pixels.
MIN_PSNR_DB = 45.0


def test_cuda_matches_cpu(tiny_bundles):
    lat = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    kw = dict(num_inference_steps=8, guidance_scale=7.5, scheduler="ddim", latents=lat)
    cpu = Pipeline(tiny_bundles["sd1"], device="cpu")("a red cat", **kw)
    gpu = Pipeline(tiny_bundles["sd1"], device="cuda")("a red cat", **kw)
    assert psnr(gpu.images, cpu.images) >= MIN_PSNR_DB
