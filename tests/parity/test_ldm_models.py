"""The LDM paper's own layouts on tiny random models built here:
LDMTextToImagePipeline (LDM-BERT, VQ-f8 autoencoder, UNet2DConditionModel), LDMPipeline
(unconditional, VQ-f4 autoencoder, UNet2DModel), LDMSuperResolutionPipeline (x4, the
low-resolution image concatenated to the latents) and StableDiffusionInpaintPipeline (a
9-channel U-Net) and StableDiffusionUpscalePipeline (the SD x4 upscaler).

Each component against PyTorch (the export check, run again here), the VQ decoder graph's
codebook look-up against diffusers' VQModel.decode, and the runtime against diffusers' own
pipeline from the same latents (LDMPipeline takes none: the same torch noise source).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import TorchNoise
from helpers import run_cli, to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline

# 8-bit image PSNR bar of the runtime issue: only single-level rounding flips caused by
# ~1e-6 FP32 differences between onnxruntime and PyTorch are allowed (measured: 84-89 dB).
MIN_PSNR_DB = 50.0
# other starting noise must land far below the bar, or the comparison proves nothing
UNRELATED_MAX_PSNR_DB = 30.0
STEPS = 8
PROMPT = "a red cat"
# ddim and one more; both have init_noise_sigma 1 and an identity scale_model_input, which
# LDMTextToImagePipeline leaves out (the runtime applies them, as for every model)
SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}


def report(what: str, value: float) -> None:
    """The measured figure, for docs/paper-models.md (`pytest ... -s | grep "PSNR "`)."""
    print(f"\nPSNR {what}: {value:.1f} dB")


def diffusers_ldm(folder, scheduler: str):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def runtimes(ldm_bundles):
    return {fam: Pipeline(path) for fam, path in ldm_bundles.items()}


@pytest.mark.parametrize("family,task,components", [
    ("ldm-bert", "text-to-image", {"text_encoder", "unet", "vae_decoder"}),
    ("ldm-uncond", "unconditional", {"unet", "vae_decoder"}),
    ("inpaint", "inpaint", {"text_encoder", "unet", "vae_decoder", "vae_encoder"}),
    ("ldm-sr", "super-resolution", {"unet", "vae_decoder"}),
    ("upscale", "upscale", {"text_encoder", "unet", "vae_decoder"}),
])
def test_manifest_records_family_task_and_components(family, task, components, ldm_bundles):
    from ldm_edge.runtime.bundle.opener import open_bundle

    m = open_bundle(ldm_bundles[family]).schema
    assert (m.model.family, m.task) == ({"inpaint": "sd1", "upscale": "sd1"}.get(family, family),
                                        task)
    assert set(m.components) == components
    if family == "upscale":  # latents 4 + noised low-resolution image 3; noise level input
        assert m.components["unet"].spec.input("sample").shape[1] == 7
        assert m.components["unet"].spec.input_names[-1] == "noise_level"
        assert m.upscaler["max_noise_level"] == 350 and m.scaling_factor == 0.08333
    elif family == "ldm-sr":  # latents 3 + low-resolution image 3; decoded unscaled
        assert m.components["unet"].spec.input("sample").shape[1] == 6
        assert m.scaling_factor == 1.0 and m.tokenizer is None
    elif family == "ldm-uncond":
        assert m.tokenizer is None and not (ldm_bundles[family] / "tokenizer.json").exists()
        assert "encoder_hidden_states" not in m.components["unet"].spec.input_names
    elif family == "inpaint":  # latents 4 + mask 1 + masked-image latents 4
        assert m.components["unet"].spec.input("sample").shape[1] == 9
    else:  # LDM-BERT is called without a mask by the paper's code and by diffusers
        assert m.components["text_encoder"].spec.input_names == ["input_ids"]
        assert m.tokenizer.max_length == 77 and m.tokenizer.pad_token == "[PAD]"
    for rec in m.components.values():
        assert rec.variants["fp32"].parity["passed"] is True, rec.variants["fp32"].parity


@pytest.mark.parametrize("family", ["ldm-bert", "ldm-uncond", "inpaint", "ldm-sr", "upscale"])
def test_each_component_matches_pytorch(family, ldm_models, ldm_bundles):
    from ldm_edge.export.load import load_model
    from ldm_edge.export.onnx_export import check_component
    from ldm_edge.runtime.bundle.opener import open_bundle

    model = load_model(ldm_models[family])
    m = open_bundle(ldm_bundles[family])
    for name in m.component_names:
        results = check_component(model, m.spec(name), m.variant(name, "fp32").path)
        assert len(results) == 2 and all(results), [str(r) for r in results]


def test_vq_decoder_graph_without_the_codebook_look_up_fails_the_check(ldm_models, ldm_bundles,
                                                                       tmp_path):
    """The check is against VQModel.decode (which quantizes): a decoder graph that skips the
    nearest-code look-up must fail it, or the check proves nothing about the look-up."""
    from ldm_edge.export.load import load_model
    from ldm_edge.export.onnx_export import check_component
    from ldm_edge.runtime.bundle.opener import open_bundle

    model = load_model(ldm_models["ldm-uncond"])
    spec = open_bundle(ldm_bundles["ldm-uncond"]).spec("vae_decoder")

    class NoLookUp(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent, force_not_quantize=True, return_dict=False)[0]

    path = tmp_path / "vae_decoder.onnx"
    with torch.no_grad():
        torch.onnx.export(NoLookUp(model.vae).eval(), (torch.zeros(1, 3, 16, 16),), str(path),
                          dynamo=False, input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=18)
    assert not any(check_component(model, spec, path))


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_ldm_bert_text_to_image_matches_diffusers(scheduler, ldm_models, runtimes):
    pipe = diffusers_ldm(ldm_models["ldm-bert"], scheduler)
    lat = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    ref = to_uint8(pipe(PROMPT, guidance_scale=3.0, num_inference_steps=STEPS,
                        latents=torch.from_numpy(lat), output_type="np").images)
    ours = runtimes["ldm-bert"](PROMPT, guidance_scale=3.0, num_inference_steps=STEPS,
                                scheduler=scheduler, latents=lat, seed=0)
    assert ours.images.shape == ref.shape == (1, 128, 128, 3)
    report(f"ldm-bert text-to-image {scheduler} vs LDMTextToImagePipeline", psnr(ours.images, ref))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    other = runtimes["ldm-bert"](PROMPT, guidance_scale=3.0, num_inference_steps=STEPS,
                                 scheduler=scheduler, seed=1)
    assert psnr(other.images, ref) < UNRELATED_MAX_PSNR_DB


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_unconditional_matches_diffusers(scheduler, ldm_models, runtimes):
    """LDMPipeline takes no latents: both draw them from torch's generator, seed 3."""
    pipe = diffusers_ldm(ldm_models["ldm-uncond"], scheduler)
    ref = to_uint8(pipe(batch_size=2, num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(3), output_type="np").images)
    ours = runtimes["ldm-uncond"](num_images_per_prompt=2, num_inference_steps=STEPS,
                                  scheduler=scheduler, generator=TorchNoise(3))
    assert ours.images.shape == ref.shape == (2, 64, 64, 3)
    report(f"unconditional {scheduler} vs LDMPipeline", psnr(ours.images, ref))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    other = runtimes["ldm-uncond"](num_images_per_prompt=2, num_inference_steps=STEPS,
                                   scheduler=scheduler, generator=TorchNoise(4))
    assert psnr(other.images, ref) < UNRELATED_MAX_PSNR_DB


