"""runtime.onnx_scan.graph_io reads a graph's inputs and outputs from the wire format; it
must report what onnxruntime's session metadata reports, for every case Optimum folders
and our own exports produce."""
from __future__ import annotations

import numpy as np
import pytest

# the graphs under test are written with the onnx package (the export extra); the runtime
# itself reads them without it
onnx = pytest.importorskip("onnx", reason="writing the test graphs needs onnx (pip install "
                           ".[export]); the runtime's reader does not")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ldm_edge.runtime.bundle.onnx_scan import ScanError, graph_io  # noqa: E402
from ldm_edge.runtime.backends.sessions import SessionFromOnnx  # noqa: E402

_ORT_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
              "tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(double)": "float64"}


def _ort_io(path):
    sess = SessionFromOnnx(path)()

    def table(args):
        return {a.name: (_ORT_NAMES[a.type], list(a.shape or [])) for a in args}

    return table(sess.get_inputs()), table(sess.get_outputs())


def _model(ir_version=8, weights_as_inputs=False):
    w = numpy_helper.from_array(np.arange(256, dtype=np.float32).reshape(64, 4) / 256, "w")
    inputs = [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 3, None, 64]),
        helper.make_tensor_value_info("timestep", TensorProto.INT64, []),
        helper.make_tensor_value_info("mask", TensorProto.FLOAT16, [2, "seq"]),
    ]
    if weights_as_inputs:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 4]))
    nodes = [helper.make_node("MatMul", ["sample", "w"], ["out_sample"]),
             helper.make_node("Cast", ["timestep"], ["t_out"], to=TensorProto.INT32),
             helper.make_node("Identity", ["mask"], ["mask_out"])]
    outputs = [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, ["batch", 3, None, 4]),
               helper.make_tensor_value_info("t_out", TensorProto.INT32, []),
               helper.make_tensor_value_info("mask_out", TensorProto.FLOAT16, [2, "seq"])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[w])
    opset = 9 if ir_version < 4 else 17
    return helper.make_model(graph, ir_version=ir_version, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("case", ["plain", "ir3_weights_listed_as_inputs", "external_data"])
def test_graph_io_matches_onnxruntime(case, tmp_path):
    path = tmp_path / "model.onnx"
    if case == "plain":
        onnx.save(_model(), path)
    elif case == "ir3_weights_listed_as_inputs":
        onnx.save(_model(ir_version=3, weights_as_inputs=True), path)
    else:
        onnx.save(_model(), path, save_as_external_data=True, location="model.onnx_data",
                  size_threshold=0)
        assert (tmp_path / "model.onnx_data").is_file()
    ours = graph_io(path)
    assert ours == _ort_io(path)
    assert list(ours[0]) == ["sample", "timestep", "mask"]  # graph order, weights left out
    assert ours[0]["sample"] == ("float32", ["batch", 3, None, 64])
    assert ours[0]["timestep"] == ("int64", [])
    assert ours[1]["t_out"] == ("int32", [])


def test_graph_io_of_an_exported_torch_module(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Conv2d(4, 8, 3), (torch.zeros(1, 4, 16, 16),), str(path),
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 2: "h"}},
                      dynamo=False)
    assert graph_io(path) == _ort_io(path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_graph_io_refuses_damaged_files(damage, tmp_path):
    path = tmp_path / "model.onnx"
    data = _model().SerializeToString()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "garbage": b"\xff" * 64}[damage])
    with pytest.raises(ScanError):
        graph_io(path)
