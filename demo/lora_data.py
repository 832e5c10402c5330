"""Data for the demo LoRA (numpy + pillow only): a position the base model never saw.

The base dataset (dataset.py) puts the shape at five anchors. The LoRA teaches a sixth,
``top center`` (dataset.LORA_POSITIONS), with every colour, shape and background. Why a
position and not a seventh colour: the demo's autoencoder is frozen under a U-Net LoRA, and
it maps every colour it was not trained on onto one it was (an orange shape comes back red,
pink comes back yellow; `python -m ldm_edge.demo.lora_data --vae-check` measures it), while it
reconstructs a shape at a new position as well as at the old ones.

A fixed share of the new combinations is held out of the LoRA's training; the evaluation
(eval_lora.py) draws its prompts from those. The training mix also carries base samples, so
the LoRA is trained to leave the existing positions where they were.
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np

from . import dataset as D

NEW_POSITION = "top center"
LORA_HELDOUT_SEED = 20261129  # fixed: defines the held-out combinations of the new position
LORA_HELDOUT_FRACTION = 0.2  # share of the 72 new combinations that never appear in training
NEW_SHARE = 0.5  # share of the LoRA's training samples that show the new position


def new_combinations() -> list[tuple[str, str, str, str]]:
    """Every (colour, shape, NEW_POSITION, background) combination, in a fixed order."""
    return [(c, s, NEW_POSITION, b) for c, s, b in itertools.product(D.COLOURS, D.SHAPES, D.BACKGROUNDS)]


def heldout_new_combinations() -> list[tuple[str, str, str, str]]:
    combos = new_combinations()
    rng = np.random.default_rng(LORA_HELDOUT_SEED)
    n = int(round(len(combos) * LORA_HELDOUT_FRACTION))
    return [combos[i] for i in sorted(rng.permutation(len(combos))[:n].tolist())]


def train_new_combinations() -> list[tuple[str, str, str, str]]:
    held = set(heldout_new_combinations())
    return [c for c in new_combinations() if c not in held]


def _cycled(combos: list, n: int, rng: np.random.Generator):
    """N combinations drawn in shuffled passes over ``combos``, so all are covered evenly."""
    order: list[int] = []
    for _ in range(n):
        if not order:
            order = rng.permutation(len(combos)).tolist()
        yield combos[order.pop()]


def make_lora_train_set(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[dict]]:
    """N samples: NEW_SHARE from the new position's training combinations, the rest from the
    base training set (never a held-out combination of either). Images (N,64,64,3) uint8."""
    n_new = int(round(n * NEW_SHARE))
    rng = np.random.default_rng(seed)
    new = list(_cycled(train_new_combinations(), n_new, rng))
    base_images, base_caps, base_attrs = D.make_train_set(n - n_new, seed=seed + 1)
    images = np.empty((n, D.IMAGE_SIZE, D.IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    attrs_list: list[dict] = []
    for i, combo in enumerate(new):
        attrs = D.combo_attrs(combo)
        images[i] = D.render(attrs, rng)
        captions.append(D.caption(attrs, rng))
        attrs_list.append(attrs)
    images[n_new:] = base_images
    return images, captions + base_caps, attrs_list + base_attrs


def heldout_new_prompts(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    """N (prompt, attrs) pairs from the new position's held-out combinations."""
    rng = np.random.default_rng(seed)
    return [(D.caption(D.combo_attrs(c), rng), D.combo_attrs(c))
            for c in _cycled(heldout_new_combinations(), n, rng)]


def vae_check(n_per_value: int = 24) -> None:  # pragma: no cover - a measurement, needs torch
    """Print how well the frozen demo autoencoder reconstructs unseen colours and the new position."""
    import torch
    from diffusers import AutoencoderKL

    from . import evaluate as E
    from .sample_torch import DEFAULT_WEIGHTS

    vae = AutoencoderKL.from_pretrained(DEFAULT_WEIGHTS / "vae").eval()
    trial_colours = {"orange": (250, 130, 20), "pink": (250, 120, 190), "brown": (140, 80, 30)}
    rng = np.random.default_rng(0)
    combos = list(itertools.product(D.SHAPES, D.POSITIONS, D.BACKGROUNDS))[:n_per_value]
    cases = [(f"colour {c}", {**D.COLOURS, c: rgb}, [dict(colour=c, shape=s, position=p, background=b)
                                                    for s, p, b in combos])
             for c, rgb in trial_colours.items()]
    cases.append((f"position {NEW_POSITION}", D.COLOURS,
                  [D.combo_attrs(c) for c in new_combinations()[:n_per_value]]))
    for label, colours, attrs in cases:
        saved = dict(D.COLOURS)
        D.COLOURS.update(colours)  # render() reads the table; restored at once
        try:
            images = np.stack([D.render(a, rng) for a in attrs])
        finally:
            D.COLOURS.clear()
            D.COLOURS.update(saved)
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        rec = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        name_rgb = np.array(list(colours.values()), dtype=np.float64)
        names = list(colours)
        right = 0
        for r, a in zip(rec, attrs):
            got = E.detect(r, E.WITH_LORA_POSITIONS)
            if label.startswith("colour"):
                fg = _shape_median(r)
                right += fg is not None and names[int(np.argmin(((name_rgb - fg) ** 2).sum(1)))] == a["colour"]
            else:
                right += got["position"] == a["position"]
        print(f"{label}: {right}/{len(attrs)} reconstructions read back as drawn")


def _shape_median(img: np.ndarray):
    """The shape's median colour, found as the evaluator finds it."""
    from .evaluate import MIN_SHAPE_PIXELS, SHAPE_DIST

    img = img.astype(np.float64)
    bg = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0)
    mask = np.sqrt(((img - bg) ** 2).sum(-1)) > SHAPE_DIST
    return np.median(img[mask], axis=0) if mask.sum() >= MIN_SHAPE_PIXELS else None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae-check", action="store_true",
                    help="measure the demo autoencoder on unseen colours and on the new position")
    a = ap.parse_args(argv)
    if a.vae_check:
        vae_check()
    else:
        print(f"new position {NEW_POSITION!r}: {len(train_new_combinations())} training and "
              f"{len(heldout_new_combinations())} held-out combinations")


if __name__ == "__main__":
    main()
