"""The onnxruntime form (attention fused into com.microsoft.MultiHeadAttention): made by the
export and by ``add_fused_forms`` for FP16 and INT8 variants, checked, recorded, chosen by the
onnxruntime backend on the CPU, and drawing the plain graph's picture."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ldm_edge.bundletools import forms
from ldm_edge.bundletools.fused_attention import fuse_attention
from ldm_edge.runtime.backends.choose import open_backend
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline
from ldm_edge.runtime.backends.sessions import SessionFromOnnx

# The form computes the same attention as the plain graph in another order (max-abs ~1e-6 per
# component, FP16 ~5e-4 before the VAE), so the 8-bit pictures must agree to within rounding:
# 50 dB is an RMS error of 0.8 of one level of 255. A wrong head count or scale lands near the
# 10-20 dB of unrelated pictures.
MIN_PSNR_DB = {"fp32": 50.0, "fp16": 50.0}
# INT8: a last-bit difference at attention's output moves a few values across a QuantizeLinear
# rounding boundary (one int8 step) and the loop carries it, so the form's picture is another
# rounding of FP32's, not the plain INT8 graph's (tiny SD2: 30.9 dB between the two, each
# ~34 dB from FP32). Its PSNR vs FP32 minus the plain graph's, measured over tiny SD1, tiny
# SD2 and the demo, 2 prompts each: -0.52..+0.20 dB; 1.5 dB is three times that spread, far
# above the 10-20 dB of unrelated pictures a wrong rewrite would draw.
INT8_FORM_PSNR_SLACK_DB = 1.5
# The tiny models and the demo model (one layout): the U-Net's 2 levels x (attn1 + attn2) x
# (down, up) + the mid block's 2; the VAE's one mid-block attention each side. The text
# encoder's (masked) attention is left alone.
TINY_FUSED = {"unet": 14, "vae_decoder": 1, "vae_encoder": 1}
PROMPTS = ["a red cat"]


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _check_forms(bundle, precision, expected):
    m = open_bundle(bundle)
    for name, n in expected.items():
        v = m.variant(name, precision)
        form = v.record.forms["ort-mha"]
        assert form.fused_attention == n and form.check["passed"]
        assert form.check["softmax_nodes"] == n  # every Softmax was attention
        assert len(form.check["shapes"]) == 2
        if precision == "int8":  # as close to FP32 as the plain INT8 graph, by the ratio
            limit = 1 - forms.INT8_FORM_ERROR_RATIO * (1 - form.check["plain_cosine"])
            assert form.check["reference"] == forms.INT8_CHECK_REFERENCE
            assert limit < form.check["cosine"] < 1
        else:
            assert form.check["cosine"] >= forms.TOLERANCE[precision]["min_cosine"]
        ops = _ops(m.root / form.file)
        assert ops["MultiHeadAttention"] == n and ops["Softmax"] == 0
        assert _ops(v.path)["Softmax"] == n  # the plain graph is untouched
    if precision in m.precisions("text_encoder"):
        assert "ort-mha" not in m.variant("text_encoder", precision).record.forms


@pytest.fixture(scope="module", params=["sd1", "sd2", "demo"])
def quantised(request, tiny_bundles, tmp_path_factory):
    """Tiny SD1, tiny SD2 and the trained demo model with FP16 and INT8 variants, their forms
    added by add_fused_forms (INT8: ldm-export int8 made one first; it is made again)."""
    from ldm_edge.calibration import fp16, int8

    dst = tmp_path_factory.mktemp("fused") / request.param
    if request.param == "demo":
        from ldm_edge.export.bundle import ExportOptions, export_bundle
        from ldm_edge.export.load import default_source, load_model

        export_bundle(load_model(default_source()), dst, ExportOptions())
    else:
        shutil.copytree(tiny_bundles[request.param], dst)
    fp16.make_fp16(dst, PROMPTS, steps=2)
    int8.make_int8(dst, PROMPTS, calib_steps=2, progress=lambda *a: None)
    made = {p: forms.add_fused_forms(dst, p) for p in ("fp16", "int8")}
    return dst, made


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_export_writes_checked_forms(family, tiny_bundles):
    _check_forms(tiny_bundles[family], "fp32", TINY_FUSED)


def test_fp16_and_int8_variants_get_forms(quantised):
    bundle, made = quantised
    assert {k for k, v in made["fp16"].items() if v} == set(TINY_FUSED)
    assert {k for k, v in made["int8"].items() if v} == {"unet"}
    _check_forms(bundle, "fp16", TINY_FUSED)
    _check_forms(bundle, "int8", {"unet": 14})
    m = open_bundle(bundle)
    ops = _ops(m.root / m.variant("unet", "int8").record.forms["ort-mha"].file)
    assert ops["QuantizeLinear"] > 0  # still the Q/DQ graph


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_pipeline_with_form_draws_the_plain_picture(precision, quantised, monkeypatch):
    """FP32/FP16: the form draws the plain graph's picture. INT8: the two are two roundings
    of the same float math, so the form's picture is held to be as close to FP32's as the
    plain INT8 graph's is (INT8_FORM_PSNR_SLACK_DB), not to the plain one's picture."""
    bundle, _ = quantised
    fused = Pipeline(bundle, precision=precision)
    assert fused.backend("unet").form == "ort-mha"
    monkeypatch.setenv("LDM_EDGE_FUSED_ATTENTION", "0")
    plain = Pipeline(bundle, precision=precision)
    assert plain.backend("unet").form is None
    fp32 = Pipeline(bundle) if precision == "int8" else None
    for seed, prompt in enumerate(["a photo of a horse", "a green dog"]):
        a = plain(prompt, num_inference_steps=6, seed=seed).images
        b = fused(prompt, num_inference_steps=6, seed=seed).images
        if fp32 is None:
            assert psnr(b, a) >= MIN_PSNR_DB[precision]
            continue
        ref = fp32(prompt, num_inference_steps=6, seed=seed).images
        assert psnr(b, ref) >= psnr(a, ref) - INT8_FORM_PSNR_SLACK_DB


def test_backend_choice(tiny_bundles):
    m = open_bundle(tiny_bundles["sd1"])
    b = open_backend(m, "unet", backend="onnxruntime", device="cpu")
    assert b.form == "ort-mha" and b.path.name == "unet.ort-mha.onnx"
    assert open_backend(m, "unet", backend="onnxruntime", fused_attention=False).form is None
    assert open_backend(m, "text_encoder", backend="onnxruntime").form is None


def test_ort_cache_keys_by_the_opened_graph(tiny_bundles, tmp_path, monkeypatch):
    from ldm_edge.runtime.backends.ort_cache import GraphCache, graph_key

    monkeypatch.setenv("LDM_EDGE_CACHE", str(tmp_path / "cache"))
    m = open_bundle(tiny_bundles["sd1"])
    fused = open_backend(m, "unet", backend="onnxruntime", device="cpu", ort_cache=True)
    plain = open_backend(m, "unet", backend="onnxruntime", device="cpu", ort_cache=True,
                         fused_attention=False)
    assert fused.cache_state == "miss" and plain.cache_state == "miss"  # two entries
    assert graph_key(fused.path) != graph_key(plain.path)
    again = open_backend(m, "unet", backend="onnxruntime", device="cpu", ort_cache=True)
    assert again.cache_state == "hit"
    feeds = {"sample": np.ones((1, 4, 8, 8), np.float32), "timestep": np.array([5.0], np.float32),
             "encoder_hidden_states": np.zeros((1, *m.spec("unet").inputs[2].shape[1:]), np.float32)}
    np.testing.assert_allclose(again.run(feeds)["model_output"], fused.run(feeds)["model_output"])
    assert len(list(GraphCache().root.iterdir())) == 2


def test_broken_rewrite_fails_its_check(tiny_bundles, tmp_path):
    """Negative control: the check can fail. A wrong head count is not written or recorded."""
    dst = tmp_path / "sd1"
    shutil.copytree(tiny_bundles["sd1"], dst)
    m = open_bundle(dst)
    v = m.variant("unet", "fp32").record
    (dst / v.forms["ort-mha"].file).unlink()
    form = forms.make_form(dst, m.spec("unet"), v, "fp32", num_heads=1, **forms.default_size(m.schema))
    assert form is None and not (dst / "unet.ort-mha.onnx").exists()


def test_broken_int8_rewrite_fails_its_check(quantised, tmp_path):
    """Negative control for the INT8 check (against FP32, by the plain INT8 graph's distance)."""
    dst = tmp_path / "bundle"
    shutil.copytree(quantised[0], dst)
    m = open_bundle(dst)
    v = m.variant("unet", "int8").record
    (dst / v.forms["ort-mha"].file).unlink()
    form = forms.make_form(dst, m.spec("unet"), v, "int8", num_heads=1,
                           reference=m.variant("unet", "fp32").path, **forms.default_size(m.schema))
    assert form is None and not (dst / "unet.int8.ort-mha.onnx").exists()
    good = forms.make_form(dst, m.spec("unet"), v, "int8", reference=m.variant("unet", "fp32").path,
                           **forms.default_size(m.schema))
    assert good is not None and good.check["passed"]


def test_fuse_cli_adds_forms_to_a_bundle_without(tiny_bundles, tmp_path):
    from helpers import run_cli
    from ldm_edge.runtime.bundle.schema import edit_manifest

    dst = tmp_path / "sd1"
    shutil.copytree(tiny_bundles["sd1"], dst)

    def strip(man):
        for c in man.components.values():
            for v in c.variants.values():
                v.forms.clear()
    edit_manifest(dst, strip)
    for p in dst.glob("*.ort-mha.onnx"):
        p.unlink()
    old = Pipeline(dst)  # a bundle without forms still works, on the plain graph
    assert old.backend("unet").form is None
    r = run_cli("-m", "ldm_edge.export.cli", "fuse", str(dst))
    assert r.returncode == 0, r.stderr[-2000:]
    _check_forms(dst, "fp32", TINY_FUSED)


# -- the rewrite on a hand-built graph ----------------------------------------------------------
def _attention_graph(heads=2, dim=4, scale_const=1.0, extra_consumer=False):
    """q, k, v [B, T, heads*dim] -> SDPA as TorchScript writes it -> [B, T, heads*dim]."""
    c = heads * dim
    n = []
    consts = {"split": np.array([0, -1, heads, dim], np.int64), "merge": np.array([0, -1, c], np.int64),
              "c": np.array(scale_const, np.float32), "start": np.array([-1], np.int64),
              "end": np.array([2**62], np.int64)}
    for name, v in consts.items():
        n.append(helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(v, name)))
    for t in "qkv":
        n.append(helper.make_node("Reshape", [t, "split"], [f"{t}4"]))
    n += [helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
          helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
          helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
          helper.make_node("Shape", ["qt"], ["qshape"]),
          helper.make_node("Slice", ["qshape", "start", "end"], ["d"]),
          helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
          helper.make_node("Sqrt", ["df"], ["sd"]),
          helper.make_node("Div", ["c", "sd"], ["ratio"]),
          helper.make_node("Sqrt", ["ratio"], ["s"]),
          helper.make_node("Mul", ["qt", "s"], ["qs"]),
          helper.make_node("Mul", ["kt", "s"], ["ks"]),
          helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
          helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
          helper.make_node("MatMul", ["p", "vt"], ["o4"]),
          helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
          helper.make_node("Reshape", ["ot", "merge"], ["out"])]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", c])]
    if extra_consumer:  # the probabilities are read elsewhere too: not ours to replace
        outs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    ins = [helper.make_tensor_value_info(t, TensorProto.FLOAT, ["b", "s" if t == "q" else "l", c])
           for t in "qkv"]
    return helper.make_model(helper.make_graph(n, "attn", ins, outs),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("scale_const", [1.0, 0.5])
def test_rewrite_of_a_hand_built_attention(scale_const):
    model = _attention_graph(scale_const=scale_const)
    plain = model.SerializeToString()
    fused, softmaxes = fuse_attention(model)
    if scale_const != 1.0:  # c/sqrt(D) with c != 1: D is only known at run time; left alone
        assert (fused, softmaxes) == (0, 1)
        return
    assert (fused, softmaxes) == (1, 1)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops == {"MultiHeadAttention": 1}  # the head-size arithmetic went with the chain
    mha = model.graph.node[0]
    assert mha.domain == "com.microsoft" and list(mha.input) == ["q", "k", "v"]
    assert helper.get_attribute_value(mha.attribute[0]) == 2
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((2, 5, 8), np.float32),
             "k": rng.standard_normal((2, 3, 8), np.float32),
             "v": rng.standard_normal((2, 3, 8), np.float32)}
    ref = SessionFromOnnx(plain)().run(None, feeds)[0]
    got = SessionFromOnnx(model.SerializeToString())().run(None, feeds)[0]
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_rewrite_leaves_a_shared_chain_alone():
    model = _attention_graph(extra_consumer=True)
    assert fuse_attention(model) == (0, 1)
