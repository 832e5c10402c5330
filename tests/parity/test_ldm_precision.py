"""FP16 and INT8 (``ldm-export fp16`` / ``int8``) on the bundles of the LDM paper's layouts:
LDM-BERT text-to-image, unconditional (LDMPipeline), x4 super-resolution
(LDMSuperResolutionPipeline) and SD inpainting and the SD x4 upscaler. Models that take no prompt are calibrated
and measured on what bundletools/task_inputs.py gives them instead, and say so."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from ldm_edge.runtime.bundle.opener import open_bundle

# FP16 vs FP32, end to end, 8-bit PSNR. FP16 rounding in the U-Net moves the
# final latents by ~1e-3 relative; a VQ decoder turns that into the same picture unless a
# latent cell sits on a codebook boundary, when one cell's code (a 4x4 or 8x8 patch) flips
# (measured, tiny unconditional model, ddim: 63-64 dB at 8 and 25 steps for seeds 0-2;
# 39.8 dB at 10 steps seed 1, one flipped cell). Measured here: 8 steps, seeds 0 and 1.
FP16_MIN_PSNR_DB = 40.0
STEPS = 8
FAMILIES = ["ldm-bert", "ldm-uncond", "ldm-sr", "inpaint", "upscale"]


@pytest.fixture
def copy_of(ldm_bundles, tmp_path):
    def make(family):
        b = tmp_path / family
        shutil.copytree(ldm_bundles[family], b)
        return b
    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_variants_and_their_end_to_end_psnr(family, copy_of):
    from ldm_edge.calibration.fp16 import make_fp16

    b = copy_of(family)
    m = make_fp16(b, steps=STEPS)
    print(f"\nPSNR {family} fp16 vs fp32: {m.quality['fp16'].psnr_db:.1f} dB")
    assert m.quality["fp16"].psnr_db >= FP16_MIN_PSNR_DB, m.quality["fp16"].to_json()
    # every component converts; the VQ decoders only because their look-up stays FP32
    assert m.quality["fp16"].components_kept_fp32 == []
    assert all("fp16" in rec.variants for rec in m.components.values())
    if family in ("ldm-uncond", "ldm-sr"):  # what stood for prompts is what was recorded
        assert m.quality["fp16"].prompts[0].startswith(("(unconditional sample 0",
                                                        "(synthetic low-resolution image 0"))


def test_vq_look_up_stays_fp32_in_the_fp16_graph(copy_of):
    """The look-up's own values never pass through FP16 (they overflow it: |z|^2)."""
    from ldm_edge.calibration.fp16 import VQ_LOOKUP, to_fp16

    b = copy_of("ldm-uncond")
    g = to_fp16(b / "vae_decoder.onnx", ())
    made_by = {o: n for n in g.graph.node for o in n.output}
    inputs = {i for n in g.graph.node if VQ_LOOKUP in n.name for i in n.input}
    casts = [made_by[i] for i in inputs if i in made_by and made_by[i].op_type == "Cast"]
    assert not casts, [c.name for c in casts]
    assert any(VQ_LOOKUP in n.name and n.op_type == "ArgMin" for n in g.graph.node)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_runs_and_records_its_psnr(family, copy_of):
    from ldm_edge.calibration.int8 import make_int8
    from ldm_edge.runtime.pipeline import Pipeline

    b = copy_of(family)
    m = make_int8(b, num_prompts=2, calib_steps=STEPS, progress=lambda msg: None)
    q = m.quality["int8"]
    print(f"\nPSNR {family} int8 vs fp32 ({q.worst_scheduler}): {q.psnr_db:.1f} dB")
    assert np.isfinite(q.psnr_db) and q.psnr_db > 15.0, q.to_json()  # recorded, not noise
    calib = m.components["unet"].variants["int8"].calibration.prompts
    if family in ("ldm-uncond", "ldm-sr"):
        assert all(p.startswith("(") for p in calib), calib
    kw = {"ldm-bert": {"prompt": "a red cat"}, "ldm-uncond": {},
          "ldm-sr": {"init_image": np.full((1, 32, 32, 3), 90, np.uint8)},
          "inpaint": {"prompt": "a red cat", "init_image": np.full((1, 128, 128, 3), 90, np.uint8),
                      "mask": np.full((1, 128, 128), 255, np.uint8)},
          "upscale": {"prompt": "a red cat", "init_image": np.full((1, 32, 32, 3), 90, np.uint8)},
          }[family]
    r = Pipeline(open_bundle(b), precision="int8")(**kw, num_inference_steps=2, seed=0)
    assert r.provenance.precision == "int8"
