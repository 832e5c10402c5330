"""Synthetic pictures that stand in for a user's when a calibration or quality run needs an
image (super-resolution, upscaling, inpainting): smooth, seeded, different per index."""

from __future__ import annotations

import numpy as np


def synthetic_image(index: int, height: int, width: int) -> np.ndarray:
    """uint8 [1, H, W, 3]: three seeded plane waves, one a channel — smooth, like a photo
    more than like noise, and different for every index."""
    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y)
                    + rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    return np.round((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)[None]


def centre_mask(height: int, width: int) -> np.ndarray:
    """uint8 [1, H, W]: the centre quarter white (repaint), the rest black."""
    m = np.zeros((1, height, width), np.uint8)
    m[:, height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return m


def low_res_side(schema, key: str, multiple: int) -> int:
    """The side of a stand-in low-resolution image: the bundle's default output side over the
    upscaling factor, rounded up to ``multiple``."""
    side = int(getattr(schema.defaults, key)) // int(schema.vae_scale_factor)
    return max(multiple, -(-side // multiple) * multiple)
