"""Super-resolution with the LDM paper's upscaler (diffusers' LDMSuperResolutionPipeline): the
low-resolution image, in [-1, 1], is concatenated to latents of its own size on the channel axis
at every step, and the VQ-f4 decoder makes an image ``f`` times its size. The image is taken at
its own size: its sides must be multiples of ``SIDE_MULTIPLE`` (diffusers' pipeline silently
crops-and-resizes to them; here the user is told), and ``f`` times them must lie in the
bundle's exported range."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UsageError

# diffusers' LDMSuperResolutionPipeline.preprocess resizes the image to multiples of 32
SIDE_MULTIPLE = 32


def low_res_size(init_image, height, width, strength, bundle,
                 multiple: int = SIDE_MULTIPLE, diffusers_multiple: int = SIDE_MULTIPLE
                 ) -> tuple[int, int]:
    """(width, height) of the low-resolution image of an upscaling request, checked: its sides
    multiples of ``multiple`` (diffusers' pipeline crops to ``diffusers_multiple``)."""
    if init_image is None:
        raise UsageError(f"this bundle's model upscales x{bundle.vae_scale_factor}: give "
                         f"--init-image LOW.png (sides multiples of {multiple})")
    if height is not None or width is not None:
        raise UsageError(f"the upscaled size is x{bundle.vae_scale_factor} the --init-image's; "
                         f"drop --height/--width")
    if strength is not None:
        raise UsageError("--strength is not used by super-resolution (the whole schedule runs); "
                         "drop it")
    if isinstance(init_image, np.ndarray):
        if init_image.ndim != 4 or init_image.shape[0] != 1 or init_image.shape[3] != 3:
            raise UsageError("init image must be uint8 [1, H, W, 3]")
        w, h = init_image.shape[2], init_image.shape[1]
        name = "the init image"
    else:
        from .inpaint import image_size

        w, h = image_size(init_image, "--init-image")
        name = f"--init-image {Path(init_image).name}"
    if w % multiple or h % multiple:
        dm = diffusers_multiple
        raise UsageError(f"{name} is {w}x{h}: this upscaler takes sides that are multiples of "
                         f"{multiple} (diffusers would crop it to {w - w % dm}x{h - h % dm}); "
                         f"resize or crop it")
    f = bundle.vae_scale_factor
    lo, hi = bundle.min_size, bundle.max_size
    if not (lo <= w * f <= hi and lo <= h * f <= hi):
        raise UsageError(f"{name} is {w}x{h}: its x{f} result ({w * f}x{h * f}) lies outside "
                         f"the bundle's exported range {lo}..{hi} pixels")
    return w, h


def condition(image: np.ndarray) -> np.ndarray:
    """uint8 [1, h, w, 3] -> float32 [1, 3, h, w] in [-1, 1], as diffusers' preprocess."""
    x = (image.astype(np.float32) / 255.0) * 2.0 - 1.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
