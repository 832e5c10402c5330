"""Bundles whose graph data files are hard links (``ldm-export triton`` links them into its
model repository; ``cp -al`` copies): the bundle tools read their external data themselves
(bundletools/external_data.py), since onnx's loader refuses a file with several links."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ldm_edge.bundletools import external_data
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.errors import BundleError

PROMPTS = ["a red cat"]


def _external_model(folder, values):
    """A one-initializer model whose weight sits at offset 16 of ``w.data`` (hard-linked)."""
    w = numpy_helper.from_array(values, "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in {"location": "w.data", "offset": "16", "length": str(values.nbytes)}.items():
        w.external_data.add(key=k, value=v)
    (folder / "w.data").write_bytes(b"\0" * 16 + values.tobytes())
    os.link(folder / "w.data", folder / "link.data")  # a second link, as a Triton repository makes
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, values.shape)],
                              initializer=[w])
    return helper.make_model(graph)


def test_reads_hard_linked_external_data(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    model = _external_model(tmp_path, values)
    t = model.graph.initializer[0]
    with pytest.raises(Exception, match="hard link"):  # what onnx's own loader says
        numpy_helper.to_array(t, str(tmp_path))
    np.testing.assert_array_equal(external_data.to_array(t, tmp_path), values)
    assert t.data_location == TensorProto.EXTERNAL  # to_array leaves the tensor as it was
    external_data.load_all(model, tmp_path)
    assert t.data_location == TensorProto.DEFAULT
    np.testing.assert_array_equal(numpy_helper.to_array(t), values)


@pytest.mark.parametrize("location, offset, says", [
    ("../w.data", "16", "not a file name inside"),
    ("/etc/hostname", "0", "not a file name inside"),
    ("missing.data", "0", "not a file inside"),
    ("w.data", "40", "past its end"),
])
def test_refuses_data_outside_the_folder_or_the_file(tmp_path, location, offset, says):
    model = _external_model(tmp_path, np.ones(4, np.float32))
    t = model.graph.initializer[0]
    for e in t.external_data:
        e.value = {"location": location, "offset": offset}.get(e.key, e.value)
    with pytest.raises(BundleError, match=says):
        external_data.to_array(t, tmp_path)


def test_fp16_and_int8_on_a_hard_linked_bundle(tiny_models, tmp_path, monkeypatch):
    """The > 2 GB layout (forced on the tiny model), every file hard-linked into a second
    folder: ldm-export fp16 and int8 work there as on the original."""
    from ldm_edge.calibration import fp16, int8
    from ldm_edge.export import onnx_export
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    src, dst = tmp_path / "src", tmp_path / "linked"
    export_bundle(load_model(tiny_models["sd1"]), src, ExportOptions(
        components=("text_encoder", "unet", "vae_decoder")))
    assert (src / "unet.onnx.data").is_file()
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).hardlink_to(f) if f.name != "manifest.json" else \
            (dst / f.name).write_bytes(f.read_bytes())
    assert os.stat(dst / "unet.onnx.data").st_nlink == 2
    fp16.make_fp16(dst, PROMPTS, steps=2)
    int8.make_int8(dst, PROMPTS, calib_steps=2, schedulers=["ddim"], progress=lambda *a: None)
    m = open_bundle(dst)
    assert {"fp16", "int8"} <= set(m.precisions("unet"))
    assert os.stat(src / "unet.onnx.data").st_nlink == 2  # the shared file was not rewritten