def test_task_unconditional_on_a_text_model_is_the_empty_prompt_unguided(ldm_models, runtimes):
    """--task unconditional on LDM-BERT: diffusers' pipeline with prompt "" and guidance 1."""
    pipe = diffusers_ldm(ldm_models["ldm-bert"], "ddim")
    lat = np.random.default_rng(2).standard_normal((1, 4, 16, 16), dtype=np.float32)
    ref = to_uint8(pipe("", guidance_scale=1.0, num_inference_steps=STEPS,
                        latents=torch.from_numpy(lat), output_type="np").images)
    ours = runtimes["ldm-bert"](task="unconditional", num_inference_steps=STEPS,
                                scheduler="ddim", latents=lat, seed=0)
    report("ldm-bert --task unconditional ddim vs LDMTextToImagePipeline('')",
           psnr(ours.images, ref))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB


def test_ldm_export_and_ldm_run_without_a_prompt(ldm_models, tmp_path):
    """The commands as a user types them: export the LDMPipeline folder, sample with no prompt."""
    bundle, out = tmp_path / "uncond", tmp_path / "out.png"
    r = run_cli("-m", "ldm_edge.export.cli", "onnx", str(ldm_models["ldm-uncond"]), "-o", str(bundle))
    assert r.returncode == 0, r.stderr[-1500:]
    assert json.loads((bundle / "manifest.json").read_text())["task"] == "unconditional"
    r = run_cli("-m", "ldm_edge.runtime", str(bundle), "--steps", "3", "--seed", "5",
                "--num-images", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "unet (3 steps)" in r.stderr  # the timing table
    from PIL import Image

    for i in range(2):
        with Image.open(tmp_path / f"out-{i}.png") as im:
            meta = json.loads(im.text["ldm-edge"])
            assert im.size == (64, 64)
        assert (meta["task"], meta["seed"], meta["prompt"]) == ("unconditional", 5, "")


def _inpaint_inputs():
    rng = np.random.default_rng(5)
    init = rng.uniform(0, 255, (1, 128, 128, 3)).astype(np.uint8)
    mask = np.zeros((1, 128, 128), np.uint8)
    mask[:, 32:96, 40:100] = 255
    return init, mask


# inpainting: ddim from given latents (strength 1, diffusers' default) and euler-a below
# strength 1 (the image's latents noised; its noise from the same torch source)
INPAINT_CASES = [("ddim", 1.0), ("euler-a", 0.6)]


@pytest.mark.parametrize("scheduler,strength", INPAINT_CASES)
def test_inpaint_matches_diffusers(scheduler, strength, ldm_models, runtimes):
    from helpers import diffusers_pipeline
    from PIL import Image

    import diffusers

    init, mask = _inpaint_inputs()
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        ldm_models["inpaint"], safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers_pipeline(ldm_models["inpaint"], scheduler).scheduler
    pipe.set_progress_bar_config(disable=True)
    lat = np.random.default_rng(6).standard_normal((1, 4, 16, 16), dtype=np.float32)
    given = {"latents": lat} if strength == 1.0 else {}
    ref = to_uint8(pipe(PROMPT, image=Image.fromarray(init[0]),
                        mask_image=Image.fromarray(mask[0]), strength=strength,
                        num_inference_steps=STEPS, guidance_scale=6.0,
                        generator=torch.Generator().manual_seed(11), output_type="np",
                        **{k: torch.from_numpy(v) for k, v in given.items()}).images)
    kw = dict(init_image=init, mask=mask, strength=strength, num_inference_steps=STEPS,
              guidance_scale=6.0, scheduler=scheduler)
    ours = runtimes["inpaint"](PROMPT, generator=TorchNoise(11), **kw, **given)
    assert ours.request.task == "inpaint"
    report(f"inpaint {scheduler} strength {strength} vs StableDiffusionInpaintPipeline",
           psnr(ours.images, ref))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    other_mask = np.zeros_like(mask)
    other_mask[:, :64] = 255
    other = runtimes["inpaint"](PROMPT, generator=TorchNoise(12),
                                **{**kw, "mask": other_mask}, **given)
    assert psnr(other.images, ref) < UNRELATED_MAX_PSNR_DB


def test_inpaint_from_files_on_the_command_line(ldm_bundles, tmp_path):
    """ldm-run BUNDLE -p ... --init-image photo.png --mask mask.png, as a user types it."""
    from PIL import Image

    init, mask = _inpaint_inputs()
    Image.fromarray(init[0]).save(tmp_path / "photo.png")
    Image.fromarray(mask[0]).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    r = run_cli("-m", "ldm_edge.runtime", str(ldm_bundles["inpaint"]), "-p", PROMPT,
                "--init-image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"),
                "--steps", "3", "--seed", "1", "-o", str(out))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "vae encoder" in r.stderr  # the timing table has the masked image's encoding
    with Image.open(out) as im:
        meta = json.loads(im.text["ldm-edge"])
    assert meta["task"] == "inpaint" and meta["mask"]["source"] == "mask.png"
    ours = Pipeline(ldm_bundles["inpaint"])(PROMPT, init_image=init, mask=mask, seed=1,
                                            num_inference_steps=3)
    assert psnr(np.asarray(Image.open(out))[None], ours.images) >= MIN_PSNR_DB


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_super_resolution_matches_diffusers(scheduler, ldm_models, runtimes):
    """LDMSuperResolutionPipeline takes no latents: both draw them from torch's generator."""
    from PIL import Image

    low = np.random.default_rng(5).uniform(0, 255, (1, 32, 32, 3)).astype(np.uint8)
    pipe = diffusers_ldm(ldm_models["ldm-sr"], scheduler)
    ref = to_uint8(pipe(Image.fromarray(low[0]), num_inference_steps=STEPS,
                        generator=torch.Generator().manual_seed(3), output_type="np").images)
    ours = runtimes["ldm-sr"](init_image=low, num_inference_steps=STEPS, scheduler=scheduler,
                              generator=TorchNoise(3))
    assert ours.images.shape == ref.shape == (1, 128, 128, 3)  # x4
    report(f"super-resolution {scheduler} vs LDMSuperResolutionPipeline", psnr(ours.images, ref))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    other = runtimes["ldm-sr"](init_image=low, num_inference_steps=STEPS, scheduler=scheduler,
                               generator=TorchNoise(4))
    assert psnr(other.images, ref) < UNRELATED_MAX_PSNR_DB


