"""SDXL: the runtime vs diffusers' StableDiffusionXL(Img2Img|Inpaint)Pipeline on tiny random
SDXL models (export/tiny_sdxl.py), same latents and noise: base txt2img under three schedulers,
with and without a negative prompt (zero negatives), non-square, micro-conditioning; Turbo
settings; img2img; the refiner (aesthetic score); inpainting. Each case is also held to differ
from a picture drawn without what it tests, or the parity proves nothing about it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import DIFFUSERS_SCHEDULERS, TorchNoise, to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.pipeline import Pipeline

# 8-bit picture bar: only single-level rounding flips from ~1e-6 FP32 differences between
# onnxruntime and PyTorch are allowed (as tests/parity/test_pipeline_parity.py).
MIN_PSNR_DB = 50.0
# A picture drawn without the thing a case tests must land far below the bar. Measured on
# these tiny models: zero negatives vs an encoded "" 21.8 dB, default vs given time ids
# 26.0 dB, the refiner at aesthetic scores 6/2.5 vs 9/1 25.2 dB (the added embedding's last
# layer is scaled up in export/tiny_sdxl.py so that they differ this much).
OTHER_MAX_PSNR_DB = 40.0
PROMPT = "a red cat"
STEPS = 5
KINDS = ("base", "turbo", "refiner", "inpaint")


@pytest.fixture(scope="module")
def sdxl_models(tmp_path_factory):
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl")
    return {k: save_tiny_sdxl(root / k, k) for k in KINDS}


@pytest.fixture(scope="module")
def sdxl_bundles(sdxl_models, tmp_path_factory):
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    root = tmp_path_factory.mktemp("sdxl_bundles")
    out = {}
    for kind, folder in sdxl_models.items():
        out[kind] = root / kind
        export_bundle(load_model(folder), out[kind], ExportOptions())
    return out


@pytest.fixture(scope="module")
def runtimes(sdxl_bundles):
    return {k: Pipeline(b) for k, b in sdxl_bundles.items()}


_PIPES: dict = {}


def reference(folder, cls: str, scheduler: str = "euler"):
    """diffusers' ``cls`` pipeline for ``folder`` with the scheduler of that runtime name."""
    import diffusers

    key = (str(folder), cls)
    if key not in _PIPES:
        pipe = getattr(diffusers, cls).from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[key] = (pipe, dict(pipe.scheduler.config))
    pipe, saved = _PIPES[key]
    sched_cls, extra = DIFFUSERS_SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, sched_cls).from_config(saved, **extra)
    return pipe


def latents(seed: int, h: int = 128, w: int = 128, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, h // 8, w // 8), dtype=np.float32)


def _draw_ref(pipe, lat=None, seed=11, **kw) -> np.ndarray:
    if lat is not None:
        kw["latents"] = torch.from_numpy(lat)
    return to_uint8(pipe(generator=torch.Generator().manual_seed(seed), output_type="np",
                         **kw).images)


TXT2IMG_CASES = [("euler", None, 128, 128), ("ddim", "a blue dog", 128, 96),
                 ("dpm++2m", None, 96, 128), ("euler", "", 128, 128)]


@pytest.mark.parametrize("scheduler,negative,h,w", TXT2IMG_CASES)
def test_txt2img_matches_diffusers(scheduler, negative, h, w, sdxl_models, runtimes):
    """No negative prompt: zero negative embeddings (force_zeros_for_empty_prompt); an empty
    one is encoded as diffusers encodes it."""
    lat = latents(0, h, w)
    pipe = reference(sdxl_models["base"], "StableDiffusionXLPipeline", scheduler)
    kw = dict(negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=6.0,
              height=h, width=w)
    ref = _draw_ref(pipe, lat, prompt=PROMPT, **kw)
    ours = runtimes["base"](PROMPT, scheduler=scheduler, latents=lat, seed=0, **kw)
    assert ours.request.zero_negative == (negative is None)
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_the_negative_half_matters(sdxl_models, runtimes):
    """Zero negatives and an encoded empty prompt draw different pictures: the rule is tested."""
    lat = latents(0)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, scheduler="euler", latents=lat,
              seed=0)
    zero = runtimes["base"](PROMPT, **kw)
    empty = runtimes["base"](PROMPT, negative_prompt="", **kw)
    assert psnr(zero.images, empty.images) < OTHER_MAX_PSNR_DB


