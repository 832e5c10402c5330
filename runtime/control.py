"""ControlNet at run time: the request's control images, and each step's residuals.

``ldm-run --control NAME:IMAGE[:SCALE]`` (repeatable), ``--control-start``/``--control-end``,
``--guess-mode``, as diffusers' StableDiffusionControlNetPipeline (and its img2img sibling):

* the control image is prepared as its ``prepare_image`` does: resized to the output size
  with PIL's Lanczos in the file's own mode, then RGB, [0, 1] (VaeImageProcessor with
  ``do_convert_rgb=True, do_normalize=False``), repeated per image, doubled for the
  classifier-free guidance batch unless in guess mode;
* at step ``i`` of ``n`` a ControlNet runs unless ``i / n < start or (i + 1) / n > end``
  (its ``controlnet_keep``; an inactive step's residuals are zeros, what diffusers' scale 0
  gives);
* several ControlNets' residuals are summed in order (MultiControlNetModel);
* guess mode: each residual k of K scaled by ``logspace(-1, 0, K)[k]`` times the scale and,
  under guidance, the ControlNet runs on the conditional half only, zeros for the other.

A bundle whose U-Net takes residuals is fed zeros when no ControlNet runs: the plain picture,
bit for bit. Pure numpy; the graphs are runtime/bundle/control_spec.py's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .bundle.control_spec import (ADDED_INPUTS, CONDITIONING_SCALE, component_key,
                                  residuals_of, takes_residuals)
from .errors import UsageError
from .control_preprocess import Preprocess, parse_preprocess
from .inputs import frozen, sha256_of

# Pipeline.request's keywords that are this module's (the --control* rows of runtime/fields.py)
CONTROL_KEYWORDS = ("control", "control_start", "control_end", "guess_mode",
                    "control_preprocess")
# guess mode's residual scales: 10**-1 .. 10**0 over the residuals (diffusers' ControlNetModel,
# torch.logspace(-1, 0, K))
GUESS_MODE_EXPONENTS = (-1.0, 0.0)
EXPORT_HINT = "export one with `ldm-export onnx SOURCE --controlnet DIR`"


@dataclass(frozen=True)
class ControlImage:
    """One ControlNet of a request: its name, scale and prepared image (float32 [1, 3, H, W]
    in [0, 1], read-only), recorded by where the image came from and a hash."""

    name: str
    scale: float
    pixels: np.ndarray = field(repr=False, compare=False)
    source: str
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "scale": self.scale, "image": self.source,
                "sha256": self.sha256}


@dataclass(frozen=True)
class ControlRequest:
    """The request's ControlNets and when they act (diffusers' control_guidance_start/end)."""

    images: tuple[ControlImage, ...]
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocess: str | None = None  # "canny:LOW:HIGH" (runtime/control_preprocess.py)

    def active(self, i: int, n: int) -> bool:
        """diffusers' controlnet_keep at step ``i`` of ``n``."""
        return not (i / n < self.start or (i + 1) / n > self.end)

    def to_dict(self) -> dict:
        return {"controlnets": [c.to_dict() for c in self.images], "start": self.start,
                "end": self.end, "guess_mode": self.guess_mode, "preprocess": self.preprocess}


def parse_control_arg(arg) -> tuple[str, object, float]:
    """``NAME:IMAGE[:SCALE]`` (a trailing number is the scale, default 1), or a tuple
    (name, image, scale) / (name, image) from code, the image a path or uint8 pixels."""
    if not isinstance(arg, str):
        name, image, *scale = arg
        return str(name), image, float(scale[0]) if scale else 1.0
    name, sep, rest = arg.partition(":")
    if not sep or not name or not rest:
        raise UsageError(f"--control {arg!r}: give NAME:IMAGE[:SCALE]")
    image, sep, tail = rest.rpartition(":")
    try:
        scale = float(tail) if sep else 1.0
    except ValueError:  # a colon in the file's name, no scale
        image, scale = rest, 1.0
    if not sep:
        image = rest
    if not math.isfinite(scale):
        raise UsageError(f"--control {arg!r}: the scale must be a finite number")
    return name, image, scale


def resolve_control(manifest, req, control=None, control_start=None, control_end=None,
                    guess_mode=False, control_preprocess=None):
    """``req`` with its ControlRequest (``req.control``), checked against the bundle; ``req``
    itself when no ControlNet is asked for. One-line UsageErrors."""
    if not control:
        for flag, given in (("--control-start", control_start is not None),
                            ("--control-end", control_end is not None),
                            ("--guess-mode", bool(guess_mode)),
                            ("--control-preprocess", control_preprocess is not None)):
            if given:
                raise UsageError(f"{flag} needs --control NAME:IMAGE")
        return req
    have = manifest.schema.controlnets
    if not have:
        raise UsageError(f"--control: this bundle has no ControlNet; {EXPORT_HINT}")
    start = 0.0 if control_start is None else float(control_start)
    end = 1.0 if control_end is None else float(control_end)
    if not 0.0 <= start < end <= 1.0:
        raise UsageError(f"--control-start {start} and --control-end {end}: need "
                         f"0 <= start < end <= 1")
    pre = parse_preprocess(control_preprocess)
    images = []
    for arg in ([control] if isinstance(control, str) else list(control)):
        name, image, scale = parse_control_arg(arg)
        if name not in have:
            raise UsageError(f"--control {name}: this bundle has no ControlNet of that name "
                             f"(it has: {', '.join(have)})")
        pixels, source, sha = load_control_image(image, req.width, req.height, pre)
        images.append(ControlImage(name, scale, frozen(pixels), source, sha))
    return replace(req, control=ControlRequest(tuple(images), start, end, bool(guess_mode),
                                               None if pre is None else str(pre)))