def test_super_resolution_on_the_command_line(ldm_bundles, tmp_path):
    from PIL import Image

    low = np.random.default_rng(8).uniform(0, 255, (32, 64, 3)).astype(np.uint8)
    Image.fromarray(low).save(tmp_path / "low.png")
    r = run_cli("-m", "ldm_edge.runtime", str(ldm_bundles["ldm-sr"]), "--init-image",
                str(tmp_path / "low.png"), "--steps", "3", "-o", str(tmp_path / "up.png"))
    assert r.returncode == 0, r.stderr[-1500:]
    with Image.open(tmp_path / "up.png") as im:
        assert im.size == (256, 128)
        assert json.loads(im.text["ldm-edge"])["task"] == "super-resolution"


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_sd_x4_upscaler_matches_diffusers(scheduler, ldm_models, runtimes):
    """The same latents; the low-resolution image's noise from the same torch source."""
    from helpers import diffusers_pipeline
    from PIL import Image

    import diffusers

    low = np.random.default_rng(5).uniform(0, 255, (1, 32, 32, 3)).astype(np.uint8)
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(ldm_models["upscale"])
    pipe.scheduler = diffusers_pipeline(ldm_models["inpaint"], scheduler).scheduler.__class__\
        .from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    lat = np.random.default_rng(6).standard_normal((1, 4, 32, 32), dtype=np.float32)
    ref = to_uint8(pipe(PROMPT, image=Image.fromarray(low[0]), noise_level=40,
                        num_inference_steps=STEPS, guidance_scale=6.0,
                        latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(11),
                        output_type="np").images)
    kw = dict(init_image=low, num_inference_steps=STEPS, guidance_scale=6.0, scheduler=scheduler)
    ours = runtimes["upscale"](PROMPT, noise_level=40, latents=lat, generator=TorchNoise(11), **kw)
    assert ours.images.shape == ref.shape == (1, 128, 128, 3)  # x4
    report(f"SD x4 upscaler {scheduler} vs StableDiffusionUpscalePipeline",
           psnr(ours.images, ref))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    other_lat = np.random.default_rng(7).standard_normal((1, 4, 32, 32), dtype=np.float32)
    other = runtimes["upscale"](PROMPT, noise_level=40, latents=other_lat,
                                generator=TorchNoise(12), **kw)
    assert psnr(other.images, ref) < UNRELATED_MAX_PSNR_DB, psnr(other.images, ref)


