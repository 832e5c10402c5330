"""TAESD (diffusers' AutoencoderTiny) as the bundle's tiny VAE: exported beside the full VAE
(`ldm-export onnx --tiny-vae DIR`) or as a model's only one, and drawn with `vae="tiny"`
against diffusers' StableDiffusion(Img2Img)Pipeline given the same AutoencoderTiny."""

from __future__ import annotations

import json
import shutil

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
# The full VAE's picture of the same latents, and the tiny VAE's with the SD VAE's scaling
# factor (0.18215) wrongly applied, must land far under the bar, or the parity proves nothing
# about which decoder ran or how its latents were scaled. Measured on the tiny models (the
# parity itself: 84 dB txt2img, 89 dB img2img, 82 dB TAESD-only): the full VAE's picture
# 8.7 dB from the tiny one's, the wrong scaling 14.3 dB; an img2img that draws posterior noise
# for the tiny encoder's latents (as for the full VAE's) 18.5 dB.
OTHER_PICTURE_MAX_PSNR_DB = 30.0
# FP16 vs FP32 end to end, as tests/parity/test_fp16.py: 40 dB is an RMS error of 2.6 levels
# (the same picture); a broken FP16 graph lands near the 10-20 dB of unrelated pictures.
FP16_MIN_PSNR_DB = 40.0
STEPS = 6
PROMPT = "a red cat"


def latents(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)


@pytest.fixture(scope="module")
def taesd(taesd_models):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(taesd_models["taesd"]).eval()


def _diffusers(cls_name: str, folder, **kw):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, **kw)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _txt2img_reference(pipe, lat):
    return to_uint8(pipe(PROMPT, negative_prompt="blurry", num_inference_steps=STEPS,
                         guidance_scale=7.5, latents=torch.from_numpy(lat),
                         output_type="np").images)


def _ours(bundle, lat, **kw):
    return Pipeline(bundle, **kw)(PROMPT, "blurry", num_inference_steps=STEPS,
                                  guidance_scale=7.5, scheduler="ddim", latents=lat)


def test_txt2img_with_the_tiny_vae_matches_diffusers(tiny_models, taesd_bundles, taesd):
    lat = latents(0)
    ref = _txt2img_reference(_diffusers("StableDiffusionPipeline", tiny_models["sd1"],
                                        vae=taesd), lat)
    ours = _ours(taesd_bundles["beside"], lat, vae="tiny")
    assert ours.images.shape == ref.shape == (1, 128, 128, 3)
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    assert ours.metadata(0)["vae"] == "tiny"
    full = _ours(taesd_bundles["beside"], lat)  # the default: the model's own VAE
    assert full.metadata(0)["vae"] == "full"
    assert psnr(full.images, ref) < OTHER_PICTURE_MAX_PSNR_DB, psnr(full.images, ref)
    np.testing.assert_array_equal(full.latents, ours.latents)  # one U-Net, one loop


def test_a_wrong_latent_scaling_misses_the_bar(tiny_models, taesd_bundles, taesd, tmp_path):
    """The planted bug: the tiny decoder fed latents divided by the SD VAE's scaling factor
    (as the full decoder's are) draws another picture."""
    b = tmp_path / "b"
    shutil.copytree(taesd_bundles["beside"], b)
    m = json.loads((b / "manifest.json").read_text())
    m["tiny_vae"]["scaling_factor"] = m["scaling_factor"]
    (b / "manifest.json").write_text(json.dumps(m))
    lat = latents(0)
    ref = _txt2img_reference(_diffusers("StableDiffusionPipeline", tiny_models["sd1"],
                                        vae=taesd), lat)
    wrong = _ours(b, lat, vae="tiny")
    assert psnr(wrong.images, ref) < OTHER_PICTURE_MAX_PSNR_DB, psnr(wrong.images, ref)


