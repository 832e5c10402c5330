"""runtime/sessions.py: the one onnxruntime loader stores its settings and opens on call."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ldm_edge.runtime.sessions import SessionFromOnnx


def _graph():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    node = helper.make_node("Add", ["x", "x"], ["y"])
    return helper.make_model(helper.make_graph([node], "double", [x], [y]),
                             opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_opens_a_path_or_bytes_with_the_settings_given(tmp_path):
    path = tmp_path / "g.onnx"
    onnx.save(_graph(), path)
    x = np.arange(3, dtype=np.float32)
    for model in (path, _graph().SerializeToString()):
        loader = SessionFromOnnx(model, threads=1, optimise=False)
        opts = loader.options()
        assert opts.intra_op_num_threads == 1 and opts.log_severity_level == 3
        assert np.array_equal(loader().run(None, {"x": x})[0], 2 * x)
        assert loader.cache_state == "off"


def test_the_cache_is_for_cpu_graphs_on_disk_only(tmp_path):
    assert not SessionFromOnnx(b"", cache=True).cache
    assert not SessionFromOnnx(tmp_path / "g.onnx", cache=True,
                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"]).cache
    assert SessionFromOnnx(tmp_path / "g.onnx", cache=True).cache
