"""One generation request: the caller's keywords completed with the bundle's defaults and
checked, once (``resolve_request``). The pipeline runs it as it is, and each PNG records it
as it is, with the provenance of the run (``Provenance``).

    bundle = BundleDefaults.from_manifest(manifest.schema)   # manifest = open_bundle(path)
    req = resolve_request(bundle, prompt="a red cat", steps=None, seed=3)   # keywords only
    req.num_inference_steps  # the bundle's default, checked
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import validate
from .errors import UsageError
from .schema import BundleManifest
from .tasks import INPAINT, SUPER_RESOLUTION, TEXT_TO_IMAGE, UPSCALE, run_task, takes_prompt

# diffusers' StableDiffusionImg2ImgPipeline default: redraw 80 % of the schedule
DEFAULT_STRENGTH = 0.8
# diffusers' StableDiffusionInpaintPipeline default: the whole schedule, from pure noise
INPAINT_STRENGTH = 1.0
# the SD x4 upscaler's low-resolution sides: multiples of 8, so its x4 output is on the grid
UPSCALE_SIDE_MULTIPLE = 8
# what a manifest without "defaults" gets: the SD 1.x/2.x pipelines' own defaults
FALLBACK_SIZE, FALLBACK_STEPS, FALLBACK_GUIDANCE = 512, 25, 7.5
# a drawn seed (none given) fits 32 bits, so it is easy to read off a PNG and type back in
DRAWN_SEED_BITS = 32


def default_scheduler_name(config: dict) -> str:
    """The runtime name of the scheduler the model was saved with (falls back to ddim)."""
    from .schedulers import SCHEDULERS

    cls = config.get("_class_name")
    for name, sched in SCHEDULERS.items():
        if sched.diffusers_class == cls:
            if name.startswith("dpm++2m"):
                return "dpm++2m-karras" if config.get("use_karras_sigmas") else "dpm++2m"
            return name
    return "ddim"


@dataclass(frozen=True)
class BundleDefaults:
    """What resolving a request needs from a bundle: its defaults and its exported limits."""

    height: int = FALLBACK_SIZE
    width: int = FALLBACK_SIZE
    num_inference_steps: int = FALLBACK_STEPS
    guidance_scale: float = FALLBACK_GUIDANCE
    scheduler: str = "ddim"
    size_multiple: int = 8
    min_size: int = 8
    max_size: int = 1 << 16
    max_batch: int = 1 << 16
    vae_scale_factor: int = 8
    latent_channels: int = 4
    task: str | None = None  # the bundle's (runtime/tasks.py); None: text-to-image
    max_noise_level: int | None = None  # the SD x4 upscaler's
    default_noise_level: int | None = None

    @classmethod
    def from_manifest(cls, manifest: BundleManifest) -> "BundleDefaults":
        """From a bundle's typed manifest (the one place that reads it for a request)."""
        d, dims = manifest.defaults, manifest.dims
        mult = manifest.multiple
        return cls(height=int(d.get("height", FALLBACK_SIZE)),
                   width=int(d.get("width", FALLBACK_SIZE)),
                   num_inference_steps=int(d.get("num_inference_steps", FALLBACK_STEPS)),
                   guidance_scale=float(d.get("guidance_scale", FALLBACK_GUIDANCE)),
                   scheduler=default_scheduler_name(manifest.scheduler),
                   size_multiple=mult, min_size=int(dims.get("min_size", mult)),
                   max_size=int(dims.get("max_size", 1 << 16)),
                   max_batch=int(dims.get("max_batch", 1 << 16)),
                   vae_scale_factor=int(manifest.vae_scale_factor),
                   latent_channels=int(manifest.latent_channels), task=manifest.task,
                   **_noise_levels(manifest.upscaler))


def _noise_levels(upscaler: dict | None) -> dict:
    if not upscaler:
        return {}
    return {"max_noise_level": int(upscaler.get("max_noise_level", 350)),
            "default_noise_level": int(upscaler.get("default_noise_level", 20))}


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _frozen(array: np.ndarray) -> np.ndarray:
    out = np.array(array, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True)
