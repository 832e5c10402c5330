"""LCM-distilled U-Nets: the guidance embedding as the U-Net's `timestep_cond` input, one U-Net
call per step (no guidance batch), vs diffusers' LatentConsistencyModelPipeline; and the export
refusing what it does not wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TorchNoise
from helpers import to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.pipeline import Pipeline

# 8-bit picture bar: only single-level rounding flips from ~1e-6 FP32 differences between
# onnxruntime and PyTorch are allowed (as tests/parity/test_pipeline_parity.py).
MIN_PSNR_DB = 50.0
# A picture drawn with another guidance scale (another timestep_cond) must land far under the
# bar, or the parity proves nothing about the embedding. Measured on the tiny LCM model, 4
# steps: guidance 2.0 and 7.5 each 31 dB from 8.5 (50 dB at nn.Linear's default cond_proj
# init, which export/tiny.py's LCM_COND_PROJ_STD replaces); a run with w instead of w - 1
# embedded fails the parity bar.
OTHER_GUIDANCE_MAX_PSNR_DB = 40.0
PROMPT = "a red cat"
# INT8 U-Net output vs FP32's on the FP32 trajectory, every step of every few-step sampler: the
# bar of tests/parity/test_int8.py (MIN_UNET_COSINE, its reasons); measured on the tiny LCM
# model, 4 steps: 0.9989 under each of lcm, tcd, euler-a (pictures 52-53 dB; AMD EPYC, VNNI).
MIN_INT8_UNET_COSINE = 0.995


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory):
    from ldm_edge.export.tiny import save_tiny_lcm

    return save_tiny_lcm(tmp_path_factory.mktemp("lcm") / "tiny_lcm")


@pytest.fixture(scope="module")
def lcm_bundle(lcm_model, tmp_path_factory):
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    out = tmp_path_factory.mktemp("lcm_bundle") / "b"
    export_bundle(load_model(lcm_model), out, ExportOptions())
    return out


@pytest.fixture(scope="module")
def diffusers_lcm(lcm_model):
    import diffusers

    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        lcm_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 16, 16), dtype=np.float32)


def _reference(pipe, steps, guidance, lat, seed, prompt=PROMPT):
    return to_uint8(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                         latents=torch.from_numpy(lat), output_type="np",
                         generator=torch.Generator().manual_seed(seed)).images)


@pytest.mark.parametrize("steps", [1, 4])
def test_matches_latent_consistency_pipeline(lcm_bundle, diffusers_lcm, steps):
    """The injected noise of the LCM scheduler's multistep sampling is drawn from torch in
    diffusers' order (conftest.TorchNoise)."""
    lat = latents(0)
    ref = _reference(diffusers_lcm, steps, 8.5, lat, seed=7)
    pipe = Pipeline(lcm_bundle)
    calls = []
    pipe.add_call_hook(lambda c: calls.append(c.feeds["sample"].shape[0]) if c.name == "unet" else None)
    ours = pipe(PROMPT, num_inference_steps=steps, guidance_scale=8.5, scheduler="lcm",
                latents=lat, generator=TorchNoise(7))
    assert ours.images.shape == ref.shape
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    assert calls == [1] * steps  # one U-Net call per step, one image: no guidance batch


def test_the_guidance_embedding_changes_the_picture(lcm_bundle, diffusers_lcm):
    """Another guidance scale draws another picture (in diffusers and here, alike)."""
    lat = latents(1)
    ref = _reference(diffusers_lcm, 4, 8.5, lat, seed=3)
    other = _reference(diffusers_lcm, 4, 2.0, lat, seed=3)
    assert psnr(other, ref) < OTHER_GUIDANCE_MAX_PSNR_DB, psnr(other, ref)
    ours = Pipeline(lcm_bundle)(PROMPT, num_inference_steps=4, guidance_scale=2.0,
                                latents=lat, generator=TorchNoise(3))
    assert psnr(ours.images, other) >= MIN_PSNR_DB


def test_bundle_records_the_lcm_defaults_and_the_input(lcm_bundle):
    from ldm_edge.export.tiny import TINY_TIME_COND_DIM
    from ldm_edge.runtime.bundle.opener import open_bundle
    from ldm_edge.runtime.request import BundleDefaults

    m = open_bundle(lcm_bundle).schema
    spec = {t.name: t for t in m.components["unet"].spec.inputs}
    assert spec["timestep_cond"].shape == ("batch", TINY_TIME_COND_DIM)
    d = BundleDefaults.from_manifest(m)
    assert (d.scheduler, d.num_inference_steps, d.guidance_scale) == ("lcm", 4, 8.5)
    assert d.guidance_embedded


def test_a_negative_prompt_is_refused_in_one_line(lcm_bundle):
    with pytest.raises(UsageError, match="LCM-distilled.*negative prompt") as e:
        Pipeline(lcm_bundle)(PROMPT, "blurry", num_inference_steps=1, seed=0)
    assert "\n" not in str(e.value)


