"""ldm-run --low-memory and --vae-tiling as a user calls them: a subprocess and its PNGs."""

from __future__ import annotations

import json

import numpy as np
from helpers import run_cli
from PIL import Image

RUN = ("-m", "ldm_edge.runtime")
ARGS = ("--prompt", "a red cat", "--steps", "3", "--seed", "11", "-q")


def _run(bundle, out, *extra):
    r = run_cli(*RUN, str(bundle), *ARGS, *extra, "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _meta(path) -> dict:
    return json.loads(Image.open(path).text["ldm-edge"])


def test_low_memory_writes_the_same_png(tiny_bundles, tmp_path):
    """Same picture, same metadata: low memory changes where buffers live, not the sums."""
    plain = _run(tiny_bundles["sd1"], tmp_path / "plain.png")
    out = tmp_path / "low.png"
    r = run_cli(*RUN, str(tiny_bundles["sd1"]), *ARGS, "--low-memory", "--debug", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == plain.read_bytes()
    released = [ln.rsplit(" the ", 1)[1] for ln in r.stderr.splitlines()
                if "low memory: released" in ln]
    assert released == ["text_encoder session", "unet session", "vae_decoder session"], r.stderr


def test_vae_tiling_is_used_and_recorded(tiny_bundles, tmp_path):
    size = ("--height", "192", "--width", "192")
    plain = _run(tiny_bundles["sd1"], tmp_path / "plain.png", *size)
    tiled = _run(tiny_bundles["sd1"], tmp_path / "tiled.png", *size, "--vae-tiling",
                 "--vae-tile-size", "64", "--low-memory")
    assert _meta(tiled)["vae_tiling"] == {"tile_size": 64, "overlap": 0.25, "tiles": 16}
    assert _meta(plain)["vae_tiling"] is None
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (plain, tiled))
    assert a.shape == b.shape == (192, 192, 3) and np.abs(a - b).max() > 0  # tiles changed it
    # the default tile is the bundle's default size (128): one tile at 128x128, no change
    one = _run(tiny_bundles["sd1"], tmp_path / "one.png", "--vae-tiling")
    assert _meta(one)["vae_tiling"] == {"tile_size": 128, "overlap": 0.25, "tiles": 1}
