"""Loading single files, refusing what cannot be loaded, and the bundle's atomicity."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.export import onnx_export
from ldm_edge.export.bundle import ExportOptions, export_bundle
from ldm_edge.export.load import ModelLoadError, load_model
from ldm_edge.export.single_file import save_single_file
from ldm_edge.runtime.errors import LdmEdgeError

ONLY_FAST = ExportOptions(components=("text_encoder", "vae_decoder"))


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_roundtrip_exports_same_graphs(tiny_models, tmp_path, suffix):
    folder_model = load_model(tiny_models["sd2"])
    path = save_single_file(folder_model, tmp_path / f"tiny{suffix}")
    model = load_model(path)
    assert model.family == "sd2" and model.prediction_type == "v_prediction"
    assert model.tokenizer_json == folder_model.tokenizer_json
    for a, b in zip(model.unet.state_dict().values(), folder_model.unet.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())
    m = export_bundle(model, tmp_path / "b", ONLY_FAST)
    assert m.model.source == f"tiny{suffix}"
    assert all(c.variants["fp32"].parity["passed"] for c in m.components.values())


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"state_dict": _Evil()}, protocol=2))  # torch.save's protocol
    with pytest.raises(ModelLoadError, match="wants to run code.*refused"):
        load_model(bad)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content,match", [
    (b"not a checkpoint", "readable"),
    (b"", "readable"),
])
def test_damaged_files_are_refused(tmp_path, content, match):
    for suffix in (".ckpt", ".safetensors"):
        p = tmp_path / f"x{suffix}"
        p.write_bytes(content)
        with pytest.raises(ModelLoadError, match=match):
            load_model(p)


def test_unsupported_folder_names_what_is_missing(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_model(tmp_path)


def test_original_layout_checkpoint_needs_config(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((1,), np.float32)}, str(p))
    with pytest.raises(ModelLoadError, match="--config"):
        load_model(p)


def test_incomplete_original_checkpoint_names_the_missing_parts(tiny_models, tmp_path):
    """A checkpoint with only U-Net weights: the error names the parts that have none, and
    passes on none of diffusers' advice (flags a CLI user cannot set)."""
    from safetensors.numpy import save_file

    p = tmp_path / "unet-only.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((32, 4, 3, 3), np.float32),
               "model.diffusion_model.input_blocks.0.0.bias": np.zeros((32,), np.float32)}, str(p))
    with pytest.raises(ModelLoadError) as e:
        load_model(p, config=str(tiny_models["sd1"]))
    msg = str(e.value)
    assert "could not convert" in msg and "\n" not in msg
    assert "no weights for the VAE (first_stage_model.*) or the text encoder (cond_stage_model.*)" in msg
    assert "U-Net 2" in msg
    assert "low_cpu_mem_usage" not in msg and "Please" not in msg


def test_failed_check_writes_nothing(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXPORT_ATOL", 0.0)
    monkeypatch.setattr(onnx_export, "EXPORT_RTOL", 0.0)
    monkeypatch.setattr(onnx_export, "EXPORT_MIN_COSINE", 1.0 + 1e-9)
    out = tmp_path / "b"
    with pytest.raises(LdmEdgeError, match="does not match PyTorch"):
        export_bundle(load_model(tiny_models["sd1"]), out, ONLY_FAST)
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_kept_without_force_replaced_with_it(tiny_models, tmp_path):
    model = load_model(tiny_models["sd1"])
    out = tmp_path / "b"
    export_bundle(model, out, ONLY_FAST)
    first = json.loads((out / "manifest.json").read_text())["created"]
    with pytest.raises(LdmEdgeError, match="--force"):
        export_bundle(model, out, ONLY_FAST)
    export_bundle(model, out, ExportOptions(components=("text_encoder", "vae_decoder"), force=True))
    assert (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging or old folders left
    assert first is not None


@pytest.mark.parametrize("kw,match", [
    ({"min_size": 36}, "multiple of 8"),
    ({"max_size": 0}, "multiple of 8"),
    ({"min_size": 256, "max_size": 128}, "larger than"),
    ({"min_size": 256, "max_size": 512}, "outside"),
    ({"max_batch": 0}, "max-batch"),
])
def test_bad_sizes_refused_before_export(tiny_models, tmp_path, kw, match):
    with pytest.raises(LdmEdgeError, match=match):
        export_bundle(load_model(tiny_models["sd1"]), tmp_path / "b", ExportOptions(**kw))
    assert not (tmp_path / "b").exists()


def test_large_components_use_one_external_data_file(tiny_models, tmp_path, monkeypatch):
    """The >2 GB path, exercised on a tiny model by lowering the threshold."""
    from ldm_edge.runtime.backends.sessions import SessionFromOnnx

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "b"
    m = export_bundle(load_model(tiny_models["sd1"]), out, ExportOptions(components=("unet",
                      "text_encoder", "vae_decoder")))
    files = [f.path for f in m.components["unet"].variants["fp32"].files]
    assert files == ["unet.onnx", "unet.onnx.data"]
    assert (out / "unet.onnx.data").stat().st_size > 5 * (out / "unet.onnx").stat().st_size
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "text_encoder.onnx", "text_encoder.onnx.data",
         "unet.onnx", "unet.onnx.data", "vae_decoder.onnx", "vae_decoder.onnx.data",
         # the fused-attention forms read the plain graphs' weights: no second data file
         "unet.ort-mha.onnx", "vae_decoder.ort-mha.onnx",
         # which initializer holds which parameter (LoRA)
         "unet.weights-map.json", "text_encoder.weights-map.json"])
    open_bundle(out)
    SessionFromOnnx(out / "unet.onnx")()
    SessionFromOnnx(out / "unet.ort-mha.onnx")()
