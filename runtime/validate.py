"""Check and complete generation parameters against the bundle, with errors a user can act on."""

from __future__ import annotations

import math

import numpy as np

from .errors import UsageError

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


def _prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise UsageError("give at least one prompt")
    for q in prompts:
        if not isinstance(q, str):
            raise UsageError(f"prompts must be text, got {type(q).__name__}")
        if "\x00" in q:
            raise UsageError("prompt contains a NUL character")
    return prompts


def _size(manifest, key: str, value) -> int:
    defaults = manifest.get("defaults", {})
    v = int(value if value is not None else defaults.get(key, 512))
    mult = int(manifest.get("size_multiple", 8))
    dims = manifest.get("dims", {})
    lo, hi = int(dims.get("min_size", mult)), int(dims.get("max_size", 1 << 16))
    if v <= 0 or v % mult:
        raise UsageError(f"--{key} {v} must be a positive multiple of {mult}")
    if not lo <= v <= hi:
        raise UsageError(f"--{key} {v} is outside the bundle's exported range {lo}..{hi}; "
                         f"re-export with --min-size/--max-size")
    return v


def resolve_params(manifest, prompt, negative_prompt, steps, guidance, scheduler, height, width,
                   num_images, seed, latents, init_image, strength, default_scheduler,
                   names) -> dict:
    defaults = manifest.get("defaults", {})
    prompts = _prompts(prompt)
    if negative_prompt is None:
        negs = [""] * len(prompts)
    else:
        negs = _prompts(negative_prompt)
        if len(negs) == 1:
            negs = negs * len(prompts)
        if len(negs) != len(prompts):
            raise UsageError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
    steps = int(steps if steps is not None else defaults.get("num_inference_steps", 25))
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps {steps} must be between 1 and {MAX_STEPS}")
    g = float(guidance if guidance is not None else defaults.get("guidance_scale", 7.5))
    if not math.isfinite(g) or not 0.0 <= g <= MAX_GUIDANCE:
        raise UsageError(f"--guidance-scale {g} must be between 0 and {MAX_GUIDANCE}")
    name = scheduler or default_scheduler
    if name not in names:
        raise UsageError(f"unknown scheduler {name!r}; choose from {', '.join(names)}")
    if num_images < 1:
        raise UsageError("--num-images must be at least 1")
    h, w = _size(manifest, "height", height), _size(manifest, "width", width)
    max_batch = int(manifest.get("dims", {}).get("max_batch", 1 << 16))
    if len(prompts) * num_images > max_batch:
        raise UsageError(f"{len(prompts) * num_images} images in one call, the bundle was exported "
                         f"for at most {max_batch} (--max-batch); ask for fewer")
    if init_image is not None:
        if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
            raise UsageError(f"--strength {strength} must be in (0, 1]")
        if latents is not None:
            raise UsageError("--latents and --init-image cannot be combined")
        if init_image.ndim != 4 or init_image.shape[1:] != (h, w, 3):
            raise UsageError(f"init image must be {w}x{h} RGB")
    if latents is not None:
        _check_latents(manifest, latents, len(prompts) * num_images, h, w)
    return {"prompts": prompts, "negative_prompts": negs, "num_inference_steps": steps,
            "guidance_scale": g, "scheduler": name, "height": h, "width": w,
            "num_images_per_prompt": int(num_images), "seed": seed, "strength": strength,
            "init_image": None if init_image is None else "given"}


def _check_latents(manifest, latents, n: int, h: int, w: int) -> None:
    f = int(manifest["vae_scale_factor"])
    want = (n, int(manifest["latent_channels"]), h // f, w // f)
    if not isinstance(latents, np.ndarray) or latents.dtype != np.float32:
        raise UsageError(f"--latents must be a float32 array of shape {list(want)}")
    if tuple(latents.shape) != want:
        raise UsageError(f"--latents has shape {list(latents.shape)}, expected {list(want)} "
                         f"([num_images, channels, height/{f}, width/{f}])")
    if not np.isfinite(latents).all():
        raise UsageError("--latents contains NaN or Inf")