def test_img2img_with_the_tiny_encoder_matches_diffusers(tiny_models, taesd_bundles, taesd):
    """diffusers' retrieve_latents takes AutoencoderTiny's latents as they are, drawing no
    noise for them: the img2img noise that follows is then the generator's first draw, here
    as there."""
    from PIL import Image

    init = np.random.default_rng(5).uniform(0, 255, (1, 128, 128, 3)).astype(np.uint8)
    pipe = _diffusers("StableDiffusionImg2ImgPipeline", tiny_models["sd1"], vae=taesd)
    ref = to_uint8(pipe(PROMPT, image=Image.fromarray(init[0]), strength=0.6,
                        num_inference_steps=STEPS, guidance_scale=6.0,
                        generator=torch.Generator().manual_seed(11), output_type="np").images)
    ours = Pipeline(taesd_bundles["beside"], vae="tiny")(
        PROMPT, num_inference_steps=STEPS, guidance_scale=6.0, scheduler="ddim",
        init_image=init, strength=0.6, generator=TorchNoise(11))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_a_model_whose_only_vae_is_taesd(taesd_models, taesd_bundles):
    """A folder whose vae/ is an AutoencoderTiny loads as it is: the tiny VAE is the bundle's
    only one, the default, and `--vae full` is refused in one line."""
    from ldm_edge.runtime.bundle.opener import open_bundle

    m = open_bundle(taesd_bundles["only"]).schema
    assert "vae_decoder" not in m.components and "vae_decoder_tiny" in m.components
    assert (m.scaling_factor, m.tiny_vae.scaling_factor) == (1.0, 1.0)
    lat = latents(2)
    ref = _txt2img_reference(_diffusers("StableDiffusionPipeline", taesd_models["only"]), lat)
    ours = _ours(taesd_bundles["only"], lat)
    assert ours.metadata(0)["vae"] == "tiny"
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    with pytest.raises(UsageError, match="only VAE is the tiny one") as e:
        Pipeline(taesd_bundles["only"], vae="full")
    assert "\n" not in str(e.value)


def test_the_preview_hook_decodes_with_the_tiny_vae(taesd_bundles, tmp_path):
    from PIL import Image

    from ldm_edge.runtime.preview import Preview

    pipe = Pipeline(taesd_bundles["beside"])
    preview = Preview(pipe, tmp_path / "p.png", every=2)
    pipe.add_step_hook(preview)
    calls = []
    pipe.add_call_hook(lambda c: calls.append(c.name) if c.name.startswith("vae") else None)
    pipe(["a red cat", "a blue dog"], num_inference_steps=5, scheduler="ddim", seed=0)
    assert preview.written == 2  # steps 2 and 4
    assert calls == ["vae_decoder_tiny", "vae_decoder_tiny", "vae_decoder"]
    with Image.open(tmp_path / "p.png") as im:
        assert im.size == (256, 128)  # the two images side by side


def test_a_tiny_vae_that_cannot_work_is_refused(tiny_models, taesd_models, tmp_path):
    from ldm_edge.export.load import attach_tiny_vae, load_model
    from ldm_edge.export.model_facts import ModelLoadError
    from ldm_edge.export.tiny import tiny_taesd

    model = load_model(tiny_models["sd1"])
    with pytest.raises(ModelLoadError, match="not an AutoencoderTiny"):
        attach_tiny_vae(model, tiny_models["sd1"] / "vae")  # an AutoencoderKL
    with pytest.raises(ModelLoadError, match="no config.json"):
        attach_tiny_vae(model, tmp_path)
    tiny_taesd(latent_channels=3).save_pretrained(tmp_path / "c3")
    with pytest.raises(ModelLoadError, match="3 latent channels at 1/8 scale, the model's "
                                             "VAE has 4 at 1/8: not its latent space"):
        attach_tiny_vae(model, tmp_path / "c3")
    with pytest.raises(ModelLoadError, match="already an AutoencoderTiny"):
        attach_tiny_vae(load_model(taesd_models["only"]), taesd_models["taesd"])


def test_fp16_converts_the_tiny_vae(taesd_bundles, tmp_path):
    """`ldm-export fp16` converts every component of the bundle: the tiny VAE's graphs get
    their samples from the full decoder's captured latents at the tiny VAE's scaling."""
    from ldm_edge.calibration import fp16

    b = tmp_path / "b"
    shutil.copytree(taesd_bundles["beside"], b)
    fp16.make_fp16(b, ["a red cat"], steps=2)
    ref = Pipeline(b, vae="tiny")(PROMPT, num_inference_steps=STEPS, seed=3)
    var = Pipeline(b, vae="tiny", precision="fp16")
    ours = var(PROMPT, num_inference_steps=STEPS, seed=3)
    assert {n: var.backend(n).precision for n in ("vae_decoder_tiny", "vae_encoder_tiny")} \
        == {"vae_decoder_tiny": "fp16", "vae_encoder_tiny": "fp16"}
    assert not np.array_equal(ours.images, ref.images)  # the FP16 path really ran
    assert psnr(ours.images, ref.images) >= FP16_MIN_PSNR_DB, psnr(ours.images, ref.images)
