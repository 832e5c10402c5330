"""ControlNet (issue #25): the tiny SD1 model exported with two tiny ControlNets (their zero convs
randomised, export/tiny_controlnet.py), drawn here and by diffusers'
StableDiffusionControlNetPipeline from the same initial latents: one ControlNet, two at once
with different scales, --control-start/--control-end, guess mode, img2img. Each picture is
also held to differ from the plain one, or the parity would prove nothing about the
residuals; and without --control the bundle draws the plain bundle's picture bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.pipeline import Pipeline

# 8-bit picture bar: only single-level rounding flips from ~1e-6 FP32 differences between
# onnxruntime and PyTorch are allowed (as tests/parity/test_pipeline_parity.py).
MIN_PSNR_DB = 50.0
# A controlled picture must land far under the parity bar from the plain one (and from the
# other cases it is told apart from), or it proves nothing. Measured on the tiny model, 8 PNDM
# steps, this file's control image: 25.8 (guess mode) to 42.7 dB (guess mode without guidance,
# its ramp 0.1..1 the weakest push; start/end, acting on half the steps, 40.1) from the plain
# picture, img2img 29.5, canny 28.6 dB; every parity case scored 86 dB or more (two
# ControlNets: identical pictures).
MAX_PLAIN_PSNR_DB = 45.0
PROMPT = "a red cat"
STEPS = 8
SIZE = 128  # the tiny model's default; the control image is resized to it


@pytest.fixture(scope="module")
def diffusers_nets(controlnet_models):
    import diffusers

    return {n: diffusers.ControlNetModel.from_pretrained(p).eval()
            for n, p in controlnet_models.items()}


def _diffusers(model, nets, img2img=False):
    import diffusers

    cls = (diffusers.StableDiffusionControlNetImg2ImgPipeline if img2img
           else diffusers.StableDiffusionControlNetPipeline)
    pipe = cls.from_pretrained(model, controlnet=nets, safety_checker=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)


# case -> (ControlNets, scales, diffusers keywords, ldm-run's keywords besides --control)
CASES = {
    "one": (["edges"], [0.9], {}, {}),
    "two-scales": (["edges", "depth"], [0.6, 1.3], {}, {}),
    "start-end": (["edges"], [1.0], dict(control_guidance_start=0.25, control_guidance_end=0.75),
                  dict(control_start=0.25, control_end=0.75)),
    "guess-mode": (["edges"], [1.0], dict(guess_mode=True), dict(guess_mode=True)),
    # without guidance the ControlNet sees the whole (single) batch, scales still ramped
    "guess-mode-no-cfg": (["edges"], [1.0], dict(guess_mode=True, guidance_scale=1.0),
                          dict(guess_mode=True, guidance_scale=1.0)),
}


def _reference(tiny_models, diffusers_nets, control_png, case, lat):
    from PIL import Image

    names, scales, kw, _ = CASES[case]
    nets = [diffusers_nets[n] for n in names]
    one = len(nets) == 1
    pipe = _diffusers(tiny_models["sd1"], nets[0] if one else nets)
    image = Image.open(control_png)
    out = pipe(PROMPT, image=image if one else [image] * len(nets), num_inference_steps=STEPS,
               height=SIZE, width=SIZE, latents=torch.from_numpy(lat), output_type="np",
               controlnet_conditioning_scale=scales[0] if one else scales, **kw).images
    return to_uint8(out)


def _ours(bundle, control_png, case, lat):
    names, scales, _, kw = CASES[case]
    pipe = Pipeline(bundle)
    control = [f"{n}:{control_png}:{s}" for n, s in zip(names, scales)]
    req = pipe.request(prompt=PROMPT, num_inference_steps=STEPS, latents=lat, seed=0,
                       control=control, **kw)
    return pipe(request=req)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_controlnet_pipeline(case, controlnet_bundle, tiny_models, diffusers_nets,
                                     control_png):
    lat = latents()
    ref = _reference(tiny_models, diffusers_nets, control_png, case, lat)
    ours = _ours(controlnet_bundle, control_png, case, lat)
    plain = Pipeline(controlnet_bundle)(PROMPT, num_inference_steps=STEPS, latents=lat, seed=0,
                                        guidance_scale=CASES[case][3].get("guidance_scale")
                                        ).images
    print(f"{case}: {psnr(ours.images, ref):.1f} dB vs diffusers, "
          f"{psnr(ours.images, plain):.1f} dB vs the plain picture")
    assert psnr(ours.images, ref) >= MIN_PSNR_DB
    assert psnr(ours.images, plain) < MAX_PLAIN_PSNR_DB
    assert ours.timings.controlnet > 0
    meta = json.loads(json.dumps(ours.metadata(0), default=str))["control"]
    assert [c["name"] for c in meta["controlnets"]] == CASES[case][0]


def test_each_case_differs_from_the_single_controlnet(controlnet_bundle, control_png):
    """The second ControlNet, the schedule and guess mode each change the picture."""
    lat = latents()
    one = _ours(controlnet_bundle, control_png, "one", lat).images
    for case in ("two-scales", "start-end", "guess-mode"):
        other = _ours(controlnet_bundle, control_png, case, lat).images
        assert psnr(other, one) < MAX_PLAIN_PSNR_DB, (case, psnr(other, one))


def test_without_control_the_plain_bundles_picture(controlnet_bundle, tiny_bundles):
    """The residual inputs fed zeros: bit for bit the picture of the bundle exported without
    ControlNets."""
    lat = latents(1)
    ours = Pipeline(controlnet_bundle)(PROMPT, num_inference_steps=4, latents=lat, seed=0)
    plain = Pipeline(tiny_bundles["sd1"])(PROMPT, num_inference_steps=4, latents=lat, seed=0)
    assert np.array_equal(ours.images, plain.images)
    assert ours.metadata(0)["control"] is None


def test_img2img_with_control(controlnet_bundle, tiny_models, diffusers_nets, control_png,
                              tmp_path):
    """StableDiffusionControlNetImg2ImgPipeline: the init image's latents drawn from the same
    torch generator (helpers.TorchNoise), the control image as text-to-image's."""
    from helpers import TorchNoise
    from PIL import Image

    init = tmp_path / "init.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(init)
    pipe = _diffusers(tiny_models["sd1"], diffusers_nets["edges"], img2img=True)
    ref = to_uint8(pipe(PROMPT, image=Image.open(init), control_image=Image.open(control_png),
                        strength=0.7, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                        controlnet_conditioning_scale=0.9, output_type="np",
                        generator=torch.Generator().manual_seed(4)).images)
    ours_pipe = Pipeline(controlnet_bundle)
    req = ours_pipe.request(prompt=PROMPT, num_inference_steps=STEPS, init_image=str(init),
                            strength=0.7, draw_seed=False,
                            control=[f"edges:{control_png}:0.9"])
    ours = ours_pipe(request=req, generator=TorchNoise(4)).images
    plain_req = ours_pipe.request(prompt=PROMPT, num_inference_steps=STEPS,
                                  init_image=str(init), strength=0.7, draw_seed=False)
    plain = ours_pipe(request=plain_req, generator=TorchNoise(4)).images
    print(f"img2img: {psnr(ours, ref):.1f} dB vs diffusers, {psnr(ours, plain):.1f} dB vs plain")
    assert psnr(ours, ref) >= MIN_PSNR_DB
    assert psnr(ours, plain) < MAX_PLAIN_PSNR_DB


