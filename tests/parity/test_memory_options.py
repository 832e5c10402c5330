"""Memory options for small devices: low-memory mode (one session at a time, no arena) and
VAE tiling (diffusers' AutoencoderKL.tiled_decode, in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TorchNoise
from PIL import Image

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline, open_bundle_component
from ldm_edge.runtime.vae_tiling import VaeTiling

# 8-bit PSNR bar of the parity suite: only single-level rounding flips, caused by ~1e-6
# FP32 differences between onnxruntime and PyTorch in each tile, are allowed.
MIN_PSNR_DB = 50.0
# Tiles small enough to overlap at a small size on the tiny model: 64-pixel tiles (8
# latents), diffusers' default overlap 0.25 -> a tile every 6 latents, 16-pixel blends.
TILE, LATENT_TILE, OVERLAP = 64, 8, 0.25
# a 192x192 picture (24 latents): 4 x 4 tiles, the last row and column 6 latents
LATENT_SIDE = 24
STEPS = 3


@pytest.fixture(scope="module")
def diffusers_vae(tiny_models):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_models["sd1"] / "vae").eval()


def _tiled_reference(vae, latents: np.ndarray, overlap: float = OVERLAP) -> np.ndarray:
    """diffusers' tiled decode of ``latents`` (scaled, as the pipeline holds them), 8-bit."""
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = TILE, LATENT_TILE
    vae.tile_overlap_factor = overlap
    with torch.no_grad():
        x = vae.decode(torch.from_numpy(latents / vae.config.scaling_factor)).sample.numpy()
    return np.round(np.clip(x / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def test_blending_is_diffusers_arithmetic(diffusers_vae):
    """With the same stand-in decoder on both sides (latent channels 0-2 upsampled 8x), the
    numpy tiling is bit-identical to diffusers' tiled_decode: same tiles, same blend."""

    class Upsample(torch.nn.Module):
        def forward(self, z):
            return z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3)

    vae = diffusers_vae
    saved = vae.decoder, vae.post_quant_conv
    z = np.random.default_rng(0).standard_normal((2, 4, LATENT_SIDE, 20), dtype=np.float32)
    try:
        vae.decoder, vae.post_quant_conv = Upsample(), torch.nn.Identity()
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = TILE, LATENT_TILE
        vae.tile_overlap_factor = OVERLAP
        with torch.no_grad():
            ref = vae.decode(torch.from_numpy(z)).sample.numpy()
    finally:
        vae.decoder, vae.post_quant_conv = saved
    ours = VaeTiling(TILE, OVERLAP, 8).decode(z, lambda t: Upsample()(torch.from_numpy(t)).numpy())
    assert ours.shape == ref.shape == (2, 3, LATENT_SIDE * 8, 160)
    assert np.array_equal(ours, ref)


def test_tiled_decode_matches_diffusers(tiny_bundles, diffusers_vae):
    lat = np.random.default_rng(3).standard_normal((1, 4, LATENT_SIDE, LATENT_SIDE),
                                                   dtype=np.float32)
    ref = _tiled_reference(diffusers_vae, lat)
    tiled = Pipeline(tiny_bundles["sd1"], vae_tiling=True, vae_tile_size=TILE,
                     vae_tile_overlap=OVERLAP)
    assert tiled.vae_tiling.count(LATENT_SIDE, LATENT_SIDE) == 16  # tiles really overlap
    ours = tiled.decode(lat)
    assert ours.shape == ref.shape == (1, 192, 192, 3)
    assert psnr(ours, ref) >= MIN_PSNR_DB, psnr(ours, ref)
    # negative controls: a wrong overlap, and no tiling at all, must miss the bar
    wrong = Pipeline(tiny_bundles["sd1"], vae_tiling=True, vae_tile_size=TILE,
                     vae_tile_overlap=0.5).decode(lat)
    assert psnr(wrong, ref) < MIN_PSNR_DB, psnr(wrong, ref)
    whole = Pipeline(tiny_bundles["sd1"]).decode(lat)
    assert psnr(whole, ref) < MIN_PSNR_DB, psnr(whole, ref)


def test_tiled_generation_records_tiling(tiny_bundles):
    pipe = Pipeline(tiny_bundles["sd1"], vae_tiling=True, vae_tile_size=TILE)
    r = pipe("a red cat", num_inference_steps=STEPS, height=192, width=192, seed=1)
    assert r.metadata(0)["vae_tiling"] == {"tile_size": TILE, "overlap": OVERLAP, "tiles": 16}
    assert Pipeline(tiny_bundles["sd1"])("a red cat", num_inference_steps=STEPS,
                                         seed=1).metadata(0)["vae_tiling"] is None


def _watched(bundle, **kwargs) -> tuple[Pipeline, list]:
    """A pipeline recording, at each session it opens, how many are open with it and whether
    it has an arena and a memory pattern."""
    seen = []

    def provide(manifest, name, options, lora):
        b = open_bundle_component(manifest, name, options, lora)
        opts = b.session.get_session_options()
        seen.append((name, len(pipe.open_components) + 1, opts.enable_cpu_mem_arena,
                     opts.enable_mem_pattern))
        return b

    pipe = Pipeline(bundle, components=provide, **kwargs)
    return pipe, seen


def _img2img(pipe: Pipeline, init: np.ndarray):
    return pipe("a red cat", num_inference_steps=4, init_image=init, strength=0.75,
                generator=TorchNoise(5))


def test_low_memory_same_picture_one_session_at_a_time(tiny_bundles):
    """Same graphs, inputs and threads: only where onnxruntime keeps its buffers differs, so
    the pictures are byte-identical; called twice, the sessions are reopened each time."""
    init = np.asarray(Image.new("RGB", (128, 128), (200, 30, 30)), dtype=np.uint8)[None]
    plain = Pipeline(tiny_bundles["sd1"])
    low, seen = _watched(tiny_bundles["sd1"], low_memory=True)
    for _ in range(2):
        a = plain("a red cat", num_inference_steps=STEPS, seed=4)
        b = low("a red cat", num_inference_steps=STEPS, seed=4)
        assert np.array_equal(a.images, b.images)
        assert a.metadata(0) == b.metadata(0)
        assert dict(low.open_components) == {}  # everything released after the run
    assert [s[0] for s in seen] == ["text_encoder", "unet", "vae_decoder"] * 2
    assert all(s[1:] == (1, 0, 0) for s in seen), seen  # one open, arena and pattern off
    seen.clear()
    assert np.array_equal(_img2img(plain, init).images, _img2img(low, init).images)
    assert [s[0] for s in seen] == ["text_encoder", "vae_encoder", "unet", "vae_decoder"]
    assert all(s[1] == 1 for s in seen), seen
