"""Today's exporter writes the manifest the exporter wrote before the typed schema
(tests/unit/data/manifest_v1_sd1.json, same tiny model), and the bundle opens."""

from __future__ import annotations

import json
from pathlib import Path

from ldm_edge.runtime.bundle.opener import open_bundle

OLD = Path(__file__).parent.parent / "unit" / "data" / "manifest_v1_sd1.json"
# what differs between two exports of the same model: hashes, sizes, times, versions, parity
VOLATILE = {"sha256", "size", "created", "producer", "parity", "source"}
# keys added since the fixture was written, each by a later change (the only differences
# allowed): the onnxruntime forms of a variant's graph (fused attention), and the weights
# map of the U-Net and text encoder (LoRA)
ADDED = {"forms", "weights_map"}


def shape(v, key=None):
    """The manifest with volatile values blanked, keeping every key and list length."""
    if key in VOLATILE:
        return "*"
    if isinstance(v, dict):
        return {k: shape(x, k) for k, x in v.items() if k not in ADDED}
    if isinstance(v, list):
        return [shape(x) for x in v]
    return v


def test_export_writes_the_old_manifest_and_it_opens(tiny_bundles):
    m = open_bundle(tiny_bundles["sd1"])
    written = json.loads((tiny_bundles["sd1"] / "manifest.json").read_text())
    assert list(written) == list(json.loads(OLD.read_text()))  # same keys, same order
    assert shape(written) == shape(json.loads(OLD.read_text()))
    assert m.schema.to_json() == written
    assert "ort-mha" in written["components"]["unet"]["variants"]["fp32"]["forms"]
    assert written["components"]["unet"]["weights_map"]["path"] == "unet.weights-map.json"
    assert m.variant("unet", "fp32").record.sha256 == written["components"]["unet"]["variants"][
        "fp32"]["files"][0]["sha256"]