def test_an_export_traced_without_timestep_cond_is_refused(lcm_model, tmp_path, monkeypatch):
    """The trap: diffusers skips the guidance embedding when `timestep_cond` is not passed, so
    a graph traced without it matches the same module and draws another picture."""
    from ldm_edge.export import components
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.runtime.errors import ExportError

    def forgetful(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    monkeypatch.setattr(components.GuidanceEmbedUNet, "forward", forgetful)
    out = tmp_path / "b"
    with pytest.raises(ExportError, match="does not read timestep_cond"):
        export_bundle(load_model(lcm_model), out, ExportOptions(components=("unet",)))
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("key,value", [
    ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"),
    ("num_class_embeds", 10), ("encoder_hid_dim_type", "image_proj"),
    ("attention_type", "gated"), ("dual_cross_attention", True)])
def test_every_unwired_unet_key_is_refused_by_name(key, value):
    from types import SimpleNamespace

    from ldm_edge.export.model_facts import ModelLoadError, UNWIRED_UNET_KEYS, check_unet

    assert key in UNWIRED_UNET_KEYS
    with pytest.raises(ModelLoadError, match=f"{key}={value!r}"):
        check_unet(SimpleNamespace(config={key: value}))
    check_unet(SimpleNamespace(config={"time_cond_proj_dim": 256}))  # wired: taken


def test_int8_is_calibrated_and_checked_with_the_few_step_samplers(lcm_bundle, tmp_path):
    """A few-step model's INT8 variant: calibration runs and the quality check use lcm, tcd and
    euler-a (bundletools/quality.py FEW_STEP_SCHEDULERS), the guidance embedding fed as the
    model takes it (one image a call), and every figure is recorded."""
    import shutil

    from ldm_edge.bundletools.quality import FEW_STEP_SCHEDULERS
    from ldm_edge.calibration.int8 import make_int8

    b = tmp_path / "b"
    shutil.copytree(lcm_bundle, b)
    m = make_int8(b, num_prompts=2, calib_steps=4, progress=lambda *_: None)
    q = m.quality["int8"]
    assert list(q.per_scheduler) == list(dict.fromkeys(["lcm", *FEW_STEP_SCHEDULERS]))
    assert m.components["unet"].variants["int8"].calibration.schedulers == list(q.per_scheduler)
    assert q.unet_cosine_min > MIN_INT8_UNET_COSINE, q.per_scheduler
    form = m.components["unet"].variants["int8"].forms["tensorrt"]
    assert list(form.check["per_scheduler_db"]) == list(q.per_scheduler)


def test_img2img_matches_the_lcm_img2img_pipeline(lcm_bundle, lcm_model):
    """An LCM-distilled model's image-to-image is LatentConsistencyModelImg2ImgPipeline's: all
    of the steps inside the first `strength` of the distillation schedule (599, 459, 299, 159
    for 4 steps at 0.6), not the last `strength` of the text-to-image schedule (20 dB apart)."""
    import diffusers
    from PIL import Image

    init = np.random.default_rng(5).uniform(0, 255, (1, 128, 128, 3)).astype(np.uint8)
    pipe = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(
        lcm_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = to_uint8(pipe(PROMPT, image=Image.fromarray(init[0]), strength=0.6,
                        num_inference_steps=4, guidance_scale=8.5, output_type="np",
                        generator=torch.Generator().manual_seed(11)).images)
    ours = Pipeline(lcm_bundle)
    calls = []
    ours.add_call_hook(lambda c: calls.append(float(np.ravel(c.feeds["timestep"])[0]))
                       if c.name == "unet" else None)
    out = ours(PROMPT, num_inference_steps=4, guidance_scale=8.5, init_image=init, strength=0.6,
               generator=TorchNoise(11))
    assert calls == [float(t) for t in pipe.scheduler.timesteps]
    assert psnr(out.images, ref) >= MIN_PSNR_DB, psnr(out.images, ref)


def test_a_strength_too_small_for_the_steps_is_one_line(lcm_bundle):
    init = np.zeros((1, 128, 128, 3), np.uint8)
    with pytest.raises(UsageError, match=r"--strength 0.05 keeps 2 of the model's 50") as e:
        Pipeline(lcm_bundle)(PROMPT, num_inference_steps=4, init_image=init, strength=0.05, seed=0)
    assert "\n" not in str(e.value)


# FP16 picture vs FP32 under the LCM sampler: the bar of tests/parity/test_fp16.py; measured on
# the tiny LCM model, 4 steps: 60.3 dB (AMD EPYC).
MIN_FP16_PSNR_DB = 40.0


def test_fp16_is_checked_with_the_lcm_sampler(lcm_bundle, tmp_path):
    """`ldm-export fp16` on an LCM bundle: its end-to-end check runs the model's own sampler
    (lcm, one U-Net call a step with the guidance embedding), and the variant draws."""
    import shutil

    from ldm_edge.calibration.fp16 import make_fp16

    b = tmp_path / "b"
    shutil.copytree(lcm_bundle, b)
    m = make_fp16(b, prompts=["a red cat", "a blue dog"], steps=4)
    q = m.quality["fp16"]
    assert list(q.per_scheduler) == ["lcm"] and q.psnr_db >= MIN_FP16_PSNR_DB, q.per_scheduler
    fp16 = Pipeline(b, precision="fp16")(PROMPT, num_inference_steps=4, latents=latents(0), seed=0)
    fp32 = Pipeline(b)(PROMPT, num_inference_steps=4, latents=latents(0), seed=0)
    assert fp16.provenance.precision == "fp16"
    assert psnr(fp16.images, fp32.images) >= MIN_FP16_PSNR_DB