# -- refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("keywords,needle", [
    (dict(control=["nope:IMG"]), "no ControlNet of that name (it has: edges, depth)"),
    (dict(control=["edges:MISSING"]), "not found"),
    (dict(control=["edges:NOTIMAGE"]), "is not a readable image"),
    (dict(control=["edges"]), "give NAME:IMAGE[:SCALE]"),
    (dict(control=["edges:IMG"], control_start=0.8, control_end=0.2), "need 0 <= start < end"),
    (dict(control_start=0.5), "--control-start needs --control"),
    (dict(guess_mode=True), "--guess-mode needs --control"),
])
def test_refused_in_one_line(controlnet_bundle, control_png, tmp_path, keywords, needle):
    bad = tmp_path / "not.png"
    bad.write_text("hello")
    subs = {"IMG": str(control_png), "MISSING": str(tmp_path / "none.png"), "NOTIMAGE": str(bad)}
    if "control" in keywords:
        keywords = dict(keywords, control=[_sub(a, subs) for a in keywords["control"]])
    with pytest.raises(UsageError) as e:
        Pipeline(controlnet_bundle).request(prompt=PROMPT, **keywords)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _sub(arg: str, subs: dict) -> str:
    for k, v in subs.items():
        arg = arg.replace(k, v)
    return arg


