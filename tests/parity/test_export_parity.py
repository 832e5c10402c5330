"""Exported graphs vs PyTorch, checked independently of the manifest's own figures.

The reference is diffusers/transformers called directly (not ldm-edge's export
wrappers), at batch 1 and 2 and at two latent sizes, one of them non-square.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm_edge.runtime.backends.sessions import SessionFromOnnx

# Same FP32 math in another order: summation order in conv/matmul gives ~1e-7 relative per
# op, far under 1e-4 for the tiny models' O(1) outputs, while any wrong op is off by >= 1e-2.
MAX_ABS = 1e-4
# (batch, latent height, latent width): square and non-square, batch 1 and 2
SHAPES = [(1, 16, 16), (2, 12, 20), (2, 8, 8)]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def case(request, tiny_models, tiny_bundles):
    from diffusers import StableDiffusionPipeline

    fam = request.param
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models[fam], safety_checker=None,
                                                   requires_safety_checker=False)
    return fam, pipe, tiny_bundles[fam]


def session(bundle, name):
    m = json.loads((bundle / "manifest.json").read_text())
    path = bundle / m["components"][name]["variants"]["fp32"]["file"]
    return SessionFromOnnx(path)()


def max_abs(a, b):
    return float(np.abs(a - b).max())


@torch.no_grad()
def test_unet(case):
    fam, pipe, bundle = case
    sess = session(bundle, "unet")
    rng = np.random.default_rng(0)
    for b, h, w in SHAPES:
        x = rng.standard_normal((b, 4, h, w), dtype=np.float32)
        t = np.array([981.0, 1.0][:b], dtype=np.float32)
        e = rng.standard_normal((b, 77, 32), dtype=np.float32)
        ref = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(e)).sample.numpy()
        out = sess.run(None, {"sample": x, "timestep": t, "encoder_hidden_states": e})[0]
        assert max_abs(out, ref) <= MAX_ABS, (fam, b, h, w, max_abs(out, ref))


@torch.no_grad()
def test_vae_decoder_and_encoder(case):
    fam, pipe, bundle = case
    dec, enc = session(bundle, "vae_decoder"), session(bundle, "vae_encoder")
    rng = np.random.default_rng(1)
    for b, h, w in SHAPES:
        z = rng.standard_normal((b, 4, h, w), dtype=np.float32)
        ref = pipe.vae.decode(torch.from_numpy(z)).sample.numpy()
        assert max_abs(dec.run(None, {"latent": z})[0], ref) <= MAX_ABS
        img = rng.uniform(-1, 1, (b, 3, 8 * h, 8 * w)).astype(np.float32)
        dist = pipe.vae.encode(torch.from_numpy(img)).latent_dist
        params = enc.run(None, {"image": img})[0]
        assert max_abs(params[:, :4], dist.mean.numpy()) <= MAX_ABS
        assert max_abs(params[:, 4:], dist.logvar.numpy()) <= MAX_ABS


@torch.no_grad()
def test_text_encoder(case):
    fam, pipe, bundle = case
    sess = session(bundle, "text_encoder")
    for prompts in (["a red cat"], ["a photo of an astronaut riding a horse", ""]):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="np").input_ids.astype(np.int64)
        ref = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
        assert max_abs(sess.run(None, {"input_ids": ids})[0], ref) <= MAX_ABS


def test_manifest_records_parity_and_hashes(case):
    from ldm_edge.runtime.fsutil import sha256_file

    fam, _, bundle = case
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["model"]["family"] == fam
    assert m["prediction_type"] == ("v_prediction" if fam == "sd2" else "epsilon")
    assert set(m["components"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    for name, rec in m["components"].items():
        v = rec["variants"]["fp32"]
        assert v["opset"] >= 18
        assert v["parity"]["passed"] and v["parity"]["max_abs"] <= MAX_ABS
        assert len(v["parity"]["shapes"]) == 2
        for f in v["files"]:
            assert sha256_file(bundle / f["path"]) == f["sha256"]
    assert m["components"]["unet"]["spec"]["inputs"][1] == {
        "name": "timestep", "dtype": "float32", "shape": ["batch"]}
