"""SDXL's micro-conditioning: the request's sizes, crop and aesthetic scores, resolved against
the bundle (``resolve``) and turned into the U-Net's ``time_ids`` (``time_ids``), as
StableDiffusionXL*Pipeline._get_add_time_ids makes them. Pure python + numpy."""

from __future__ import annotations

import math

import numpy as np

from .errors import UsageError

# StableDiffusionXLImg2ImgPipeline's defaults for the refiner's aesthetic-score conditioning
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
# the options that are SDXL's only, for the refusal on other bundles
SDXL_OPTIONS = {"original_size": "--original-size", "crop_top_left": "--crop-top-left",
                "target_size": "--target-size", "aesthetic_score": "--aesthetic-score",
                "negative_aesthetic_score": "--negative-aesthetic-score"}
MAX_SIDE = 1 << 16  # a size in pixels beyond any image (the conditioning is a sinusoid of it)


def _pair(flag: str, value, minimum: int) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} takes two whole numbers, HEIGHT WIDTH (as diffusers' "
                         f"(height, width) tuples)") from None
    if not (minimum <= a <= MAX_SIDE and minimum <= b <= MAX_SIDE):
        raise UsageError(f"{flag} {a} {b}: each must be between {minimum} and {MAX_SIDE} pixels")
    return a, b


def _score(flag: str, value) -> float | None:
    if value is None:
        return None
    if not math.isfinite(float(value)):
        raise UsageError(f"{flag} {value} must be a finite number (the refiner was trained "
                         f"on scores of about 1 to 10)")
    return float(value)


def resolve(bundle, h: int, w: int, negative_given: bool, given: dict) -> dict:
    """The request fields of SDXL's micro-conditioning (``given``: SDXL_OPTIONS keywords,
    None where not given), defaults filled as diffusers fills them: the output size, crop
    (0, 0), the refiner's scores 6 and 2.5. Refused, naming the option, on a bundle whose
    U-Net does not take them."""
    if not bundle.added_conditioning:
        for key, flag in SDXL_OPTIONS.items():
            if given.get(key) is not None:
                raise UsageError(f"{flag} is SDXL's micro-conditioning; this bundle's U-Net "
                                 f"takes no time ids (drop {flag})")
        return {}
    if not bundle.aesthetics:
        for key in ("aesthetic_score", "negative_aesthetic_score"):
            if given.get(key) is not None:
                raise UsageError(f"{SDXL_OPTIONS[key]} is the SDXL refiner's; this bundle's "
                                 f"U-Net conditions on the target size instead (drop it)")
    out = {"original_size": _pair("--original-size", given.get("original_size"), 1) or (h, w),
           "crop_top_left": _pair("--crop-top-left", given.get("crop_top_left"), 0) or (0, 0),
           "target_size": _pair("--target-size", given.get("target_size"), 1) or (h, w),
           "zero_negative": bundle.force_zeros and not negative_given}
    if bundle.aesthetics:
        a = _score("--aesthetic-score", given.get("aesthetic_score"))
        na = _score("--negative-aesthetic-score", given.get("negative_aesthetic_score"))
        out.update(aesthetic_score=AESTHETIC_SCORE if a is None else a,
                   negative_aesthetic_score=NEGATIVE_AESTHETIC_SCORE if na is None else na)
    return out


def time_ids(req, negative: bool) -> np.ndarray:
    """[1, 6] (original size, crop, target size) or, for the refiner, [1, 5] (original size,
    crop, aesthetic score; the negative score for the unconditioned half), float32."""
    head = tuple(req.original_size) + tuple(req.crop_top_left)
    if req.aesthetic_score is not None:
        tail = (req.negative_aesthetic_score if negative else req.aesthetic_score,)
    else:
        tail = tuple(req.target_size)
    return np.asarray([head + tail], dtype=np.float32)
