"""Deterministic synthetic dataset for the bundled demo model (numpy + pillow only, no torch).

Each 64x64 RGB image shows one shape (circle, square, triangle) in one of six well-separated
colours at one of five named positions, size jittered, on one of four plain backgrounds.
Captions come from several templates. A fixed set of (colour, shape, position, background)
combinations is held out: it never appears in the training set and is used to measure how
well the model composes attributes it has only seen separately.
"""
from __future__ import annotations

import itertools

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # render at 4x and box-downsample for anti-aliased edges

# Shape colours: chosen so every pair is >= ~130 apart in RGB and far from every background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (145, 45, 185),
    "cyan": (30, 205, 225),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (225, 205, 160),
}
SHAPES = ("circle", "square", "triangle")
# Anchor (x, y) of each named position, in pixels of the 64x64 image.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (17, 17),
    "top right": (47, 17),
    "bottom left": (17, 47),
    "bottom right": (47, 47),
    "center": (32, 32),
}
# Positions the base model never saw, taught by the demo LoRA (demo/lora_data.py). Kept out
# of POSITIONS so the base dataset, its held-out split and the evaluator's defaults stay as
# they were; render() draws them too.
LORA_POSITIONS: dict[str, tuple[int, int]] = {
    "top center": (32, 17),
}
HALF_SIZE_RANGE = (9.0, 13.0)  # half the shape's extent in pixels (size jitter)
POSITION_JITTER = 2.0  # max offset of the shape centre from its anchor, pixels

TEMPLATES = (
    "a {colour} {shape} in the {position} on a {background} background",
    "{colour} {shape}, {position}, {background} background",
    "a {background} background with a {colour} {shape} in the {position}",
    "{position}: a {colour} {shape} on {background}",
    "a picture of a {colour} {shape} at the {position}, {background} background",
)

HELDOUT_SEED = 20240611  # fixed: defines the held-out combinations
HELDOUT_FRACTION = 0.1  # share of all combinations that never appear in training

Attrs = dict  # {"colour", "shape", "position", "background"}


def all_combinations() -> list[tuple[str, str, str, str]]:
    """Every (colour, shape, position, background) combination, in a fixed order."""
    return list(itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS))


def heldout_combinations() -> list[tuple[str, str, str, str]]:
    combos = all_combinations()
    rng = np.random.default_rng(HELDOUT_SEED)
    n = int(round(len(combos) * HELDOUT_FRACTION))
    idx = sorted(rng.permutation(len(combos))[:n].tolist())
    return [combos[i] for i in idx]


def train_combinations() -> list[tuple[str, str, str, str]]:
    held = set(heldout_combinations())
    return [c for c in all_combinations() if c not in held]


def combo_attrs(combo: tuple[str, str, str, str]) -> Attrs:
    return dict(zip(("colour", "shape", "position", "background"), combo))


def attrs_combo(attrs: Attrs) -> tuple[str, str, str, str]:
    return (attrs["colour"], attrs["shape"], attrs["position"], attrs["background"])


def caption(attrs: Attrs, rng: np.random.Generator) -> str:
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(**attrs)


def render(attrs: Attrs, rng: np.random.Generator) -> np.ndarray:
    """Render one sample as a (64, 64, 3) uint8 array."""
    s = SUPERSAMPLE
    size = IMAGE_SIZE * s
    img = Image.new("RGB", (size, size), BACKGROUNDS[attrs["background"]])
    draw = ImageDraw.Draw(img)
    half = float(rng.uniform(*HALF_SIZE_RANGE))
    ax, ay = POSITIONS.get(attrs["position"]) or LORA_POSITIONS[attrs["position"]]
    cx = ax + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
    cy = ay + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
    fill = COLOURS[attrs["colour"]]
    box = [(cx - half) * s, (cy - half) * s, (cx + half) * s, (cy + half) * s]
    if attrs["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif attrs["shape"] == "square":
        # a square with the same area-ish footprint as the circle looks less dominant
        h = half * 0.9
        draw.rectangle([(cx - h) * s, (cy - h) * s, (cx + h) * s, (cy + h) * s], fill=fill)
    else:  # upward equilateral-ish triangle
        draw.polygon([(cx * s, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def sample(attrs: Attrs, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    return render(attrs, rng), caption(attrs, rng)


def make_train_set(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[Attrs]]:
    """N training samples (never from held-out combinations): images (N,64,64,3) uint8,
    captions, attrs. Combinations are cycled in shuffled order so all are covered evenly."""
    combos = train_combinations()
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    attrs_list: list[Attrs] = []
    order: list[int] = []
    for i in range(n):
        if not order:
            order = rng.permutation(len(combos)).tolist()
        attrs = combo_attrs(combos[order.pop()])
        images[i] = render(attrs, rng)
        captions.append(caption(attrs, rng))
        attrs_list.append(attrs)
    return images, captions, attrs_list


def heldout_prompts(n: int, seed: int = 0) -> list[tuple[str, Attrs]]:
    """N (prompt, attrs) pairs drawn from the held-out combinations (cycled evenly)."""
    combos = heldout_combinations()
    rng = np.random.default_rng(seed)
    out: list[tuple[str, Attrs]] = []
    order: list[int] = []
    for _ in range(n):
        if not order:
            order = rng.permutation(len(combos)).tolist()
        attrs = combo_attrs(combos[order.pop()])
        out.append((caption(attrs, rng), attrs))
    return out


def heldout_set(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[Attrs]]:
    """Ground-truth images for held-out prompts (for evaluator checks only, never training)."""
    rng = np.random.default_rng(seed + 1)
    pairs = heldout_prompts(n, seed)
    images = np.stack([render(a, rng) for _, a in pairs]) if pairs else np.empty((0, 64, 64, 3), np.uint8)
    return images, [p for p, _ in pairs], [a for _, a in pairs]


def all_captions() -> list[str]:
    """Every caption the training set can contain (all templates x train combinations)."""
    return [t.format(**combo_attrs(c)) for c in train_combinations() for t in TEMPLATES]
