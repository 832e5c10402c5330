"""Prompt-fidelity evaluator for the demo model (numpy only, deterministic, no torch).

Reads colour, shape and position of the single shape in a 64x64 RGB uint8 image:
  * background = median colour of the one-pixel border;
  * shape pixels = pixels far from the background; colour = nearest named colour of their median;
  * a soft per-pixel coverage (projection of each pixel onto the background->shape colour line)
    gives area, centroid and bounding box;
  * position = nearest named anchor to the centroid;
  * shape: an upward triangle keeps only ~1/4 of its area in the top half of its bounding box
    (circle and square ~1/2), which survives blunted tips; then the bounding-box fill ratio
    separates square (~1) from circle (~pi/4).
"""
from __future__ import annotations

import re

import numpy as np

from .dataset import BACKGROUNDS, COLOURS, LORA_POSITIONS, POSITIONS, SHAPES

SHAPE_DIST = 60.0  # RGB distance from the background above which a pixel belongs to the shape
MIN_SHAPE_PIXELS = 12  # fewer candidate pixels than this: no shape found
COVER_MASK = 0.5  # coverage above which a pixel counts for the bounding box
TRIANGLE_TOP_SHARE = 0.4  # share of the area in the bounding box's top half below which: triangle
SQUARE_FILL = 0.88  # otherwise, fill ratio of the bounding box above which: square (else circle)

_COLOUR_NAMES = list(COLOURS)
_COLOUR_RGB = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float64)
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64)
_POS_NAMES = list(POSITIONS)
_POS_XY = np.array([POSITIONS[p] for p in _POS_NAMES], dtype=np.float64)
_SYNONYMS = {"grey": "gray", "centre": "center", "middle": "center"}
# The base positions plus the demo LoRA's (demo/lora_data.py): pass as ``positions=`` to read those too.
WITH_LORA_POSITIONS = {**POSITIONS, **LORA_POSITIONS}


def _nearest(table: np.ndarray, names: list[str], value: np.ndarray) -> str:
    return names[int(np.argmin(((table - value) ** 2).sum(axis=1)))]


def detect(image: np.ndarray, positions: dict | None = None) -> dict:
    """Attributes read from one (H, W, 3) uint8 image (64x64 expected; other sizes are scaled).
    ``positions``: name -> anchor table to read the position against (default: POSITIONS)."""
    img = np.asarray(image, dtype=np.float64)[..., :3]
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    out = {"colour": None, "shape": None, "position": None, "background": _nearest(_BG_RGB, _BG_NAMES, bg)}
    dist = np.sqrt(((img - bg) ** 2).sum(axis=-1))
    cand = dist > SHAPE_DIST
    if cand.sum() < MIN_SHAPE_PIXELS:
        return out
    fg = np.median(img[cand], axis=0)
    out["colour"] = _nearest(_COLOUR_RGB, _COLOUR_NAMES, fg)
    axis = fg - bg
    cover = np.clip(((img - bg) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    cover[dist <= SHAPE_DIST / 2] = 0.0  # suppress faint noise far from the shape
    area = cover.sum()
    ys, xs = np.mgrid[0:h, 0:w]
    cx = (cover * (xs + 0.5)).sum() / area * (64.0 / w)
    cy = (cover * (ys + 0.5)).sum() / area * (64.0 / h)
    pos_names, pos_xy = (_POS_NAMES, _POS_XY) if positions is None else (
        list(positions), np.array(list(positions.values()), dtype=np.float64))
    out["position"] = _nearest(pos_xy, pos_names, np.array([cx, cy]))
    out["centroid"] = (float(cx), float(cy))
    mask = cover > COVER_MASK
    if mask.sum() < MIN_SHAPE_PIXELS:
        return out
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = area / box
    mid = (rows[0] + rows[-1] + 1) // 2
    inside = cover[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    top_share = cover[rows[0]:mid, cols[0]:cols[-1] + 1].sum() / max(float(inside.sum()), 1e-6)
    out["fill"], out["top_share"] = float(fill), float(top_share)
    if top_share < TRIANGLE_TOP_SHARE:
        out["shape"] = "triangle"
    else:
        out["shape"] = "square" if fill > SQUARE_FILL else "circle"
    return out


def parse_prompt(text: str, positions: dict | None = None) -> dict:
    """Attributes named in a prompt; missing ones are None (``positions`` as in detect)."""
    words = re.findall(r"[a-z]+", text.lower())
    words = [_SYNONYMS.get(w, w) for w in words]
    joined = " ".join(words)
    attrs = {"colour": None, "shape": None, "position": None, "background": None}
    for w in words:
        if w in COLOURS and attrs["colour"] is None:
            attrs["colour"] = w
        elif w in BACKGROUNDS and attrs["background"] is None:
            attrs["background"] = w
        elif w in SHAPES and attrs["shape"] is None:
            attrs["shape"] = w
    for p in sorted(POSITIONS if positions is None else positions, key=len, reverse=True):
        if re.search(r"\b" + p + r"\b", joined):
            attrs["position"] = p
            break
    return attrs


def score(images, prompts, positions: dict | None = None) -> dict:
    """Per-attribute accuracy and 'all three right' (colour, shape, position) hit rate
    (``positions`` as in detect)."""
    keys = ("colour", "shape", "position", "background")
    hits = {k: 0 for k in keys}
    all_three = 0
    n = 0
    for image, prompt in zip(images, prompts):
        want = parse_prompt(prompt, positions) if isinstance(prompt, str) else prompt
        got = detect(np.asarray(image), positions)
        ok = {k: want.get(k) is not None and got.get(k) == want.get(k) for k in keys}
        for k in keys:
            hits[k] += ok[k]
        all_three += ok["colour"] and ok["shape"] and ok["position"]
        n += 1
    d = max(n, 1)
    result = {k: hits[k] / d for k in keys}
    result["all"] = all_three / d
    result["n"] = n
    return result


def format_score(result: dict) -> str:
    return ", ".join(f"{k} {100 * result[k]:.1f}%" for k in ("colour", "shape", "position", "background")) + (
        f"; all three {100 * result['all']:.1f}% (n={result['n']})"
    )
