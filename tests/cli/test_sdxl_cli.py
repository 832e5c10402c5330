"""SDXL as a user meets it: `ldm-export onnx` on an SDXL folder and `ldm-run` with the
micro-conditioning options in a subprocess; the refiner on the base picture as an
image-to-image step. The one-line refusals are rows of the bad-input table and
tests/parity/test_sdxl.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import need_export_extra, run_cli
from PIL import Image

EXPORT = ("-m", "ldm_edge.export.cli")
RUN = ("-m", "ldm_edge.runtime")


@pytest.fixture(scope="module")
def sdxl_cli_bundles(tmp_path_factory):
    need_export_extra()
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl_cli")
    out = {}
    for kind in ("base", "refiner"):
        folder = save_tiny_sdxl(root / f"{kind}-model", kind)
        out[kind] = root / kind
        r = run_cli(*EXPORT, "onnx", str(folder), "-o", str(out[kind]))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "family sdxl" in r.stderr
    return out


def _meta(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["ldm-edge"])


def test_base_then_refiner(sdxl_cli_bundles, tmp_path):
    base, refined = tmp_path / "base.png", tmp_path / "refined.png"
    r = run_cli(*RUN, str(sdxl_cli_bundles["base"]), "-p", "a red cat", "--steps", "3",
                "--seed", "1", "--original-size", "256", "192", "--crop-top-left", "8", "0",
                "-q", "-o", str(base))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = _meta(base)
    assert meta["original_size"] == [256, 192] and meta["crop_top_left"] == [8, 0]
    assert meta["target_size"] == [meta["height"], meta["width"]]
    assert meta["zero_negative"] is True and meta["aesthetic_score"] is None
    r = run_cli(*RUN, str(sdxl_cli_bundles["refiner"]), "-p", "a red cat", "--steps", "10",
                "--init-image", str(base), "--strength", "0.3", "--seed", "2", "-q",
                "-o", str(refined))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = _meta(refined)
    assert (meta["aesthetic_score"], meta["negative_aesthetic_score"]) == (6.0, 2.5)
    assert meta["zero_negative"] is False  # the refiner's model_index says no zeros
    a, b = (np.asarray(Image.open(p)) for p in (base, refined))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_base_hands_its_latents_to_the_refiner(sdxl_cli_bundles, tmp_path):
    out = tmp_path / "experts.png"
    r = run_cli(*RUN, str(sdxl_cli_bundles["base"]), "-p", "a red cat", "--steps", "10",
                "--seed", "4", "--refiner", str(sdxl_cli_bundles["refiner"]), "-q",
                "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = _meta(out)
    assert meta["denoising_start"] == 0.8 and meta["base"]["denoising_end"] == 0.8
    assert meta["latents_sha256"] is not None and meta["base"]["model"] == "base-model"
    r = run_cli(*RUN, str(sdxl_cli_bundles["base"]), "-p", "x", "--steps", "2",
                "--denoising-end", "0.5", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "give --refiner DIR" in r.stderr


def test_the_base_refuses_the_refiners_options(sdxl_cli_bundles, tmp_path):
    r = run_cli(*RUN, str(sdxl_cli_bundles["base"]), "-p", "a red cat", "--steps", "1",
                "--aesthetic-score", "7", "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2
    assert r.stderr.strip() == ("ldm-run: error: --aesthetic-score is the SDXL refiner's; this "
                                "bundle's U-Net conditions on the target size instead (drop it)")
    assert not (tmp_path / "x.png").exists()
