"""The runtime's TCD sampler vs diffusers' StableDiffusion(Img2Img)Pipeline with TCDScheduler,
same latents and noise (the scheduler alone against diffusers: tests/unit/test_schedulers.py).

The runtime's tcd samples at eta 0.3, TCDScheduler.step's default; diffusers' Stable Diffusion
pipelines hand the scheduler their own eta (default 0.0), so the reference is called with
eta=0.3. The runtime draws its noise from a torch-backed source (conftest.TorchNoise) in the
order diffusers draws it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TorchNoise
from helpers import diffusers_pipeline, to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline

# The bars of test_pipeline_parity.py, for its reasons: only single-level rounding flips from
# ~1e-6 FP32 differences between onnxruntime and PyTorch may separate the two pictures, and
# unrelated noise must land far below that or the comparison proves nothing.
MIN_PSNR_DB = 50.0
UNRELATED_MAX_PSNR_DB = 30.0
ETA = 0.3  # the runtime tcd's eta (TCDScheduler.step's default)
PROMPT = "a red cat"


def latents_for(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)


def tcd_pipeline(folder, img2img: bool = False):
    """diffusers' pipeline for ``folder`` with TCDScheduler made from the saved scheduler
    config, as the runtime makes tcd from the bundle's copy of it."""
    import diffusers

    pipe = diffusers_pipeline(folder, "ddim", img2img=img2img)
    pipe.scheduler = diffusers.TCDScheduler.from_pretrained(folder, subfolder="scheduler")
    return pipe


@pytest.fixture(scope="module")
def runtimes(tiny_bundles):
    return {fam: Pipeline(path) for fam, path in tiny_bundles.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("steps", [1, 4])
def test_txt2img_tcd_matches_diffusers(family, steps, tiny_models, runtimes):
    pipe = tcd_pipeline(tiny_models[family])
    lat = latents_for(0)
    ref = to_uint8(pipe(PROMPT, negative_prompt="blurry", num_inference_steps=steps,
                        guidance_scale=7.5, eta=ETA, latents=torch.from_numpy(lat),
                        generator=torch.Generator().manual_seed(7), output_type="np").images)
    ours = runtimes[family](PROMPT, "blurry", num_inference_steps=steps, guidance_scale=7.5,
                            scheduler="tcd", latents=lat, generator=TorchNoise(7))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    other = runtimes[family](PROMPT, "blurry", num_inference_steps=steps, guidance_scale=7.5,
                             scheduler="tcd", latents=latents_for(1), generator=TorchNoise(8))
    assert psnr(other.images, ref) < UNRELATED_MAX_PSNR_DB


def test_img2img_tcd_matches_diffusers(tiny_models, runtimes):
    from PIL import Image

    init = np.random.default_rng(5).uniform(0, 255, (1, 128, 128, 3)).astype(np.uint8)
    pipe = tcd_pipeline(tiny_models["sd1"], img2img=True)
    ref = to_uint8(pipe(PROMPT, image=Image.fromarray(init[0]), strength=0.6,
                        num_inference_steps=8, guidance_scale=6.0, eta=ETA,
                        generator=torch.Generator().manual_seed(11), output_type="np").images)
    ours = runtimes["sd1"](PROMPT, num_inference_steps=8, guidance_scale=6.0, scheduler="tcd",
                           init_image=init, strength=0.6, generator=TorchNoise(11))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


def test_eta_reaches_the_sampler_and_the_png(tiny_models, runtimes, tiny_bundles, tmp_path):
    """`eta` (ldm-run --eta) other than the default: the same picture as diffusers given that
    eta, another picture than at the default, and recorded in the PNG."""
    from helpers import run_cli
    from PIL import Image

    pipe = tcd_pipeline(tiny_models["sd1"])
    lat = latents_for(2)
    ref = to_uint8(pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, eta=0.8,
                        latents=torch.from_numpy(lat), output_type="np",
                        generator=torch.Generator().manual_seed(5)).images)
    ours = runtimes["sd1"](PROMPT, num_inference_steps=4, guidance_scale=7.5, scheduler="tcd",
                           eta=0.8, latents=lat, generator=TorchNoise(5))
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)
    default = runtimes["sd1"](PROMPT, num_inference_steps=4, guidance_scale=7.5,
                              scheduler="tcd", latents=lat, generator=TorchNoise(5))
    assert psnr(default.images, ref) < MIN_PSNR_DB
    out = tmp_path / "tcd.png"
    r = run_cli("-m", "ldm_edge.runtime", str(tiny_bundles["sd1"]), "-p", PROMPT, "--steps", "2",
                "--scheduler", "tcd", "--eta", "0.8", "--seed", "1", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    meta = Image.open(out).text
    assert any('"eta": 0.8' in v for v in meta.values()), meta