def test_batch_of_prompts_and_images(sdxl_models, runtimes):
    lat = latents(3, n=4)
    pipe = reference(sdxl_models["base"], "StableDiffusionXLPipeline")
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, num_images_per_prompt=2)
    prompts = ["a red cat", "a blue dog"]
    ref = _draw_ref(pipe, lat, prompt=prompts, negative_prompt=["green", "square"], **kw)
    ours = runtimes["base"](prompts, negative_prompt=["green", "square"], latents=lat,
                            scheduler="euler", seed=0, **kw)
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_micro_conditioning_matches_diffusers(sdxl_models, runtimes):
    lat = latents(1)
    pipe = reference(sdxl_models["base"], "StableDiffusionXLPipeline")
    micro = dict(original_size=(512, 384), crop_top_left=(16, 32), target_size=(256, 256))
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0)
    ref = _draw_ref(pipe, lat, prompt=PROMPT, crops_coords_top_left=micro["crop_top_left"],
                    original_size=micro["original_size"], target_size=micro["target_size"], **kw)
    ours = runtimes["base"](PROMPT, latents=lat, scheduler="euler", seed=0, **micro, **kw)
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    plain = runtimes["base"](PROMPT, latents=lat, scheduler="euler", seed=0, **kw)
    assert psnr(plain.images, ref) < OTHER_MAX_PSNR_DB
    assert ours.metadata(0)["crop_top_left"] == [16, 32]


def test_turbo_one_step_without_guidance(sdxl_models, runtimes):
    """SDXL-Turbo's settings: trailing timesteps, one step, guidance 0 (no CFG batch)."""
    lat = latents(2)
    pipe = reference(sdxl_models["turbo"], "StableDiffusionXLPipeline", "euler-a")
    ref = _draw_ref(pipe, lat, prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0)
    calls = []
    remove = runtimes["turbo"].add_call_hook(
        lambda c: calls.append(c.feeds["sample"].shape[0]) if c.name == "unet" else None)
    try:
        ours = runtimes["turbo"](PROMPT, latents=lat, scheduler="euler-a", num_inference_steps=1,
                                 guidance_scale=0.0, generator=TorchNoise(11))
    finally:
        remove()
    assert calls == [1]
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def _init(seed: int = 5, size: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (1, size, size, 3)).astype(np.uint8)


@pytest.mark.parametrize("scheduler", ["euler", "euler-a"])
def test_img2img_matches_diffusers(scheduler, sdxl_models, runtimes):
    from PIL import Image

    init = _init()
    pipe = reference(sdxl_models["base"], "StableDiffusionXLImg2ImgPipeline", scheduler)
    kw = dict(strength=0.6, num_inference_steps=STEPS, guidance_scale=6.0)
    ref = _draw_ref(pipe, prompt=PROMPT, image=Image.fromarray(init[0]), **kw)
    ours = runtimes["base"](PROMPT, init_image=init, scheduler=scheduler,
                            generator=TorchNoise(11), **kw)
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_refiner_on_a_base_picture(sdxl_models, runtimes):
    """The refiner: the second text encoder only; time ids end with the aesthetic score (6.0,
    and 2.5 for the unconditioned half, diffusers' defaults), given or not."""
    from PIL import Image

    init = _init(6)
    pipe = reference(sdxl_models["refiner"], "StableDiffusionXLImg2ImgPipeline")
    kw = dict(strength=0.3, num_inference_steps=10, guidance_scale=6.0)
    for scores in ({}, {"aesthetic_score": 9.0, "negative_aesthetic_score": 1.0}):
        ref = _draw_ref(pipe, prompt=PROMPT, image=Image.fromarray(init[0]), **scores, **kw)
        ours = runtimes["refiner"](PROMPT, init_image=init, scheduler="euler",
                                   generator=TorchNoise(11), **scores, **kw)
        assert psnr(ours.images, ref) >= MIN_PSNR_DB, (scores, psnr(ours.images, ref))
    assert ours.request.aesthetic_score == 9.0
    plain = runtimes["refiner"](PROMPT, init_image=init, scheduler="euler",
                                generator=TorchNoise(11), **kw)
    assert psnr(plain.images, ours.images) < OTHER_MAX_PSNR_DB


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpaint_matches_diffusers(strength, sdxl_models, runtimes):
    from PIL import Image

    init = _init(7)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 40:100] = 255
    lat = latents(4)
    given = {"latents": lat} if strength == 1.0 else {}
    pipe = reference(sdxl_models["inpaint"], "StableDiffusionXLInpaintPipeline")
    kw = dict(strength=strength, num_inference_steps=STEPS, guidance_scale=6.0)
    ref = _draw_ref(pipe, given.get("latents"), prompt=PROMPT, image=Image.fromarray(init[0]),
                    mask_image=Image.fromarray(mask), **kw)
    ours = runtimes["inpaint"](PROMPT, init_image=init, mask=mask[None], scheduler="euler",
                               generator=TorchNoise(11), **given, **kw)
    assert ours.request.task == "inpaint"
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_micro_conditioning_is_refused_where_it_does_not_apply(runtimes):
    with pytest.raises(UsageError, match="--aesthetic-score is the SDXL refiner's"):
        runtimes["base"].request(prompt=PROMPT, aesthetic_score=6.0)
    with pytest.raises(UsageError, match="--original-size takes two whole numbers"):
        runtimes["base"].request(prompt=PROMPT, original_size=(512,))
    with pytest.raises(UsageError, match="--crop-top-left -1 0"):
        runtimes["base"].request(prompt=PROMPT, crop_top_left=(-1, 0))


