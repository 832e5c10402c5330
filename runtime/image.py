"""PNG output with the generation parameters embedded, and init-image loading."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import UsageError
from .fsutil import default_mode

# Decompression-bomb guard: a 16k x 16k image is far beyond any exported range anyway.
MAX_INIT_PIXELS = 16384 * 16384
PARAMS_KEY = "ldm-edge"


def save_png(image: np.ndarray, path: str | Path, params: dict) -> None:
    """Write one uint8 HxWx3 image atomically, with ``params`` as a tEXt chunk."""
    from PIL import Image, PngImagePlugin

    path = _writable(Path(path))
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMS_KEY, json.dumps(params, ensure_ascii=False, default=str))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}")
    os.chmod(tmp, default_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(image).save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {e.strerror or e}")


def _writable(path: Path) -> Path:
    if not path.parent.is_dir():  # Path("x.png").parent is Path("."): the working folder
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    return path


def output_paths(out: str | Path, n: int) -> list[Path]:
    """``out.png`` for one image, ``out-0.png``, ``out-1.png``, ... for several; checked
    before the run, so a wrong folder costs no generation."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"output {out} must end in .png")
    _writable(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def load_init_image(path: str | Path, width: int, height: int) -> np.ndarray:
    """uint8 [1, H, W, 3], resized with Lanczos when its size differs (as diffusers does)."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_INIT_PIXELS
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_INIT_PIXELS:
                raise UsageError(f"--init-image {path} is {im.width}x{im.height}: too large")
            im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)[None]
    except FileNotFoundError:
        raise UsageError(f"--init-image {path} not found")
    except Image.DecompressionBombError:
        raise UsageError(f"--init-image {path} is too large (over {MAX_INIT_PIXELS} pixels)")
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"--init-image {path} is not a readable image ({type(e).__name__})")
