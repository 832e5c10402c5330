"""Tasks without models: which task runs, each component's interface, what a request
of each task accepts, and the inpainting / super-resolution conditioning arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.request import BundleDefaults, resolve_request
from ldm_edge.runtime.bundle.spec import ModelDims, describe
from ldm_edge.runtime.tasks import TASKS, run_task, task_specs, takes_prompt

DIMS = ModelDims(latent_channels=4, vae_scale_factor=8, text_hidden_size=32, text_max_length=77,
                 use_attention_mask=False)


def test_the_bundle_task_runs_unless_another_it_can_do_is_asked():
    assert run_task(None, None) == "text-to-image"  # every SD bundle
    assert run_task(None, "unconditional") == "unconditional"
    assert run_task("unconditional", None) == "unconditional"
    with pytest.raises(UsageError, match="this bundle's model does unconditional only"):
        run_task("unconditional", "text-to-image")
    with pytest.raises(UsageError, match="does inpaint only"):
        run_task("inpaint", "text-to-image")
    assert [t for t in TASKS if not takes_prompt(t)] == ["unconditional", "super-resolution"]


def test_component_interfaces_per_task():
    plain = describe(DIMS)
    assert task_specs(plain, None) is plain
    unc = task_specs(plain, "unconditional")
    assert set(unc) == {"unet", "vae_decoder"}
    assert unc["unet"].input_names == ["sample", "timestep"]
    sr = task_specs(plain, "super-resolution", 6)
    assert sr["unet"].input("sample").shape[1] == 6 and "text_encoder" not in sr
    inp = task_specs(plain, "inpaint", 9)
    assert inp["unet"].input("sample").shape[1] == 9 and "vae_encoder" in inp
    up = task_specs(plain, "upscale", 7)
    assert up["unet"].input_names[-1] == "noise_level" and "vae_encoder" not in up
    assert up["unet"].input("noise_level").dtype == "int64"
    # the interfaces SD bundles record are untouched by all this
    assert plain["unet"].input("sample").shape[1] == 4


def resolve(bundle, **kw):
    return resolve_request(bundle, seed=0, **kw)


def test_unconditional_request():
    b = BundleDefaults(height=64, width=64, task="unconditional", vae_scale_factor=4,
                       latent_channels=3, guidance_scale=1.0)
    r = resolve(b, prompt=None, num_images_per_prompt=3)
    assert (r.task, r.prompts, r.num_images, r.guidance_scale) == ("unconditional", ("",), 3, 1.0)
    for kw, msg in [({"prompt": ["a cat"]}, "--prompt given, but this bundle's model is "
                                            "unconditional"),
                    ({"prompt": None, "negative_prompt": "x"}, "--negative-prompt given"),
                    ({"prompt": None, "guidance_scale": 5.0}, "--guidance-scale 5.0 needs a prompt")]:
        with pytest.raises(UsageError, match=msg):
            resolve(b, **kw)


def test_a_text_bundle_needs_a_prompt_unless_asked_for_unconditional():
    b = BundleDefaults(height=64, width=64)
    with pytest.raises(UsageError, match="give a prompt with -p/--prompt"):
        resolve(b, prompt=None)
    r = resolve(b, prompt=None, task="unconditional")
    assert r.prompts == ("",) and r.guidance_scale == 1.0
    with pytest.raises(UsageError, match="--task unconditional samples without one"):
        resolve(b, prompt="a cat", task="unconditional")


def test_upscaler_requests_take_their_size_from_the_image():
    sr = BundleDefaults(task="super-resolution", vae_scale_factor=4, latent_channels=3,
                        min_size=32, max_size=1024)
    r = resolve(sr, prompt=None, init_image=np.zeros((1, 32, 64, 3), np.uint8))
    assert (r.height, r.width, r.strength) == (128, 256, None)
    with pytest.raises(UsageError, match="is 48x40: this upscaler takes sides that are multiples"
                                         " of 32"):
        resolve(sr, prompt=None, init_image=np.zeros((1, 40, 48, 3), np.uint8))
    with pytest.raises(UsageError, match="drop --height/--width"):
        resolve(sr, prompt=None, init_image=np.zeros((1, 32, 32, 3), np.uint8), height=128)
    with pytest.raises(UsageError, match=r"x4 result \(1280x1280\) lies outside"):
        resolve(sr, prompt=None, init_image=np.zeros((1, 320, 320, 3), np.uint8))
    up = BundleDefaults(task="upscale", vae_scale_factor=4, max_noise_level=350,
                        default_noise_level=20, min_size=32, max_size=1024)
    r = resolve(up, prompt="a cat", init_image=np.zeros((1, 40, 48, 3), np.uint8))
    assert (r.height, r.width, r.noise_level) == (160, 192, 20)
    with pytest.raises(UsageError, match="--noise-level 351 must be an integer from 0 to 350"):
        resolve(up, prompt="a cat", init_image=np.zeros((1, 40, 48, 3), np.uint8),
                noise_level=351)


def test_inpaint_request_needs_image_and_mask():
    b = BundleDefaults(height=64, width=64, task="inpaint")
    img = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(UsageError, match="give --mask"):
        resolve(b, prompt="x", init_image=img)
    with pytest.raises(UsageError, match="give --init-image and --mask"):
        resolve(b, prompt="x")
    r = resolve(b, prompt="x", init_image=img, mask=np.zeros((1, 64, 64), np.uint8))
    assert (r.task, r.strength) == ("inpaint", 1.0) and r.to_dict()["mask"]["source"] == "array"
    with pytest.raises(UsageError, match="--mask needs an inpainting model"):
        resolve(BundleDefaults(height=64, width=64), prompt="x", init_image=img,
                mask=np.zeros((1, 64, 64), np.uint8))


def test_inpaint_conditioning_is_diffusers_arithmetic():
    from ldm_edge.runtime.inpaint import condition

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8)
    mask = rng.integers(0, 256, (1, 16, 16), dtype=np.uint8)
    lat_mask, masked = condition(image, mask, 8)
    binary = (mask >= 128).astype(np.float32)  # /255 >= 0.5
    assert lat_mask.shape == (1, 1, 2, 2)
    np.testing.assert_array_equal(lat_mask[0, 0], binary[0, ::8, ::8])  # nearest, by 8
    want = (image.astype(np.float32) / 255 * 2 - 1).transpose(0, 3, 1, 2) * (1 - binary[:, None])
    np.testing.assert_allclose(masked, want, atol=1e-7)


def test_calibration_inputs_stand_in_for_prompts():
    from ldm_edge.bundletools.task_inputs import call_inputs, labels
    from ldm_edge.runtime.tasks.stand_ins import synthetic_image
    from ldm_edge.runtime.bundle.schema import BundleManifest

    m = BundleManifest(task="super-resolution", vae_scale_factor=4,
                       defaults={"height": 64, "width": 64})
    assert labels(m, ["p", "q"]) == ["(synthetic low-resolution image 0, 32x32)",
                                     "(synthetic low-resolution image 1, 32x32)"]
    a, b = call_inputs(m, "x", 0)["init_image"], call_inputs(m, "x", 1)["init_image"]
    assert a.shape == (1, 32, 32, 3) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, synthetic_image(0, 32, 32))  # the same every time
    assert call_inputs(BundleManifest(task="unconditional"), "(unconditional sample 0)", 0) == {}
    assert call_inputs(BundleManifest(), "a cat", 0) == {"prompt": "a cat"}
