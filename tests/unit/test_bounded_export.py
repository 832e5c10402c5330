"""The pieces that keep a full-size export in memory (export/external_data.py,
export/release.py), on toy sizes: the weights are gathered file to file into one .data file
the graph reads exactly as before; parked weights still compute the same; a large module is
released after its last component only."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _graph_with_external_files(folder):
    """y = x @ W + b with W (32x32 floats, 4 KB) external in its own file, b (128 bytes) inline."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32)).astype(np.float32)
    b = rng.standard_normal((32,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    raw = folder / "raw" / "m.onnx"
    raw.parent.mkdir()
    onnx.save_model(model, str(raw), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=1024)
    return raw, (w, b)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def test_gathered_graph_reads_the_same_weights(tmp_path):
    from ldm_edge.export.external_data import gather_external_data

    raw, (w, b) = _graph_with_external_files(tmp_path)
    assert (raw.parent / "W").is_file()  # one file per large tensor, as torch writes
    x = np.ones((1, 32), np.float32)
    files = gather_external_data(raw, tmp_path / "unet.onnx")
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    assert files[1].stat().st_size == w.nbytes  # only W is external; b stays inline
    np.testing.assert_array_equal(_run(files[0], x), _run(raw, x))
    np.testing.assert_allclose(_run(files[0], x), x @ w + b, rtol=1e-5)


def test_parked_weights_compute_the_same(tmp_path):
    from ldm_edge.export.release import park

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    x = torch.randn(2, 8)
    before = m(x).detach()
    park(m, tmp_path)
    assert list(tmp_path.iterdir()) == []  # the mapped file is unlinked at once
    assert isinstance(m[0].weight, torch.nn.Parameter)
    torch.testing.assert_close(m(x), before, rtol=0, atol=0)


class _Model:
    """What release_finished reads of a LoadedModel."""

    def __init__(self):
        self.unet = torch.nn.Linear(4, 4)
        self.vae = torch.nn.Linear(4, 4)
        self.second_encoder = None
        self.tiny_vae = None


def test_release_after_the_last_component_of_a_large_module(monkeypatch):
    from ldm_edge.export import release

    model = _Model()
    order = ["unet", "vae_decoder", "vae_encoder"]
    release.release_finished(model, "unet", order)
    assert model.unet.weight.device.type == "cpu"  # small: kept
    monkeypatch.setattr(release, "EXTERNAL_DATA_THRESHOLD", 0)  # everything is large now
    release.release_finished(model, "vae_decoder", order)
    assert model.vae.weight.device.type == "cpu"  # the encoder still needs it
    release.release_finished(model, "vae_encoder", order)
    release.release_finished(model, "unet", order)
    assert model.vae.weight.is_meta and model.unet.weight.is_meta


def test_weights_map_is_verified_one_initializer_at_a_time(tmp_path):
    """verify_weights_map reads the graph's initializers one by one (a 10 GB U-Net's are never
    held whole) and still fails on a changed weight and on a mapped name the graph lacks."""
    from ldm_edge.export.weights_map import build_weights_map, verify_weights_map
    from ldm_edge.runtime.errors import ExportError
    from ldm_edge.runtime.lora.weights_map import MappedParam

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = tmp_path / "unet.onnx"
    torch.onnx.export(m, (torch.randn(1, 8),), str(path), dynamo=False)
    wmap = build_weights_map(m, "unet", path)
    assert len(wmap.params) == 2
    verify_weights_map(wmap, m, path)
    wmap.params["ghost.weight"] = MappedParam("no-such-initializer", False, (4, 16))
    with pytest.raises(ExportError, match="is not in unet.onnx"):
        verify_weights_map(wmap, m, path)
    del wmap.params["ghost.weight"]
    with torch.no_grad():
        m[2].weight.add_(1.0)
    with pytest.raises(ExportError, match="is not 2.weight"):
        verify_weights_map(wmap, m, path)
