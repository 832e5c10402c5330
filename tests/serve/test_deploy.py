"""deploy/: the KServe InferenceService parses and points at what `ldm-export triton` writes
(it cannot run here: no Kubernetes); the image it names is built from deploy/Dockerfile."""

from __future__ import annotations

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_inferenceservice_parses_as_a_kserve_triton_predictor():
    doc = yaml.safe_load((DEPLOY / "inferenceservice.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["protocolVersion"] == "v2"
    assert "--model-repository=/mnt/models" in model["args"]  # where KServe mounts storageUri
    assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_dockerfile_installs_ldm_edge_with_numpy_below_2():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:" in text
    assert 'pip install --no-cache-dir /src "numpy<2"' in text
