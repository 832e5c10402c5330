"""Control images made from photos: ``--control-preprocess canny[:LOW:HIGH]`` (OpenCV's Canny
edge detector, the recipe of diffusers' canny ControlNet examples: the photo's RGB pixels ->
``cv2.Canny(pixels, LOW, HIGH)`` -> the edge map on all three channels), applied to the photo as
it is, before the control image is resized to the output size as any other.

OpenCV is optional (``pip install 'ldm-edge[control]'``: opencv-python-headless). Model-based
preprocessors (depth, pose) are out of scope: run them elsewhere and pass their output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UsageError

# diffusers' canny examples' thresholds (StableDiffusionControlNetPipeline's docs)
CANNY_LOW, CANNY_HIGH = 100, 200
PREPROCESSORS = ("canny",)


@dataclass(frozen=True)
class Preprocess:
    kind: str
    low: int = CANNY_LOW
    high: int = CANNY_HIGH

    def __str__(self) -> str:
        return f"{self.kind}:{self.low}:{self.high}"

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> the edge map, uint8 [H, W, 3] (0 or 255)."""
        try:
            import cv2
        except ImportError:
            raise UsageError("--control-preprocess canny needs OpenCV: "
                             "pip install 'ldm-edge[control]' (opencv-python-headless)")
        edges = cv2.Canny(np.ascontiguousarray(pixels), self.low, self.high)
        return np.repeat(edges[:, :, None], 3, axis=2)


def parse_preprocess(value) -> Preprocess | None:
    """``canny`` or ``canny:LOW:HIGH`` (None: no preprocessing); one-line UsageErrors."""
    if value is None or isinstance(value, Preprocess):
        return value
    kind, *rest = str(value).split(":")
    if kind not in PREPROCESSORS or len(rest) not in (0, 2):
        raise UsageError(f"--control-preprocess {value!r}: use canny or canny:LOW:HIGH")
    try:
        low, high = (int(x) for x in rest) if rest else (CANNY_LOW, CANNY_HIGH)
    except ValueError:
        raise UsageError(f"--control-preprocess {value!r}: LOW and HIGH must be integers")
    if not 0 <= low <= high <= 1000:
        raise UsageError(f"--control-preprocess {value!r}: need 0 <= LOW <= HIGH <= 1000")
    return Preprocess(kind, low, high)
