"""Inpainting with a 9-channel U-Net (diffusers' StableDiffusionInpaintPipeline).

The U-Net takes, on channels, the noisy latents (4), the mask at latent size (1) and the
latents of the masked image (4). As diffusers does: the mask is read as grayscale and
binarised at 0.5 (white = repaint); the masked image is the init image in [-1, 1] with the
repainted pixels set to 0; the latent mask takes every f-th pixel (nearest-neighbour
interpolation by the VAE factor f).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .image import MAX_INIT_PIXELS

# diffusers' mask processor binarises at this level of [0, 1]
MASK_THRESHOLD = 0.5


@dataclass(frozen=True)
class Mask:
    """The inpainting mask at the request's size; recorded by where it came from and a hash."""

    pixels: np.ndarray = field(repr=False, compare=False)  # uint8 [1, H, W], read-only
    source: str
    sha256: str

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256}


def image_size(path: str | Path, flag: str) -> tuple[int, int]:
    """(width, height) of an image file, for the size check before anything is resized."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_INIT_PIXELS
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise UsageError(f"{flag} {path} not found")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"{flag} {path} is not a readable image ({type(e).__name__})")


def load_mask(mask, init_image, width: int, height: int) -> Mask:
    """A file path (its size must equal the init image's; both are then resized to the
    request's size, Lanczos, as diffusers does) or uint8 [1, H, W] at the request's size."""
    import hashlib

    if isinstance(mask, np.ndarray):
        if mask.dtype != np.uint8 or mask.shape != (1, height, width):
            raise UsageError(f"mask must be uint8 [1, {height}, {width}]")
        px = mask.copy()
        px.setflags(write=False)
        return Mask(px, "array", hashlib.sha256(px.tobytes()).hexdigest())
    from PIL import Image

    from .fsutil import sha256_file

    mw, mh = image_size(mask, "--mask")
    if isinstance(init_image, (str, Path)):
        iw, ih = image_size(init_image, "--init-image")
    else:
        iw, ih = width, height
    if (mw, mh) != (iw, ih):
        raise UsageError(f"--mask {mask} is {mw}x{mh}, the init image is {iw}x{ih}; "
                         f"give a mask of the image's size")
    with Image.open(mask) as im:
        im = im.convert("L")
        if im.size != (width, height):
            im = im.resize((width, height), Image.Resampling.LANCZOS)
        px = np.asarray(im, dtype=np.uint8)[None].copy()
    px.setflags(write=False)
    return Mask(px, Path(mask).name, sha256_file(mask))


def condition(image: np.ndarray, mask: np.ndarray, factor: int):
    """(latent mask [1, 1, h, w], masked image [1, 3, H, W] in [-1, 1]) from uint8 pixels."""
    m = (mask.astype(np.float32) / 255.0 >= MASK_THRESHOLD).astype(np.float32)[:, None]
    x = (image.astype(np.float32) / 255.0) * 2.0 - 1.0
    masked = x.transpose(0, 3, 1, 2) * (m < MASK_THRESHOLD)
    return np.ascontiguousarray(m[:, :, ::factor, ::factor]), masked.astype(np.float32)
