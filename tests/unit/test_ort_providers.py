"""onnxruntime's execution providers as the backend asks for them, without a GPU: the order per
``--device`` (TensorRT's provider only when asked for) and the engine and timing caches it is
given, one folder per graph, weights and onnxruntime version."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm_edge.runtime.backends import onnxruntime as ort_backend
from ldm_edge.runtime.backends.onnxruntime import (TRT_CACHE_SUBDIR, TRT_PROVIDER,
                                                   OnnxRuntimeBackend, choose_providers,
                                                   provider_settings)
from ldm_edge.runtime.bundle.spec import ComponentSpec, TensorSpec
from ldm_edge.runtime.errors import BundleError
from ldm_edge.runtime.fsutil import cache_dir

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


@pytest.fixture
def gpu_onnxruntime(monkeypatch):
    """onnxruntime as onnxruntime-gpu with TensorRT reports itself."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [TRT_PROVIDER, CUDA, CPU])


def tiny_graph(path: Path, scale: float = 2.0) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node("Mul", ["x", "s"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("s", TensorProto.FLOAT, [1], [scale])])
    onnx.save(helper.make_model(graph), path)
    return path


def test_auto_leaves_out_tensorrts_provider(gpu_onnxruntime):
    """It builds its engines when a session opens (minutes for a U-Net): CUDA first under auto."""
    assert choose_providers("auto") == [CUDA, CPU]
    assert choose_providers("cuda") == [CUDA, CPU]
    assert choose_providers("tensorrt") == [TRT_PROVIDER, CUDA, CPU]


def test_tensorrts_provider_gets_engine_and_timing_caches(tmp_path):
    graph = tiny_graph(tmp_path / "m.onnx")
    providers = provider_settings([TRT_PROVIDER, CUDA, CPU], graph)
    (name, options), rest = providers[0], providers[1:]
    assert name == TRT_PROVIDER and rest == [CUDA, CPU]
    root = cache_dir() / TRT_CACHE_SUBDIR
    engines = Path(options["trt_engine_cache_path"])
    assert options["trt_engine_cache_enable"] is True and options["trt_timing_cache_enable"] is True
    assert engines.parent == root and engines.is_dir()
    assert Path(options["trt_timing_cache_path"]) == root / "timing"
    assert provider_settings([CUDA, CPU], graph) == [CUDA, CPU]  # nothing to add


def test_each_graph_and_weights_get_their_own_engine_folder(tmp_path):
    """onnxruntime keys its cached engines by the graph's structure, not its weights: the same
    graph with other weights (a LoRA merged in, a re-export) must not reuse an engine."""
    def folder(graph, weights_key=""):
        return provider_settings([TRT_PROVIDER], graph, weights_key)[0][1]["trt_engine_cache_path"]

    a = tiny_graph(tmp_path / "a.onnx", 2.0)
    same = folder(a)
    assert folder(a) == same
    assert folder(a, "lora:abc") != same
    assert folder(tiny_graph(tmp_path / "b.onnx", 3.0)) != same  # same structure, other weights


def test_an_unreadable_graph_opens_without_the_cache(tmp_path, caplog):
    missing = tmp_path / "gone.onnx"
    with caplog.at_level("WARNING"):
        assert provider_settings([TRT_PROVIDER, CPU], missing) == [TRT_PROVIDER, CPU]
    assert "without its engine cache" in caplog.text


def test_the_backend_opens_its_session_with_those_settings(gpu_onnxruntime, tmp_path,
                                                            monkeypatch):
    graph = tiny_graph(tmp_path / "m.onnx")
    seen = {}

    class Recorder:
        def __init__(self, path, **kw):
            seen.update(kw)

        def __call__(self):
            raise RuntimeError("no session in this test")
    monkeypatch.setattr(ort_backend, "SessionFromOnnx", Recorder)
    spec = ComponentSpec("unet", (TensorSpec("x", "float32", (1,)),),
                         (TensorSpec("y", "float32", (1,)),))
    with pytest.raises(BundleError):
        OnnxRuntimeBackend(spec, graph, device="tensorrt")
    assert seen["providers"] == provider_settings([TRT_PROVIDER, CUDA, CPU], graph)
    with pytest.raises(BundleError):
        OnnxRuntimeBackend(spec, graph, device="auto")
    assert seen["providers"] == [CUDA, CPU]


def test_a_provider_onnxruntime_lacks_names_the_extras(monkeypatch):
    import onnxruntime

    from ldm_edge.runtime.errors import UsageError

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(UsageError, match=r"no CUDAExecutionProvider .*pip install "
                                         r"'ldm-edge\[gpu-cu12\]' or 'ldm-edge\[gpu-cu13\]'"):
        choose_providers("cuda")
    assert choose_providers("auto") == [CPU]
