"""The full-size export's memory path (export/release.py, export/external_data.py) on a tiny
SDXL: every component treated as large — traced small, weights gathered file to file into one
.data file, PyTorch weights parked before onnxruntime opens the graph and released after the
last component that needs them. The export's own checks (graph vs PyTorch at two shapes, the
weights map read back bit for bit from the parked weights) must all pass."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_tiny_sdxl_exports_through_the_large_path(tmp_path, monkeypatch):
    from ldm_edge.export import onnx_export, release
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(release, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(onnx_export, "LARGE_TRACE_SIZE", 64)  # below the model's 128 px
    model = load_model(save_tiny_sdxl(tmp_path / "model"))
    export_bundle(model, tmp_path / "bundle", ExportOptions())
    manifest = read_manifest_json(tmp_path / "bundle")
    for name, comp in manifest.components.items():
        files = sorted(f.path for f in comp.variants["fp32"].files)
        assert files == [f"{name}.onnx", f"{name}.onnx.data"], name
    for module in (model.unet, model.vae, model.text_encoder, model.second_encoder.text_encoder):
        assert all(p.is_meta for p in module.parameters())
    assert not [p for p in (tmp_path / "bundle").iterdir() if p.name.startswith(".")]
