"""GPU tier: the repository's onnxruntime components loaded by a full tritonserver (NVIDIA's
container: `tritonserver` on PATH with the onnxruntime backend, a GPU, ldm-edge installed).

Skipped, with the reason printed, everywhere else: this machine's only Triton is the
nvidia-pytriton wheel's, which has the Python backend alone (tests/serve covers that).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline
from ldm_edge.runtime.remote import generate, request_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serve_helpers import free_ports  # noqa: E402


def _full_triton() -> str | None:
    binary = shutil.which("tritonserver")
    if binary is None:
        return "no tritonserver on PATH (NVIDIA's Triton container has one)"
    if not (Path(binary).resolve().parent.parent / "backends" / "onnxruntime").is_dir():
        return "the tritonserver on PATH has no onnxruntime backend"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_full_triton() is not None,
                                                  reason=str(_full_triton()))]
# The server's onnxruntime backend runs the components on the GPU (KIND_GPU); CUDA kernels
# differ from the CPU's at ~1e-5, far below one 8-bit level in most pixels after 8 steps.
MIN_PSNR_DB = 45.0


@pytest.mark.parametrize("components", ["onnxruntime"])
def test_container_serves_the_local_picture(components, tiny_bundles, tmp_path):
    from ldm_edge.serve.repository import write_repository
    from ldm_edge.serve.server import TritonServer, find_triton

    repo = write_repository(tiny_bundles["sd1"], tmp_path / "repo", components=components)
    http, grpc, metrics = free_ports(3)
    with TritonServer(find_triton(), repo, http_port=http, grpc_port=grpc,
                      metrics_port=metrics, log_path=tmp_path / "triton.log") as server:
        served = generate(server.http_url, request_inputs(prompts=["a red cat"], seed=3,
                                                          steps=8, scheduler="ddim"))
    local = Pipeline(tiny_bundles["sd1"])("a red cat", num_inference_steps=8, seed=3,
                                          scheduler="ddim")
    assert served.images.dtype == np.uint8
    assert psnr(served.images, local.images) >= MIN_PSNR_DB
