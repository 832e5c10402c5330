"""What the FP16/INT8 tools feed a bundle's sampling loop, per task (issue 14).

Calibration and the end-to-end quality check run the bundle's own FP32 pipeline over a
list of prompts. A model that takes no prompt gets something else in their place, named in
the labels that the manifest records as the "prompts":

* unconditional: nothing — one sample per label, each its own seed;
* super-resolution: a synthetic low-resolution image per label (smooth colour waves, seeded
  by its index), of the bundle's default output size divided by the factor, rounded up to
  the upscaler's side multiple;
* inpainting: the prompts, plus a synthetic image at the default size and a mask of its
  centre quarter;
* the SD x4 upscaler: the prompts, plus a synthetic low-resolution image (as above, sides
  rounded up to multiples of 8), at the bundle's default noise level.
"""

from __future__ import annotations

import numpy as np

from ldm_edge.runtime.tasks import INPAINT, SUPER_RESOLUTION, UNCONDITIONAL, UPSCALE, bundle_task


def synthetic_image(index: int, height: int, width: int) -> np.ndarray:
    """uint8 [1, H, W, 3]: three seeded plane waves, one a channel — smooth, like a photo
    more than like noise, and different for every index."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y)
                    + rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    return np.round((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)[None]


def centre_mask(height: int, width: int) -> np.ndarray:
    m = np.zeros((1, height, width), np.uint8)
    m[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return m


def _low_res_side(schema, key: str) -> int:
    from ldm_edge.runtime.request import UPSCALE_SIDE_MULTIPLE
    from ldm_edge.runtime.superres import SIDE_MULTIPLE

    mult = UPSCALE_SIDE_MULTIPLE if bundle_task(schema.task) == UPSCALE else SIDE_MULTIPLE
    side = int(schema.defaults.get(key, 256)) // int(schema.vae_scale_factor)
    return max(mult, -(-side // mult) * mult)


def labels(schema, prompts: list[str]) -> list[str]:
    """What is recorded as the "prompts" of a calibration or quality run of this bundle."""
    task = bundle_task(schema.task)
    if task == UNCONDITIONAL:
        return [f"(unconditional sample {i})" for i in range(len(prompts))]
    if task == SUPER_RESOLUTION:
        h, w = _low_res_side(schema, "height"), _low_res_side(schema, "width")
        return [f"(synthetic low-resolution image {i}, {w}x{h})" for i in range(len(prompts))]
    return list(prompts)


def call_inputs(schema, label: str, index: int) -> dict:
    """The Pipeline keywords of item ``index`` (whose label is ``label``) for this bundle."""
    task = bundle_task(schema.task)
    if task == UNCONDITIONAL:
        return {}
    if task == SUPER_RESOLUTION:
        return {"init_image": synthetic_image(index, _low_res_side(schema, "height"),
                                              _low_res_side(schema, "width"))}
    if task == UPSCALE:
        return {"prompt": label, "init_image": synthetic_image(
            index, _low_res_side(schema, "height"), _low_res_side(schema, "width"))}
    if task == INPAINT:
        h, w = int(schema.defaults["height"]), int(schema.defaults["width"])
        return {"prompt": label, "init_image": synthetic_image(index, h, w),
                "mask": centre_mask(h, w)}
    return {"prompt": label}
