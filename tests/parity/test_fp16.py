"""FP16 variants: written, really FP16, within the quality bar end to end, islands by running."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from ldm_edge.calibration import fp16
from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.errors import ExportError, NumericsError
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.pipeline import Pipeline
from ldm_edge.runtime.backends.sessions import SessionFromOnnx

# End-to-end 8-bit PSNR vs the FP32 bundle, same prompts and seeds. FP16 keeps 11 bits of
# mantissa (relative error ~5e-4 per op), and the 10-step loop carries it into the image:
# tiny SD1 measured 64 dB. 40 dB is an RMS error of 2.6 levels of 255 (the same picture),
# while an FP16 graph with a broken op (overflow, lost timestep phase) lands near the
# 10-20 dB of unrelated pictures.
MIN_PSNR_DB = 40.0
PROMPTS = ["a red cat", "a blue square on a white background"]


@pytest.fixture(scope="module")
def fp16_bundles(tiny_bundles, tmp_path_factory):
    out = {}
    for fam, src in tiny_bundles.items():
        dst = tmp_path_factory.mktemp("fp16") / fam
        shutil.copytree(src, dst)
        fp16.make_fp16(dst, PROMPTS, steps=6)
        out[fam] = dst
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_fp16_end_to_end_psnr(family, fp16_bundles):
    ref, var = Pipeline(fp16_bundles[family]), Pipeline(fp16_bundles[family], precision="fp16")
    for seed, prompt in enumerate(["a photo of a horse", "a green dog"]):
        a = ref(prompt, num_inference_steps=10, seed=seed).images
        b = var(prompt, num_inference_steps=10, seed=seed).images
        assert psnr(b, a) >= MIN_PSNR_DB
        assert not np.array_equal(a, b)  # the FP16 path really ran


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_graphs_are_fp16_with_fp32_io_and_time_embedding(family, fp16_bundles):
    m = open_bundle(fp16_bundles[family])
    assert m.schema.quality["fp16"].psnr_db >= MIN_PSNR_DB
    g = onnx.load(str(m.variant("unet", "fp16").path))
    dtypes = {t.data_type for t in g.graph.initializer if t.dims and np.prod(t.dims) > 64}
    assert dtypes == {onnx.TensorProto.FLOAT16}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in g.graph.output)
    time_nodes = [n for n in g.graph.node if "/time_proj/" in n.name and n.op_type in ("Sin", "Cos")]
    assert time_nodes  # the sinusoidal embedding is there and was kept out of FP16
    assert m.variant("unet", "fp16").path.stat().st_size < 0.6 * m.variant("unet", "fp32").path.stat().st_size
    time_outputs = {o for n in g.graph.node if "/time_proj/" in n.name for o in n.output}
    to_fp16 = [n for n in g.graph.node if n.op_type == "Cast" and n.input[0] in time_outputs
               and n.attribute[0].i == onnx.TensorProto.FLOAT16]
    assert to_fp16  # the FP32 island ends in a cast to FP16


def test_unet_that_fails_every_level_is_refused(tiny_bundles, tmp_path, monkeypatch):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], dst)
    monkeypatch.setattr(fp16, "FP16_MIN_COSINE", 1.5)  # nothing can pass
    with pytest.raises(ExportError, match="does not run in FP16"):
        fp16.make_fp16(dst, PROMPTS[:1], steps=2)
    assert "fp16" not in open_bundle(dst).precisions("unet")


def test_a_failure_before_the_commit_leaves_the_manifest_and_no_graphs(tiny_bundles, tmp_path,
                                                                      monkeypatch):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], dst)
    before = (dst / "manifest.json").read_bytes()
    seen = {}

    def broken(manifest, precision, *args, **kwargs):
        # measured through a manifest that names the new graphs, not yet on disk
        seen["unet"] = manifest.variant("unet", precision).path.is_file()
        raise OSError("disk full")

    monkeypatch.setattr(fp16, "end_to_end_psnr", broken)
    with pytest.raises(OSError, match="disk full"):
        fp16.make_fp16(dst, PROMPTS[:1], steps=2)
    assert seen == {"unet": True}
    assert (dst / "manifest.json").read_bytes() == before
    assert not list(dst.glob("*.fp16.onnx*"))


def test_nan_from_a_component_names_it_and_suggests_fp32(fp16_bundles, monkeypatch):
    from ldm_edge.runtime.backends import onnxruntime as bo

    real = bo.OnnxRuntimeBackend._run

    def poisoned(self, feeds, bound):
        out = real(self, feeds, bound)
        if self.spec.name == "vae_decoder":
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out

    monkeypatch.setattr(bo.OnnxRuntimeBackend, "_run", poisoned)
    with pytest.raises(NumericsError, match=r"vae_decoder \(fp16\) produced NaN/Inf; try --precision fp32"):
        Pipeline(fp16_bundles["sd1"], precision="fp16")("a cat", num_inference_steps=2)


@pytest.mark.parametrize("level,ops", fp16.ISLAND_LEVELS)
@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder"])
def test_every_island_level_gives_a_valid_accurate_graph(level, ops, name, tiny_bundles, tmp_path):
    m = open_bundle(tiny_bundles["sd2"])
    files = fp16.save_graph(fp16.to_fp16(m.variant(name, "fp32").path, ops), tmp_path / "g.onnx")
    rng = np.random.default_rng(0)
    feeds = {"text_encoder": {"input_ids": rng.integers(0, 500, (2, 77))},
             "unet": {"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
                      "timestep": np.array([999.0, 3.0], np.float32),
                      "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)},
             "vae_decoder": {"latent": rng.standard_normal((1, 4, 16, 16), dtype=np.float32)}}[name]
    ref = SessionFromOnnx(m.variant(name, "fp32").path)().run(None, feeds)[0]
    out = SessionFromOnnx(files[0])().run(None, feeds)[0]
    from ldm_edge.runtime.compare import compare

    assert compare(out, ref, min_cosine=fp16.FP16_MIN_COSINE)
