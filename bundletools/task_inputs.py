"""What the FP16/INT8 tools feed a bundle's sampling loop: each task's stand-ins for a user's
request (``TaskPlan.labels`` / ``TaskPlan.stand_in`` in runtime/tasks/).

Calibration and the end-to-end quality check run the bundle's own FP32 pipeline over a list of
prompts. A model that takes no prompt gets something else in their place, named in the labels
that the manifest records as the "prompts": unconditional models nothing (one sample per
label, each its own seed); super-resolution a synthetic low-resolution image per label;
inpainting the prompts with a synthetic image and its centre quarter as the mask; the SD x4
upscaler the prompts with a synthetic low-resolution image.
"""

from __future__ import annotations

from ldm_edge.runtime.tasks import plan_of


def labels(schema, prompts: list[str]) -> list[str]:
    """What is recorded as the "prompts" of a calibration or quality run of this bundle."""
    return plan_of(schema.task).labels(schema, prompts)


def call_inputs(schema, label: str, index: int) -> dict:
    """The Pipeline keywords of item ``index`` (whose label is ``label``) for this bundle."""
    return plan_of(schema.task).stand_in(schema, label, index)


def sized_by_image(schema) -> bool:
    """True where the output size follows the stand-in image (no height/width to pass)."""
    return plan_of(schema.task).sized_by_image


# -- ControlNet stand-ins ------------------------------------------------------------------------
# A bundle with ControlNets is calibrated and checked with them active too: every other run
# (CONTROL_EVERY) takes the next ControlNet, at scale 1, on a synthetic control image of one of
# two kinds real ones come in: thin white lines on black (canny/lineart/pose-like: sparse, hard
# edges) and a smooth ramp (depth/normal-like). The runs between stay without control, so the
# U-Net's plain calls (residual inputs zeros) are calibrated and checked as before.
CONTROL_EVERY = 2
STAND_IN_LINES = 7  # rectangles outlined on the line-art stand-in


def control_stand_in(schema, index: int, height: int, width: int,
                     every: int = CONTROL_EVERY) -> list | None:
    """The ``control`` keyword of run ``index`` (a list of one (name, uint8 [H, W, 3] image,
    scale)), or None for a run without control or a bundle without ControlNets."""
    import numpy as np

    names = list(getattr(schema, "controlnets", None) or {})
    if not names or index % every != every - 1:
        return None
    k = index // every
    return [(names[k % len(names)], stand_in_image(k, height, width), 1.0)]


def stand_in_image(k: int, height: int, width: int):
    """Stand-in control image ``k``: uint8 [H, W, 3], line art for even ``k``, a depth-like
    ramp for odd."""
    import numpy as np

    rng = np.random.default_rng(1000 + k)
    if k % 2 == 0:  # line art: outlined rectangles
        img = np.zeros((height, width), np.uint8)
        for _ in range(STAND_IN_LINES):
            y0, y1 = sorted(rng.integers(0, height, 2))
            x0, x1 = sorted(rng.integers(0, width, 2))
            img[y0:y1 + 1, [x0, x1]] = 255
            img[[y0, y1], x0:x1 + 1] = 255
    else:  # a depth-like ramp: near (bright) at a random point, falling off smoothly
        yy, xx = np.mgrid[0:height, 0:width]
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        dist = np.hypot(yy - cy, xx - cx) / np.hypot(height, width)
        img = (255 * np.clip(1.0 - dist * 1.5, 0, 1)).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)