def load_control_image(image, width: int, height: int,
                       pre: Preprocess | None = None) -> tuple[np.ndarray, str, str]:
    """float32 [1, 3, H, W] in [0, 1], as diffusers' control image processor makes it; with the
    source's name and sha256. ``image``: a file, or uint8 [H, W, 3] pixels at the size.
    ``pre``: made from the picture first (canny edges), before it is resized."""
    if isinstance(image, np.ndarray):
        px = image[0] if image.ndim == 4 else image
        if px.dtype != np.uint8 or px.shape != (height, width, 3):
            raise UsageError(f"a control image array must be uint8 [{height}, {width}, 3], "
                             f"got {px.dtype} {list(px.shape)}")
        return _planar(pre.apply(px) if pre else px), "array", sha256_of(px)
    from .fsutil import sha256_file

    pixels = _read_resized(image, width, height, pre)
    return _planar(pixels), Path(image).name, sha256_file(image)


def _read_resized(path, width: int, height: int, pre: Preprocess | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from .image import MAX_INIT_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_INIT_PIXELS
    try:
        with Image.open(path) as im:  # resized in its own mode, then RGB (diffusers' order)
            if pre is not None:  # the edge map of the photo as it is, then resized
                im = Image.fromarray(pre.apply(np.asarray(im.convert("RGB"))))
            im = im.resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UsageError(f"--control image {path} not found")
    except Image.DecompressionBombError:
        raise UsageError(f"--control image {path} is too large (over {MAX_INIT_PIXELS} pixels)")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"--control image {path} is not a readable image ({type(e).__name__})")


def _planar(pixels: np.ndarray) -> np.ndarray:
    return (pixels.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()


# -- the loop -----------------------------------------------------------------------------------
class ControlSteps:
    """One run's ControlNet residuals: ``zeros`` (the U-Net's residual inputs when no
    ControlNet acts: bound once with the steady inputs), and ``feeds`` for each step."""

    def __init__(self, pipe, req, batch: int, latent_shape: tuple):
        unet = pipe.backend("unet").spec
        self.pipe, self.control, self.guided = pipe, getattr(req, "control", None), req.guided
        if self.control is not None and not takes_residuals(unet):
            raise UsageError("--control: this bundle's U-Net takes no ControlNet residuals; "
                             "re-export it with --controlnet")
        self.residuals = residuals_of(unet) if takes_residuals(unet) else []
        h, w = latent_shape[2:]
        self.zeros = {r.name: np.zeros(r.shape(batch, h, w), np.float32)
                      for r in self.residuals}
        self._images = self._batched(latent_shape[0]) if self.control is not None else []
        # the loop's steady inputs a ControlNet takes too: the text states, and an SDXL
        # model's pooled text embeddings and time ids
        self._steady = ("encoder_hidden_states",
                        *(a for a in ADDED_INPUTS if a in unet.input_names))

    def _batched(self, n: int) -> list[np.ndarray]:
        """Each control image repeated per image, doubled for guidance unless in guess mode."""
        copies = n * (2 if self.guided and not self.control.guess_mode else 1)
        return [np.repeat(c.pixels, copies, axis=0) for c in self.control.images]

    def feeds(self, i: int, n: int, x: np.ndarray, t, steady: dict) -> dict:
        """The residuals of step ``i`` of ``n`` ({}: the bound zeros), ``x`` the U-Net's sample."""
        if self.control is None or not self.control.active(i, n):
            return {}
        half = self.guided and self.control.guess_mode  # the conditional half only
        k = x.shape[0] // 2 if half else 0
        total = None
        for c, image in zip(self.control.images, self._images):
            out = self._call(c, x[k:], t, {a: steady[a][k:] for a in self._steady}, image)
            total = out if total is None else [a + b for a, b in zip(total, out)]
        if half:
            total = [np.concatenate([np.zeros_like(r), r]) for r in total]
        return {r.name: a for r, a in zip(self.residuals, total)}

    def _call(self, c: ControlImage, x, t, states: dict, image) -> list[np.ndarray]:
        """``states``: the text states (and an SDXL model's added conditioning) of ``x``."""
        name = component_key(c.name)
        spec = self.pipe.backend(name).spec
        feeds = {"sample": x, **states, "controlnet_cond": image,
                 "timestep": np.full((x.shape[0],), t, dtype=spec.input("timestep").dtype),
                 CONDITIONING_SCALE: self._scales(c.scale, spec.input(CONDITIONING_SCALE))}
        # timed as the "controlnet" stage, checked for NaN/Inf, seen by the call hooks (the
        # calibration capture, runtime/pipeline.py)
        return self.pipe.call_outputs(name, feeds)

    def _scales(self, scale: float, tensor) -> np.ndarray:
        k = int(tensor.shape[0])
        if self.control.guess_mode:
            ramp = np.logspace(*GUESS_MODE_EXPONENTS, k, dtype=np.float32)
            return (ramp * np.float32(scale)).astype(np.float32)
        return np.full((k,), scale, dtype=np.float32)
