"""The generation request: defaults from the bundle, frozen, and every check's one-line error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.request import BundleDefaults, GenerationRequest, InitImage, resolve_request
from ldm_edge.runtime.tasks.base import DEFAULT_STRENGTH
from ldm_edge.runtime.bundle.schema import BundleManifest

DATA = Path(__file__).parent / "data"

# what a request reads of a bundle's manifest
MANIFEST = BundleManifest(defaults={"height": 64, "width": 96, "num_inference_steps": 7,
                                    "guidance_scale": 5.0},
                          scheduler={"_class_name": "EulerDiscreteScheduler"},
                          size_multiple=8, dims={"min_size": 32, "max_size": 256, "max_batch": 4},
                          vae_scale_factor=8, latent_channels=4)
BUNDLE = BundleDefaults.from_manifest(MANIFEST)


def resolve(**kw) -> GenerationRequest:
    return resolve_request(BUNDLE, **{"prompt": "a cat", **kw})


def test_defaults_come_from_the_manifest():
    assert BUNDLE == BundleDefaults(height=64, width=96, num_inference_steps=7,
                                    guidance_scale=5.0, scheduler="euler", size_multiple=8,
                                    min_size=32, max_size=256, max_batch=4,
                                    vae_scale_factor=8, latent_channels=4)
    r = resolve(seed=1)
    assert (r.height, r.width, r.num_inference_steps, r.guidance_scale, r.scheduler) == \
        (64, 96, 7, 5.0, "euler")
    assert r.prompts == ("a cat",) and r.negative_prompts == ("",)
    assert r.num_images_per_prompt == 1 and r.seed == 1
    assert r.strength is None and r.init_image is None and r.latents is None


def test_a_manifest_without_defaults_gets_the_fallbacks():
    b = BundleDefaults.from_manifest(BundleManifest(scheduler={"_class_name": "Unknown"},
                                                    vae_scale_factor=8, latent_channels=4))
    assert (b.height, b.width, b.num_inference_steps, b.guidance_scale, b.scheduler) == \
        (512, 512, 25, 7.5, "ddim")
    assert b.min_size == b.size_multiple == 8


def test_a_manifest_read_from_json_without_size_multiple_gets_8():
    d = json.loads((DATA / "manifest_v1_sd1.json").read_text(encoding="utf-8"))
    del d["size_multiple"], d["defaults"]
    b = BundleDefaults.from_manifest(BundleManifest.from_json(d))
    assert (b.size_multiple, b.min_size, b.max_size, b.max_batch) == (8, 32, 1024, 4)
    assert (b.height, b.scheduler, b.vae_scale_factor, b.latent_channels) == (512, "pndm", 8, 4)


def test_given_values_win_over_the_defaults():
    r = resolve(prompt=["a", "b"], negative_prompt="blur", num_inference_steps=3,
                guidance_scale=0.0, scheduler="ddim", height=128, width=32,
                num_images_per_prompt=2, seed=9)
    assert (r.height, r.width, r.num_inference_steps, r.guidance_scale, r.scheduler) == \
        (128, 32, 3, 0.0, "ddim")
    assert r.negative_prompts == ("blur", "blur") and r.num_images == 4
    assert r.prompt_of(0) == ("a", "blur") and r.prompt_of(3) == ("b", "blur")


def test_request_is_frozen_and_keeps_no_writable_arrays():
    lat = np.zeros((1, 4, 8, 12), np.float32)
    r = resolve(seed=1, latents=lat)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.seed = 2
    with pytest.raises(ValueError):
        r.latents[0, 0, 0, 0] = 1.0
    lat[0, 0, 0, 0] = 5.0  # the caller's array is not the request's
    assert r.latents[0, 0, 0, 0] == 0.0
    assert hash(r) == hash(resolve(seed=1, latents=lat))


def test_seed_is_drawn_when_not_given_unless_the_caller_brings_noise():
    assert isinstance(resolve().seed, int)
    assert resolve(draw_seed=False).seed is None


def test_init_image_array_and_file(tmp_path):
    from PIL import Image

    pixels = np.full((1, 64, 96, 3), 7, np.uint8)
    r = resolve(init_image=pixels)
    assert r.strength == DEFAULT_STRENGTH and r.init_image.source == "array"
    assert not r.init_image.pixels.flags.writeable
    path = tmp_path / "start.png"
    Image.new("RGB", (10, 20), (1, 2, 3)).save(path)
    r = resolve(init_image=str(path), strength=0.5)
    import hashlib

    assert r.init_image.to_dict() == {"source": "start.png",
                                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert r.init_image.pixels.shape == (1, 64, 96, 3)  # loaded at the resolved size
    assert r.to_dict()["init_image"] == r.init_image.to_dict() and r.strength == 0.5
    assert isinstance(r.init_image, InitImage)


def test_to_dict_is_json_and_complete():
    import json

    r = resolve(seed=4, latents=np.ones((1, 4, 8, 12), np.float32))
    d = json.loads(json.dumps(r.to_dict()))
    fields = {f.name for f in dataclasses.fields(GenerationRequest)} - {"latents"}
    assert fields | {"latents_sha256"} == set(d)
    assert d["seed"] == 4 and d["prompts"] == ["a cat"] and len(d["latents_sha256"]) == 64


@pytest.mark.parametrize("kw,message", [
    ({"prompt": []}, "give at least one prompt"),
    ({"prompt": [3]}, "prompts must be text, got int"),
    ({"prompt": "a\x00b"}, "prompt contains a NUL character"),
    ({"negative_prompt": ["x", "y"]}, "2 negative prompts for 1 prompts"),
    ({"num_inference_steps": 0}, "--steps 0 must be between 1 and 1000"),
    ({"num_inference_steps": 1001}, "--steps 1001 must be between 1 and 1000"),
    ({"guidance_scale": float("nan")}, "--guidance-scale nan must be between 0 and 100.0"),
    ({"guidance_scale": -3}, "--guidance-scale -3.0 must be between 0 and 100.0"),
    ({"scheduler": "dpm++3m"}, "unknown scheduler 'dpm++3m'; choose from ddim, "),
    ({"num_images_per_prompt": 0}, "--num-images must be at least 1"),
    ({"num_images_per_prompt": 5}, "5 images in one call, the bundle was exported for at most 4"),
    ({"height": 100}, "--height 100 must be a positive multiple of 8"),
    ({"width": 0}, "--width 0 must be a positive multiple of 8"),
    ({"width": 512}, "--width 512 is outside the bundle's exported range 32..256"),
    ({"seed": -5}, "--seed -5 must be an integer from 0 to 18446744073709551615"),
    ({"seed": 2**64}, "--seed 18446744073709551616 must be an integer from 0 to"),
    ({"seed": 1.5}, "--seed 1.5 must be an integer"),
    ({"seed": True}, "--seed True must be an integer"),
    ({"strength": 0.5}, "--strength 0.5 needs --init-image"),
    ({"init_image": "INIT", "strength": 1.5}, "--strength 1.5 must be in (0, 1]"),
    ({"init_image": "INIT", "strength": 0}, "--strength 0 must be in (0, 1]"),
    ({"init_image": "INIT", "latents": "LAT"}, "--latents and --init-image cannot be combined"),
    ({"init_image": np.zeros((1, 8, 8, 3), np.uint8)}, "init image must be 96x64 RGB"),
    ({"init_image": "MISSING"}, "--init-image MISSING not found"),
    ({"latents": np.zeros((1, 4, 8, 8), np.float32)},
     "--latents has shape [1, 4, 8, 8], expected [1, 4, 8, 12]"),
    ({"latents": np.zeros((1, 4, 8, 12), np.float64)}, "--latents must be a float32 array"),
    ({"latents": np.full((1, 4, 8, 12), np.inf, np.float32)}, "--latents contains NaN or Inf"),
])
def test_each_check_raises_its_one_line_message(kw, message):
    subs = {"INIT": np.zeros((1, 64, 96, 3), np.uint8), "LAT": np.zeros((1, 4, 8, 12), np.float32)}
    kw = {k: subs.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    with pytest.raises(UsageError) as e:
        resolve(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resolution_takes_keywords_only():
    with pytest.raises(TypeError):
        resolve_request(BUNDLE, "a cat")
