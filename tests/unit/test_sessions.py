"""runtime/backends/sessions.py: the one onnxruntime loader stores its settings and opens on call."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ldm_edge.runtime.backends.sessions import SessionFromOnnx

# y = x + x, float32 [n], opset 18: written once with onnx.helper (make_node("Add", ["x", "x"],
# ["y"])) and stored, so this runs on the lean install, which has no onnx package
DOUBLE = Path(__file__).parent / "data" / "double.onnx"


def test_opens_a_path_or_bytes_with_the_settings_given(tmp_path):
    path = tmp_path / "g.onnx"
    shutil.copy(DOUBLE, path)
    x = np.arange(3, dtype=np.float32)
    for model in (path, DOUBLE.read_bytes()):
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


def test_memory_arena_off_for_low_memory():
    """memory_arena=False (ldm-run --low-memory): no CPU arena and no memory pattern."""
    on, off = SessionFromOnnx(DOUBLE).options(), SessionFromOnnx(DOUBLE, memory_arena=False)
    assert on.enable_cpu_mem_arena and on.enable_mem_pattern
    opts = off.options()
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_pattern
    x = np.arange(3, dtype=np.float32)
    assert np.array_equal(off().run(None, {"x": x})[0], 2 * x)


def test_fixed_dims_pin_a_symbolic_dimension():
    """fixed_dims (benchmarks/bench_fixed_dims.py): the session takes the pinned size only."""
    import pytest

    s = SessionFromOnnx(DOUBLE, fixed_dims={"n": 3})()
    x = np.arange(3, dtype=np.float32)
    assert np.array_equal(s.run(None, {"x": x})[0], 2 * x)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        s.run(None, {"x": np.arange(4, dtype=np.float32)})
    # without it any size runs
    assert SessionFromOnnx(DOUBLE)().run(None, {"x": np.arange(4, dtype=np.float32)})[0].shape == (4,)
