"""SDXL ControlNets (issue #25): the tiny SDXL base model (export/tiny_sdxl.py) exported with a
tiny SDXL ControlNet (``ControlNetModel.from_unet`` of its U-Net: addition_embed_type
"text_time", so it takes the pooled text embeddings and time ids too; zero convs randomised by
export/tiny_controlnet.py), drawn here and by diffusers' StableDiffusionXLControlNetPipeline
from the same initial latents. Each controlled picture is also held to differ from the plain
one, or the parity would prove nothing about the residuals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.errors import ExportError
from ldm_edge.runtime.pipeline import Pipeline

# 8-bit picture bar: only single-level rounding flips from ~1e-6 FP32 differences between
# onnxruntime and PyTorch are allowed (as tests/parity/test_pipeline_parity.py).
MIN_PSNR_DB = 50.0
# A controlled picture must land far under the parity bar from the plain one, or it proves
# nothing. Measured on the tiny SDXL model, 5 Euler steps, this file's control image: one
# ControlNet at scale 0.9 23.6 dB, guess mode 27.0 dB from the plain picture (both cases
# 95.0 dB from diffusers).
MAX_PLAIN_PSNR_DB = 40.0
PROMPT = "a red cat"
STEPS = 5
GUIDANCE = 6.0
SIZE = 128  # the tiny SDXL model's default; the control image is resized to it


@pytest.fixture(scope="module")
def sdxl_control(tmp_path_factory):
    """(model folder, ControlNet folder, bundle exported with it)."""
    from helpers import need_export_extra

    need_export_extra()
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny_controlnet import save_tiny_controlnet
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl_control")
    model = save_tiny_sdxl(root / "base", "base")
    net = save_tiny_controlnet(root / "lines", model, seed=1)
    bundle = root / "bundle"
    export_bundle(load_model(model), bundle, ExportOptions(controlnets=(str(net),)))
    return model, net, bundle


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8),
                                                       dtype=np.float32)


def _reference(model, net, control_png, lat, **kw) -> np.ndarray:
    import diffusers
    from PIL import Image

    cn = diffusers.ControlNetModel.from_pretrained(net).eval()
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(model, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, image=Image.open(control_png), num_inference_steps=STEPS, height=SIZE,
               width=SIZE, guidance_scale=GUIDANCE, latents=torch.from_numpy(lat),
               output_type="np", **kw).images
    return to_uint8(out)


# case -> (diffusers keywords, ldm-run's keywords besides --control, the scale)
CASES = {
    "one": (dict(controlnet_conditioning_scale=0.9), {}, 0.9),
    # under guidance the ControlNet runs on the prompted half only: its text states, pooled
    # embeddings and time ids are that half's
    "guess-mode": (dict(guess_mode=True), dict(guess_mode=True), 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_sdxl_controlnet_pipeline(case, sdxl_control, control_png):
    model, net, bundle = sdxl_control
    theirs, ours_kw, scale = CASES[case]
    lat = latents()
    ref = _reference(model, net, control_png, lat, **theirs)
    pipe = Pipeline(bundle)
    kw = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=lat, seed=0,
              scheduler="euler")
    ours = pipe(request=pipe.request(prompt=PROMPT, control=[f"lines:{control_png}:{scale}"],
                                     **ours_kw, **kw))
    plain = pipe(PROMPT, **kw).images
    print(f"sdxl {case}: {psnr(ours.images, ref):.1f} dB vs diffusers, "
          f"{psnr(ours.images, plain):.1f} dB vs the plain picture")
    assert psnr(ours.images, ref) >= MIN_PSNR_DB
    assert psnr(ours.images, plain) < MAX_PLAIN_PSNR_DB
    assert ours.timings.controlnet > 0
    assert ours.metadata(0)["control"]["controlnets"][0]["name"] == "lines"


def test_the_controlnet_graph_takes_the_added_conditioning(sdxl_control):
    from ldm_edge.runtime.bundle.opener import open_bundle

    spec = open_bundle(sdxl_control[2], True).spec("controlnet/lines")
    assert spec.input_names[:5] == ["sample", "timestep", "encoder_hidden_states",
                                    "text_embeds", "time_ids"]


def test_family_mismatch_refused_in_one_line(sdxl_control):
    """An SDXL ControlNet on an SD1/SD2 U-Net (no time ids), or on a U-Net whose added
    embedding is another width (the refiner's five time ids), is refused before export."""
    from dataclasses import replace

    from ldm_edge.export.controlnet import check_fits, load_controlnet
    from ldm_edge.runtime.bundle.opener import open_bundle
    from ldm_edge.runtime.bundle.spec import TensorSpec

    net = load_controlnet(f"lines={sdxl_control[1]}")
    unet = open_bundle(sdxl_control[2], True).spec("unet")
    check_fits(net, unet, 8)  # its own model: fits
    plain = replace(unet, inputs=tuple(t for t in unet.inputs
                                       if t.name not in ("text_embeds", "time_ids")))
    refiner = replace(unet, inputs=tuple(TensorSpec("time_ids", "float32", ("batch", 5))
                                         if t.name == "time_ids" else t for t in unet.inputs))
    for spec, needle in ((plain, "an SDXL ControlNet on an SD1/SD2 U-Net"),
                         (refiner, "its added embedding takes")):
        with pytest.raises(ExportError) as e:
            check_fits(net, spec, 8)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_added_to_an_sdxl_bundle_later(sdxl_control, control_png, tmp_path):
    """`ldm-export controlnet BUNDLE DIR` on an SDXL bundle: a second ControlNet, checked
    against PyTorch, recorded, and run beside the first."""
    import shutil

    from ldm_edge.export.controlnet import add_controlnet
    from ldm_edge.export.tiny_controlnet import save_tiny_controlnet

    bundle = shutil.copytree(sdxl_control[2], tmp_path / "bundle")
    other = save_tiny_controlnet(tmp_path / "other", sdxl_control[0], seed=2)
    manifest = add_controlnet(bundle, f"depth={other}")
    assert manifest.controlnets["depth"].component == "controlnet/depth"
    pipe = Pipeline(bundle)
    out = pipe(request=pipe.request(prompt=PROMPT, num_inference_steps=2, seed=0,
                                    control=[f"lines:{control_png}", f"depth:{control_png}:0.5"]))
    assert [c["name"] for c in out.metadata(0)["control"]["controlnets"]] == ["lines", "depth"]