class InitImage:
    """The img2img start, at the request's size; recorded by where it came from and a hash."""

    pixels: np.ndarray = field(repr=False, compare=False)  # uint8 [1, H, W, 3], read-only
    source: str  # the file's name, or "array" when the caller passed pixels
    sha256: str  # of the file's bytes; of the pixels when the caller passed an array

    @classmethod
    def from_file(cls, path: str | Path, width: int, height: int) -> "InitImage":
        from .fsutil import sha256_file
        from .image import load_init_image

        pixels = load_init_image(path, width, height)  # one-line errors for a bad file
        return cls(_frozen(pixels), Path(path).name, sha256_file(path))

    @classmethod
    def from_array(cls, pixels: np.ndarray, width: int, height: int) -> "InitImage":
        validate.init_pixels(pixels, height, width)
        return cls(_frozen(pixels), "array", _sha256(pixels))

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256}


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides the picture, resolved and checked. Build with resolve_request."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # one per prompt
    num_inference_steps: int
    guidance_scale: float  # <= 1: no classifier-free guidance
    scheduler: str
    height: int
    width: int
    num_images_per_prompt: int
    seed: int | None  # None: the noise comes from the caller's generator
    strength: float | None = None  # img2img only
    init_image: InitImage | None = None
    latents: np.ndarray | None = field(default=None, repr=False, compare=False)  # read-only
    task: str = TEXT_TO_IMAGE  # runtime/tasks.py
    mask: object | None = None  # inpaint: runtime/inpaint.Mask
    noise_level: int | None = None  # upscale: the low-resolution image's noise level

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def prompt_of(self, index: int) -> tuple[str, str]:
        """(prompt, negative prompt) of image ``index`` (images are grouped by prompt)."""
        k = index // self.num_images_per_prompt
        return self.prompts[k], self.negative_prompts[k]

    def to_dict(self) -> dict:
        """JSON-able, as the PNG records it."""
        return {"prompts": list(self.prompts), "negative_prompts": list(self.negative_prompts),
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "scheduler": self.scheduler,
                "height": self.height, "width": self.width,
                "num_images_per_prompt": self.num_images_per_prompt, "seed": self.seed,
                "strength": self.strength,
                "init_image": self.init_image.to_dict() if self.init_image else None,
                "latents_sha256": None if self.latents is None else _sha256(self.latents),
                "task": self.task, "mask": self.mask.to_dict() if self.mask else None,
                "noise_level": self.noise_level}


@dataclass(frozen=True)
class Provenance:
    """What ran a request: the U-Net's backend and precision, the model it came from, and
    the VAE tiling when it was on (tile size, overlap, tiles: it changes the picture), and
    the LoRAs applied (name, sha256, scale of each; recorded only when there are some)."""

    backend: str
    precision: str
    model: str | None
    model_sha256: str | None
    vae_tiling: dict | None = None
    loras: tuple | None = None  # ({"name", "sha256", "scale"}, ...)

    def to_dict(self) -> dict:
        out = {"backend": self.backend, "precision": self.precision, "model": self.model,
               "model_sha256": self.model_sha256, "vae_tiling": self.vae_tiling}
        if self.loras:
            out["loras"] = [dict(x) for x in self.loras]
        return out