def test_sd_x4_upscaler_on_the_command_line(ldm_bundles, tmp_path):
    from PIL import Image

    low = np.random.default_rng(8).uniform(0, 255, (32, 48, 3)).astype(np.uint8)
    Image.fromarray(low).save(tmp_path / "low.png")
    r = run_cli("-m", "ldm_edge.runtime", str(ldm_bundles["upscale"]), "-p", PROMPT,
                "--init-image", str(tmp_path / "low.png"), "--noise-level", "30", "--steps", "3",
                "-o", str(tmp_path / "up.png"))
    assert r.returncode == 0, r.stderr[-1500:]
    with Image.open(tmp_path / "up.png") as im:
        assert im.size == (192, 128)
        meta = json.loads(im.text["ldm-edge"])
    assert (meta["task"], meta["noise_level"]) == ("upscale", 30)


def test_ldm_bert_with_a_kl_autoencoder(tmp_path):
    """The released LDM-KL-8-G text-to-image model keeps an AutoencoderKL under vqvae/."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny import save_tiny_ldm
    from ldm_edge.runtime.bundle.opener import open_bundle

    folder = save_tiny_ldm(tmp_path / "kl", "ldm-bert", autoencoder="kl")
    export_bundle(load_model(folder), tmp_path / "b", ExportOptions(components=(
        "text_encoder", "unet", "vae_decoder")))
    assert open_bundle(tmp_path / "b").schema.model.family == "ldm-bert"
    pipe = diffusers_ldm(folder, "ddim")
    lat = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    ref = to_uint8(pipe(PROMPT, guidance_scale=3.0, num_inference_steps=STEPS,
                        latents=torch.from_numpy(lat), output_type="np").images)
    ours = Pipeline(tmp_path / "b")(PROMPT, guidance_scale=3.0, num_inference_steps=STEPS,
                                    scheduler="ddim", latents=lat, seed=0)
    report("ldm-bert with AutoencoderKL ddim vs LDMTextToImagePipeline", psnr(ours.images, ref))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB
    other = Pipeline(tmp_path / "b")(PROMPT, guidance_scale=3.0, num_inference_steps=STEPS,
                                     scheduler="ddim", seed=1)
    assert psnr(other.images, ref) < UNRELATED_MAX_PSNR_DB
