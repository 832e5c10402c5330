"""The checks behind a generation request: each raises a one-line UsageError that names the
option and what would work (runtime/request.py calls them, once per request)."""

from __future__ import annotations

import math

import numpy as np

from .errors import UsageError

MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
# numpy's default_rng takes any non-negative integer; 64 bits is what seed fields of other
# tools (and the PNG readers that show them) hold
MAX_SEED = 2**64 - 1


def prompts(prompt) -> tuple[str, ...]:
    out = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    if not out:
        raise UsageError("give at least one prompt")
    for q in out:
        if not isinstance(q, str):
            raise UsageError(f"prompts must be text, got {type(q).__name__}")
        if "\x00" in q:
            raise UsageError("prompt contains a NUL character")
    return out


def negative_prompts(negative_prompt, n: int) -> tuple[str, ...]:
    """One negative prompt per prompt: none given -> "", one given -> repeated."""
    if negative_prompt is None:
        return ("",) * n
    negs = prompts(negative_prompt)
    if len(negs) == 1:
        negs = negs * n
    if len(negs) != n:
        raise UsageError(f"{len(negs)} negative prompts for {n} prompts")
    return negs


def steps(value: int) -> int:
    v = int(value)
    if not 1 <= v <= MAX_STEPS:
        raise UsageError(f"--steps {v} must be between 1 and {MAX_STEPS}")
    return v


def guidance(value: float) -> float:
    g = float(value)
    if not math.isfinite(g) or not 0.0 <= g <= MAX_GUIDANCE:
        raise UsageError(f"--guidance-scale {g} must be between 0 and {MAX_GUIDANCE}")
    return g


def scheduler(name: str, names: list[str]) -> str:
    if name not in names:
        raise UsageError(f"unknown scheduler {name!r}; choose from {', '.join(names)}")
    return name


def size(key: str, value: int, multiple: int, lo: int, hi: int) -> int:
    v = int(value)
    if v <= 0 or v % multiple:
        raise UsageError(f"--{key} {v} must be a positive multiple of {multiple}")
    if not lo <= v <= hi:
        raise UsageError(f"--{key} {v} is outside the bundle's exported range {lo}..{hi}; "
                         f"re-export with --min-size/--max-size")
    return v


def batch(num_prompts: int, num_images: int, max_batch: int) -> int:
    if num_images < 1:
        raise UsageError("--num-images must be at least 1")
    if num_prompts * num_images > max_batch:
        raise UsageError(f"{num_prompts * num_images} images in one call, the bundle was exported "
                         f"for at most {max_batch} (--max-batch); ask for fewer")
    return int(num_images)


def seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 0 <= value <= MAX_SEED:
        raise UsageError(f"--seed {value} must be an integer from 0 to {MAX_SEED} (2**64 - 1)")
    return int(value)


def strength(value, has_init_image: bool) -> float:
    if not has_init_image:
        raise UsageError(f"--strength {value} needs --init-image (it is how much of that image "
                         f"is redrawn); drop --strength or give --init-image")
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise UsageError(f"--strength {value} must be in (0, 1]")
    return float(value)


def fraction(flag: str, value) -> float:
    """A fraction of the schedule, strictly between 0 and 1 (SDXL's denoising_start/end)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
            or not 0.0 < float(value) < 1.0:
        raise UsageError(f"{flag} {value} must be a fraction of the schedule, between 0 and 1")
    return float(value)


def init_pixels(image, height: int, width: int) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 4 \
            or image.shape[1:] != (height, width, 3):
        raise UsageError(f"init image must be {width}x{height} RGB")


def latents(array, want: tuple[int, ...], factor: int) -> None:
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        raise UsageError(f"--latents must be a float32 array of shape {list(want)}")
    if tuple(array.shape) != want:
        raise UsageError(f"--latents has shape {list(array.shape)}, expected {list(want)} "
                         f"([num_images, channels, height/{factor}, width/{factor}])")
    if not np.isfinite(array).all():
        raise UsageError("--latents contains NaN or Inf")


def vae_tile_size(value, multiple: int, lo: int, hi: int) -> int:
    """A VAE tile side in pixels: a positive multiple of the VAE's scale factor, inside the
    decoder's exported range (``lo``..``hi`` pixels)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or value <= 0 or value % multiple:
        raise UsageError(f"--vae-tile-size {value} must be a positive multiple of {multiple}")
    if not lo <= value <= hi:
        raise UsageError(f"--vae-tile-size {value} is outside the VAE decoder's exported range "
                         f"{lo}..{hi} pixels; choose a size in it")
    return int(value)
