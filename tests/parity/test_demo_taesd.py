"""The committed demo TAESD (demo/weights/taesd, demo/train_taesd.py): an AutoencoderTiny
distilled from the demo VAE. Small, outside the demo model's hash, and it decodes (and
encodes) the demo model's latents close to the demo VAE on held-out pictures."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="needs torch (pip install .[export])")

from ldm_edge.demo import train_controlnet as TC  # noqa: E402
from ldm_edge.demo import train_taesd as TT  # noqa: E402
from ldm_edge.export.load import default_source  # noqa: E402

TAESD = TT.DEFAULT_OUT
pytestmark = pytest.mark.skipif(
    default_source() is None or not (TAESD / "config.json").is_file(),
    reason="demo weights or the demo TAESD not in this checkout")

HELD_OUT = 16  # pictures: a quarter of training.json's 64, a second or two here
# 8-bit PSNR against the demo VAE's picture: training.json records 30.9 dB (the tiny
# decoder) and 41.0 dB (the full decoder on the tiny encoder's latents) on 64 held-out
# pictures; 3 dB under each leaves room for a smaller sample and other CPUs' float sums. An
# untrained TAESD scores 5-6 dB. Retraining the TAESD means measuring these again.
MIN_DECODER_PSNR_DB = 27.9
MIN_ENCODER_PSNR_DB = 38.0


def test_the_committed_taesd_is_small_and_not_part_of_the_demo_models_hash():
    cfg = json.loads((TAESD / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderTiny"
    assert sum(f.stat().st_size for f in TAESD.iterdir() if f.is_file()) <= TC.MAX_DIR_BYTES
    from ldm_edge.export.load import _weight_files

    files = _weight_files(default_source())
    assert files and not any("taesd" in q.relative_to(default_source()).parts for q in files)


def test_the_taesd_decodes_and_encodes_like_the_demo_vae():
    from diffusers import AutoencoderKL, AutoencoderTiny

    from ldm_edge.demo import dataset as D

    vae = AutoencoderKL.from_pretrained(default_source() / "vae").eval()
    tiny = AutoencoderTiny.from_pretrained(TAESD).eval()
    held = TT.teacher_pairs(vae, D.heldout_set(HELD_OUT, seed=TT.SEED + 17)[0])
    got = TT.fidelity(tiny, vae, held)
    assert got["decoder_psnr_db"] >= MIN_DECODER_PSNR_DB, got
    assert got["encoder_psnr_db"] >= MIN_ENCODER_PSNR_DB, got
