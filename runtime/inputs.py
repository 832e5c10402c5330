"""The parts a request is resolved from: what the bundle says (``BundleDefaults``) and the
pictures the caller brings (``InitImage``; the mask is runtime/inpaint.py's ``Mask``).

Shared by runtime/request.py and the task plans (runtime/tasks/), which each resolve their
own inputs from them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import validate

# what a manifest without "defaults" gets: the SD 1.x/2.x pipelines' own defaults
FALLBACK_SIZE, FALLBACK_STEPS, FALLBACK_GUIDANCE = 512, 25, 7.5


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
    task: str | None = None  # the bundle's (runtime/tasks/); None: text-to-image
    max_noise_level: int | None = None  # the SD x4 upscaler's
    default_noise_level: int | None = None

    @classmethod
    def from_manifest(cls, manifest) -> "BundleDefaults":
        """From a bundle's typed manifest (schema.BundleManifest; not imported here: the
        schema imports the task registry, which imports this module)."""
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


def sha256_of(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def frozen(array: np.ndarray) -> np.ndarray:
    """A read-only copy: a resolved request is not changed behind its back."""
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
        return cls(frozen(pixels), Path(path).name, sha256_file(path))

    @classmethod
    def from_array(cls, pixels: np.ndarray, width: int, height: int) -> "InitImage":
        validate.init_pixels(pixels, height, width)
        return cls(frozen(pixels), "array", sha256_of(pixels))

    @classmethod
    def load(cls, image, width: int, height: int) -> "InitImage":
        """A file path or uint8 [1, H, W, 3] pixels, at this size."""
        if isinstance(image, np.ndarray):
            return cls.from_array(image, width, height)
        return cls.from_file(image, width, height)

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256}