def test_manifest_records_the_second_encoder(runtimes):
    base, refiner = runtimes["base"].manifest, runtimes["refiner"].manifest
    assert base.schema.tokenizer_2.pad_token == "!"
    assert base.schema.added_conditioning.force_zeros_for_empty_prompt
    assert refiner.schema.added_conditioning.requires_aesthetics_score
    assert not refiner.has("text_encoder") and refiner.schema.tokenizer is None
    spec = base.spec("unet")
    assert [t.name for t in spec.inputs][-2:] == ["text_embeds", "time_ids"]
    assert base.spec("text_encoder_2").output_names == ["penultimate_hidden_state",
                                                         "text_embeds"]


# FP16 picture vs FP32 (the VAE kept FP32): the bar of tests/parity/test_fp16.py; measured on
# the tiny SDXL: 61.1 dB, 60.8 with the VAE converted too (AMD EPYC).
MIN_FP16_PSNR_DB = 40.0
# INT8 U-Net output vs FP32's on the FP32 trajectory, every step of every scheduler checked:
# the bar of tests/parity/test_int8.py (MIN_UNET_COSINE, its reasons); random weights make the
# picture PSNR noise-like. Measured on the tiny SDXL, 4 steps, added embedding kept float:
# >= 0.9987 under euler, ddim, dpm++2m (pictures 44.9, 28.9, 47.4 dB; with the added embedding
# quantised the cosine fell to 0.9948; AMD EPYC, VNNI).
MIN_INT8_UNET_COSINE = 0.995


@pytest.mark.parametrize("force_upcast", [True, False])
def test_fp16_keeps_an_upcast_vae_fp32(force_upcast, sdxl_bundles, tmp_path):
    """SDXL's VAE overflows in FP16 (its config's force_upcast): the FP16 variant keeps it FP32
    unless the model's VAE says otherwise (an fp16-fixed VAE)."""
    import json
    import shutil

    from ldm_edge.calibration.fp16 import make_fp16

    b = tmp_path / "b"
    shutil.copytree(sdxl_bundles["base"], b)
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["vae_force_upcast"] is True
    manifest["vae_force_upcast"] = force_upcast
    (b / "manifest.json").write_text(json.dumps(manifest))
    m = make_fp16(b, prompts=["a red cat", "a blue dog"], steps=4)
    kept = m.quality["fp16"].components_kept_fp32
    assert ("vae_decoder" in kept and "vae_encoder" in kept) == force_upcast
    assert "fp16" in m.components["text_encoder_2"].variants
    assert m.quality["fp16"].psnr_db >= MIN_FP16_PSNR_DB