def resolve_request(bundle: BundleDefaults, *, prompt, negative_prompt=None,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    scheduler: str | None = None, height: int | None = None,
                    width: int | None = None, num_images_per_prompt: int = 1,
                    seed: int | None = None, draw_seed: bool = True,
                    latents: np.ndarray | None = None, init_image=None,
                    strength: float | None = None, task: str | None = None,
                    mask=None, noise_level: int | None = None) -> GenerationRequest:
    """Fill what is not given from ``bundle`` and check everything (one-line UsageErrors).

    ``init_image``: a file path (loaded here, at the resolved size) or uint8 [1, H, W, 3].
    ``seed``: none given and ``draw_seed`` -> one is drawn, so the PNG says how to redo it;
    ``draw_seed=False`` when the caller brings its own noise generator."""
    from .schedulers import scheduler_names

    task = run_task(bundle.task, task)
    if takes_prompt(task):
        if prompt is None:
            raise UsageError("give a prompt with -p/--prompt: this bundle's model is "
                             "text-to-image (an empty prompt is allowed)")
        prompts = validate.prompts(prompt)
        negs = validate.negative_prompts(negative_prompt, len(prompts))
        g = validate.guidance(_given(guidance_scale, bundle.guidance_scale))
    else:
        prompts, negs, g = _no_prompt(task, bundle.task, prompt, negative_prompt, guidance_scale)
    steps = validate.steps(_given(num_inference_steps, bundle.num_inference_steps))
    name = validate.scheduler(scheduler or bundle.scheduler, scheduler_names())
    n = validate.batch(len(prompts), num_images_per_prompt, bundle.max_batch)
    limits = (bundle.size_multiple, bundle.min_size, bundle.max_size)
    level = _noise_level(noise_level, task, bundle)
    if task in (SUPER_RESOLUTION, UPSCALE):  # the size comes from the low-resolution image
        from .superres import SIDE_MULTIPLE, low_res_size

        if mask is not None:
            raise UsageError("--mask is for inpainting models; this bundle's model upscales")
        # SD x4: diffusers rounds to the VAE factor; 8 keeps the x4 result on the 8-pixel grid
        mult = (SIDE_MULTIPLE, SIDE_MULTIPLE) if task == SUPER_RESOLUTION else \
            (UPSCALE_SIDE_MULTIPLE, bundle.vae_scale_factor)
        lw, lh = low_res_size(init_image, height, width, strength, bundle, *mult)
        init = (InitImage.from_array(init_image, lw, lh) if isinstance(init_image, np.ndarray)
                else InitImage.from_file(init_image, lw, lh))
        h, w = lh * bundle.vae_scale_factor, lw * bundle.vae_scale_factor
    else:
        h = validate.size("height", _given(height, bundle.height), *limits)
        w = validate.size("width", _given(width, bundle.width), *limits)
    if seed is not None or not draw_seed:
        seed = None if seed is None else validate.seed(seed)
    else:
        seed = secrets.randbits(DRAWN_SEED_BITS)
    if task in (SUPER_RESOLUTION, UPSCALE):
        strength = None
    elif task == INPAINT:
        init, strength, mask = _inpaint(init_image, mask, strength, latents, h, w)
    else:
        if mask is not None:
            raise UsageError("--mask needs an inpainting model (a 9-channel U-Net, as "
                             "StableDiffusionInpaintPipeline has); this bundle's U-Net is not one")
        init, strength = _init_image(init_image, strength, latents, h, w)
    if latents is not None:
        f = bundle.vae_scale_factor
        validate.latents(latents, (len(prompts) * n, bundle.latent_channels, h // f, w // f), f)
        latents = _frozen(latents)
    return GenerationRequest(prompts, negs, steps, g, name, h, w, n, seed, strength, init,
                             latents, task, mask, level)


def _noise_level(value, task: str, bundle: BundleDefaults) -> int | None:
    if task != UPSCALE:
        if value is not None:
            raise UsageError("--noise-level is for the SD x4 upscaler "
                             "(StableDiffusionUpscalePipeline); this bundle's model is not one")
        return None
    value = bundle.default_noise_level if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value <= bundle.max_noise_level:
        raise UsageError(f"--noise-level {value} must be an integer from 0 to "
                         f"{bundle.max_noise_level} (the model's max_noise_level)")
    return int(value)


def _inpaint(init_image, mask, strength, latents, h: int, w: int):
    """(InitImage, strength, Mask) for inpainting; strength defaults to 1 as in diffusers,
    and initial latents may be given only then (below 1 they come from the image)."""
    from .inpaint import load_mask

    if init_image is None or mask is None:
        missing = " and ".join(f for f, v in (("--init-image", init_image), ("--mask", mask))
                               if v is None)
        raise UsageError(f"this bundle's model inpaints: give {missing} (white = repaint)")
    strength = validate.strength(_given(strength, INPAINT_STRENGTH), has_init_image=True)
    if latents is not None and strength < 1.0:
        raise UsageError("--latents with --init-image needs --strength 1 (inpainting)")
    m = load_mask(mask, init_image, w, h)  # size check against the init image first
    if isinstance(init_image, np.ndarray):
        return InitImage.from_array(init_image, w, h), strength, m
    return InitImage.from_file(init_image, w, h), strength, m


def _no_prompt(task: str, bundle_task: str | None, prompt, negative_prompt, guidance_scale):
    """Unconditional sampling: one empty prompt (for the batch count), no guidance."""
    given = prompt if isinstance(prompt, str) else (list(prompt) if prompt is not None else [])
    why = ("this bundle's model is unconditional (it has no text encoder)" if task == bundle_task
           else f"--task {task} samples without one")
    if given:
        raise UsageError(f"--prompt given, but {why}; drop --prompt")
    if negative_prompt is not None:
        raise UsageError(f"--negative-prompt given, but {why}; drop it")
    if guidance_scale is not None and guidance_scale > 1.0:
        raise UsageError(f"--guidance-scale {guidance_scale} needs a prompt, but {why}; drop it")
    return ("",), ("",), 1.0


def _given(value, default):
    return default if value is None else value


def _init_image(init_image, strength, latents, h: int, w: int):
    """(InitImage, strength) for img2img, (None, None) for text-to-image."""
    if init_image is None:
        if strength is not None:
            validate.strength(strength, has_init_image=False)
        return None, None
    strength = validate.strength(_given(strength, DEFAULT_STRENGTH), has_init_image=True)
    if latents is not None:
        raise UsageError("--latents and --init-image cannot be combined")
    if isinstance(init_image, np.ndarray):
        return InitImage.from_array(init_image, w, h), strength
    return InitImage.from_file(init_image, w, h), strength
