"""The pictures a request brings (``InitImage``; the mask is runtime/inpaint.py's ``Mask``),
recorded by where they came from and a hash. Shared by runtime/request.py and the task plans
(runtime/tasks/), which each resolve their own inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import validate


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