def test_a_bundle_without_controlnets_refuses_control(tiny_bundles, control_png):
    with pytest.raises(UsageError, match="this bundle has no ControlNet; export one with"):
        Pipeline(tiny_bundles["sd1"]).request(prompt=PROMPT, control=[f"edges:{control_png}"])


def test_canny_from_a_photo_is_diffusers_canny_recipe(controlnet_bundle, tiny_models,
                                                      diffusers_nets, tmp_path):
    """`--control-preprocess canny` on a photo draws what diffusers draws from the edge map its
    canny examples make (np.array(photo) -> cv2.Canny(100, 200) -> three channels)."""
    cv2 = pytest.importorskip("cv2", reason="needs OpenCV (pip install '.[control]')")
    from PIL import Image

    yy, xx = np.mgrid[0:90, 0:110]
    photo = np.stack([(xx * 2) % 256, (yy * 3) % 256, ((xx + yy) // 20 % 2) * 200], axis=2)
    path = tmp_path / "photo.png"
    Image.fromarray(photo.astype(np.uint8)).save(path)
    edges = cv2.Canny(np.array(Image.open(path).convert("RGB")), 100, 200)
    canny = Image.fromarray(np.concatenate([edges[:, :, None]] * 3, axis=2))
    lat = latents(2)
    pipe = _diffusers(tiny_models["sd1"], diffusers_nets["edges"])
    ref = to_uint8(pipe(PROMPT, image=canny, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                        latents=torch.from_numpy(lat), output_type="np").images)
    ours_pipe = Pipeline(controlnet_bundle)
    ours = ours_pipe(request=ours_pipe.request(
        prompt=PROMPT, num_inference_steps=STEPS, latents=lat, seed=0,
        control=[f"edges:{path}"], control_preprocess="canny"))
    plain = ours_pipe(PROMPT, num_inference_steps=STEPS, latents=lat, seed=0).images
    print(f"canny: {psnr(ours.images, ref):.1f} dB vs diffusers, "
          f"{psnr(ours.images, plain):.1f} dB vs plain")
    assert psnr(ours.images, ref) >= MIN_PSNR_DB
    assert psnr(ours.images, plain) < MAX_PLAIN_PSNR_DB
    assert ours.metadata(0)["control"]["preprocess"] == "canny:100:200"


def test_engine_profiles_size_the_residuals_from_the_latent(controlnet_bundle):
    """`ldm-export engines` profiles: each residual input of the U-Net at ceil(latent / 2^k)
    at min, opt and max alike (not its level's exported minimum), and each ControlNet at the
    guidance batch (it runs on the U-Net's batch)."""
    import math

    from ldm_edge.export.engines import ProfileOptions, plan_builds, shape_profile
    from ldm_edge.runtime.bundle.control_spec import residuals_of
    from ldm_edge.runtime.bundle.opener import open_bundle

    m = open_bundle(controlnet_bundle)
    opts = ProfileOptions(min_size=64, opt_size=128, max_size=256, max_batch=2)
    unet = shape_profile(m.schema, "unet", opts)
    for r in residuals_of(m.spec("unet")):
        k = 2 ** r.level
        for end in ("min", "opt", "max"):
            _, _, h, w = unet["sample"][end]
            assert unet[r.name][end] == [unet["sample"][end][0], r.channels, math.ceil(h / k),
                                         math.ceil(w / k)], (r.name, end)
    net = shape_profile(m.schema, "controlnet/edges", opts)
    assert net["sample"] == unet["sample"]
    assert net["controlnet_cond"] == {"min": [1, 3, 64, 64], "opt": [2, 3, 128, 128],
                                      "max": [4, 3, 256, 256]}
    planned = [name for name, *_ in plan_builds(m, "fp32", ProfileOptions())]
    assert {"controlnet/edges", "controlnet/depth"} <= set(planned)


def test_lora_with_control_matches_diffusers(controlnet_bundle, tiny_models, diffusers_nets,
                                            control_png, tmp_path):
    """``--lora`` and ``--control`` together: the LoRA merged into the U-Net and text encoder
    (the ControlNet untouched, as diffusers' load_lora_weights leaves it), against diffusers'
    ControlNet pipeline with the same LoRA loaded and fused."""
    pytest.importorskip("peft", reason="needs peft (pip install .[demo]) to make the LoRA")
    from PIL import Image
    from test_lora import make_peft_lora

    lora, scale = make_peft_lora(tiny_models["sd1"], tmp_path / "lora", seed=3), 0.8
    lat = latents(2)
    pipe = _diffusers(tiny_models["sd1"], diffusers_nets["edges"])
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["a"])
    ref = to_uint8(pipe(PROMPT, image=Image.open(control_png), num_inference_steps=STEPS,
                        height=SIZE, width=SIZE, latents=torch.from_numpy(lat), output_type="np",
                        controlnet_conditioning_scale=0.9).images)

    def draw(loras):
        p = Pipeline(controlnet_bundle, loras=loras)
        return p(PROMPT, num_inference_steps=STEPS, latents=lat, seed=0,
                 control=[f"edges:{control_png}:0.9"]).images

    ours = draw([(lora, scale)])
    without = draw(None)
    print(f"LoRA + control: {psnr(ours, ref):.1f} dB vs diffusers, "
          f"{psnr(ours, without):.1f} dB vs control without the LoRA")
    assert psnr(ours, ref) >= MIN_PSNR_DB
    assert psnr(ours, without) < MAX_PLAIN_PSNR_DB  # the LoRA did change the picture


@pytest.fixture(scope="module")
def inpaint_control_bundle(ldm_models, controlnet_models, tmp_path_factory):
    """The tiny SD inpainting model (a 9-channel U-Net of the tiny SD1 layout) exported with
    the "edges" ControlNet: the ControlNet takes the 4 latent channels alone."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    out = tmp_path_factory.mktemp("inpaint_control") / "bundle"
    export_bundle(load_model(ldm_models["inpaint"]), out,
                  ExportOptions(controlnets=(f"edges={controlnet_models['edges']}",)))
    return out


# strength 1 from given latents (diffusers' default) and below 1 (the image's latents noised,
# the noise from the same torch source), each under another sampler
INPAINT_CASES = [("ddim", 1.0), ("euler-a", 0.6)]


@pytest.mark.parametrize("scheduler,strength", INPAINT_CASES)
def test_inpaint_with_control(scheduler, strength, inpaint_control_bundle, ldm_models,
                              diffusers_nets, control_png):
    """StableDiffusionControlNetInpaintPipeline: the ControlNet sees the scaled latents, the
    U-Net those joined with the mask and the masked image's latents."""
    import diffusers
    from helpers import TorchNoise, diffusers_pipeline
    from PIL import Image

    rng = np.random.default_rng(5)
    init = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    mask = np.zeros((1, SIZE, SIZE), np.uint8)
    mask[:, 32:96, 40:100] = 255
    lat = latents(6)
    given = {"latents": lat} if strength == 1.0 else {}
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
        ldm_models["inpaint"], controlnet=diffusers_nets["edges"], safety_checker=None,
        requires_safety_checker=False)
    pipe.scheduler = diffusers_pipeline(ldm_models["inpaint"], scheduler).scheduler
    pipe.set_progress_bar_config(disable=True)
    ref = to_uint8(pipe(PROMPT, image=Image.fromarray(init[0]),
                        mask_image=Image.fromarray(mask[0]), control_image=Image.open(control_png),
                        strength=strength, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                        controlnet_conditioning_scale=0.9, output_type="np",
                        generator=torch.Generator().manual_seed(11),
                        **{k: torch.from_numpy(v) for k, v in given.items()}).images)
    ours_pipe = Pipeline(inpaint_control_bundle)
    kw = dict(init_image=init, mask=mask, strength=strength, num_inference_steps=STEPS,
              scheduler=scheduler, **given)
    ours = ours_pipe(PROMPT, generator=TorchNoise(11), control=[f"edges:{control_png}:0.9"],
                     **kw)
    plain = ours_pipe(PROMPT, generator=TorchNoise(11), **kw)
    print(f"inpaint {scheduler} {strength}: {psnr(ours.images, ref):.1f} dB vs diffusers, "
          f"{psnr(ours.images, plain.images):.1f} dB vs without control")
    assert ours.request.task == "inpaint"
    assert psnr(ours.images, ref) >= MIN_PSNR_DB
    assert psnr(ours.images, plain.images) < MAX_PLAIN_PSNR_DB


def test_controlnets_get_a_fused_attention_form(controlnet_bundle, control_png, monkeypatch):
    """Each ControlNet graph is exported with its onnxruntime form (attention fused, checked
    against the plain graph), ldm-run opens it, and it draws the plain graph's picture to
    float noise (the parity cases above ran with it)."""
    from ldm_edge.runtime.bundle.opener import open_bundle

    m = open_bundle(controlnet_bundle).schema
    for name in ("edges", "depth"):
        form = m.components[f"controlnet/{name}"].variants["fp32"].forms["ort-mha"]
        assert form.fused_attention > 0 and form.check["passed"]
    lat = latents(3)

    def draw():
        pipe = Pipeline(controlnet_bundle)
        out = pipe(PROMPT, num_inference_steps=4, latents=lat, seed=0,
                   control=[f"edges:{control_png}:0.9"])
        return out.images, pipe.backend("controlnet/edges").form

    fused, opened = draw()
    monkeypatch.setenv("LDM_EDGE_FUSED_ATTENTION", "0")
    plain, plain_opened = draw()
    assert (opened, plain_opened) == ("ort-mha", None)
    assert psnr(fused, plain) >= MIN_PSNR_DB


def test_a_broken_controlnet_rewrite_fails_its_check(controlnet_bundle, tmp_path):
    """Negative control: the form's check covers every residual (the first comes before any
    attention, so a check of it alone would pass a wrong rewrite)."""
    import shutil

    from ldm_edge.bundletools import forms
    from ldm_edge.runtime.bundle.opener import open_bundle

    dst = tmp_path / "bundle"
    shutil.copytree(controlnet_bundle, dst)
    m = open_bundle(dst)
    v = m.variant("controlnet/edges", "fp32").record
    (dst / v.forms["ort-mha"].file).unlink()
    form = forms.make_form(dst, m.spec("controlnet/edges"), v, "fp32", num_heads=1,
                           **forms.default_size(m.schema))
    assert form is None and not (dst / v.forms["ort-mha"].file).exists()


def test_sd2_controlnet_matches_diffusers(tiny_models, control_png, tmp_path):
    """An SD 2.x ControlNet (the tiny SD2 model's layout: OpenCLIP-width text states, linear
    projections, v-prediction) on the SD2 bundle, against StableDiffusionControlNetPipeline."""
    import diffusers
    from PIL import Image

    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny_controlnet import save_tiny_controlnet

    net = save_tiny_controlnet(tmp_path / "sd2-lines", tiny_models["sd2"], seed=4)
    bundle = tmp_path / "bundle"
    export_bundle(load_model(tiny_models["sd2"]), bundle,
                  ExportOptions(controlnets=(f"lines={net}",)))
    lat = latents(7)
    pipe = _diffusers(tiny_models["sd2"], diffusers.ControlNetModel.from_pretrained(net).eval())
    ref = to_uint8(pipe(PROMPT, image=Image.open(control_png), num_inference_steps=STEPS,
                        height=SIZE, width=SIZE, latents=torch.from_numpy(lat), output_type="np",
                        controlnet_conditioning_scale=0.9).images)
    ours_pipe = Pipeline(bundle)
    ours = ours_pipe(PROMPT, num_inference_steps=STEPS, latents=lat, seed=0,
                     control=[f"lines:{control_png}:0.9"]).images
    plain = ours_pipe(PROMPT, num_inference_steps=STEPS, latents=lat, seed=0).images
    print(f"SD2: {psnr(ours, ref):.1f} dB vs diffusers, {psnr(ours, plain):.1f} dB vs plain")
    assert ours_pipe.manifest.schema.model.family == "sd2"
    assert psnr(ours, ref) >= MIN_PSNR_DB
    assert psnr(ours, plain) < MAX_PLAIN_PSNR_DB