def test_int8_keeps_the_added_embedding_float(sdxl_bundles, tmp_path):
    import shutil

    from ldm_edge.calibration.int8 import make_int8

    b = tmp_path / "b"
    shutil.copytree(sdxl_bundles["base"], b)
    m = make_int8(b, num_prompts=2, calib_steps=4, progress=lambda *_: None)
    variant, q = m.components["unet"].variants["int8"], m.quality["int8"]
    assert any("/add_embedding/" in n for n in variant.excluded_nodes["time embedding"])
    assert set(q.per_scheduler) >= {"euler", "ddim", "dpm++2m"}
    assert q.unet_cosine_min >= MIN_INT8_UNET_COSINE, q.per_scheduler
    int8 = Pipeline(b, precision="int8")(PROMPT, num_inference_steps=4, scheduler="euler",
                                          latents=latents(0), seed=0)
    assert int8.provenance.precision == "int8"


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
def test_base_then_refiner_hand_over_latents(scheduler, sdxl_models, runtimes):
    """SDXL's ensemble of experts: the base stops at denoising_end and hands its latents (no
    VAE) to the refiner, which runs the rest of the same schedule from denoising_start."""
    lat = latents(8)
    kw = dict(num_inference_steps=10, guidance_scale=6.0)
    base = reference(sdxl_models["base"], "StableDiffusionXLPipeline", scheduler)
    handed = base(PROMPT, latents=torch.from_numpy(lat), denoising_end=0.7,
                  output_type="latent", **kw).images
    refiner = reference(sdxl_models["refiner"], "StableDiffusionXLImg2ImgPipeline", scheduler)
    ref = _draw_ref(refiner, prompt=PROMPT, image=handed, denoising_start=0.7, **kw)
    first = runtimes["base"](PROMPT, latents=lat, scheduler=scheduler, seed=0,
                             denoising_end=0.7, decode=False, **kw)
    assert first.images is None and first.timings.steps == 7
    assert np.abs(first.latents - handed.numpy()).max() < 1e-3
    ours = runtimes["refiner"](PROMPT, latents=first.latents, scheduler=scheduler, seed=0,
                               denoising_start=0.7, **kw)
    assert ours.request.task == "text-to-image" and ours.timings.steps == 3
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_denoising_fractions_are_checked(runtimes):
    with pytest.raises(UsageError, match="--denoising-end 1.5 must be a fraction"):
        runtimes["base"].request(prompt=PROMPT, denoising_end=1.5)
    with pytest.raises(UsageError, match="--denoising-start continues another model's"):
        runtimes["refiner"].request(prompt=PROMPT, denoising_start=0.7)


def test_turbo_with_a_tiny_vae_matches_diffusers(sdxl_models, tmp_path):
    """SDXL-Turbo with TAESDXL's architecture (`--tiny-vae`, `--vae tiny`): one step, no
    guidance, decoded by the tiny VAE, as StableDiffusionXLPipeline(vae=AutoencoderTiny)."""
    import diffusers

    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import attach_tiny_vae, load_model
    from ldm_edge.export.tiny import save_tiny_taesd

    taesd = save_tiny_taesd(tmp_path / "taesd")
    bundle = tmp_path / "bundle"
    export_bundle(attach_tiny_vae(load_model(sdxl_models["turbo"]), taesd), bundle,
                  ExportOptions(components=("text_encoder", "unet", "vae_decoder")))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        sdxl_models["turbo"], vae=diffusers.AutoencoderTiny.from_pretrained(taesd))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    lat = latents(2)
    ref = _draw_ref(pipe, lat, prompt=PROMPT, num_inference_steps=1, guidance_scale=0.0)
    ours = Pipeline(bundle, vae="tiny")(PROMPT, latents=lat, scheduler="euler-a",
                                        num_inference_steps=1, guidance_scale=0.0,
                                        generator=TorchNoise(11))
    assert ours.provenance.vae == "tiny"
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_distilled_layout_matches_diffusers(tmp_path):
    """SSD-1B / Segmind-Vega's layout (attention depths that differ within a block and between
    the down and up paths, export/tiny_sdxl.py "distilled") exports and draws as diffusers."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

    folder = save_tiny_sdxl(tmp_path / "model", "distilled")
    export_bundle(load_model(folder), tmp_path / "bundle", ExportOptions())
    lat = latents(4, 128, 96)
    kw = dict(num_inference_steps=STEPS, guidance_scale=6.0, height=128, width=96)
    ref = _draw_ref(reference(folder, "StableDiffusionXLPipeline"), lat, prompt=PROMPT, **kw)
    ours = Pipeline(tmp_path / "bundle")(PROMPT, scheduler="euler", latents=lat, seed=0, **kw)
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
