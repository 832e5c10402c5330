"""The tiny VAE (TAESD) as a user meets it: `ldm-export onnx --tiny-vae DIR`, and `ldm-run
--vae tiny` / `--preview N` in a subprocess. The one-line refusals are rows of the bad-input
table (tests/cli/bad_inputs.py)."""

from __future__ import annotations

import json

from helpers import run_cli
from PIL import Image

EXPORT = ("-m", "ldm_edge.export.cli")
RUN = ("-m", "ldm_edge.runtime")


def _meta(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["ldm-edge"])


def test_export_adds_the_tiny_vae_beside_the_full_one(tiny_models, taesd_models, tmp_path):
    out = tmp_path / "b"
    r = run_cli(*EXPORT, "onnx", str(tiny_models["sd1"]), "--tiny-vae",
                str(taesd_models["taesd"]), "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert {"vae_decoder", "vae_encoder", "vae_decoder_tiny", "vae_encoder_tiny"} <= set(
        m["components"])
    assert m["tiny_vae"]["scaling_factor"] == 1.0 and m["tiny_vae"]["source"] == "taesd"
    assert m["components"]["vae_decoder_tiny"]["variants"]["fp32"]["parity"]["passed"]


def test_export_refuses_a_tiny_vae_that_is_not_one(tiny_models, tmp_path):
    r = run_cli(*EXPORT, "onnx", str(tiny_models["sd1"]), "--tiny-vae",
                str(tiny_models["sd1"] / "vae"), "-o", str(tmp_path / "b"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "is not an AutoencoderTiny's (TAESD)" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists()


def test_preview_writes_a_png_beside_the_output(taesd_bundles, tmp_path):
    out = tmp_path / "out.png"
    r = run_cli(*RUN, str(taesd_bundles["beside"]), "-p", "a red cat", "--steps", "4",
                "--scheduler", "ddim", "--seed", "1", "--preview", "2", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    preview = tmp_path / "out.preview.png"
    with Image.open(preview) as im:
        im.verify()  # a whole, valid PNG
    with Image.open(preview) as im:
        assert im.format == "PNG" and im.size == (128, 128)
    assert _meta(preview) == {"preview_step": 4, "steps": 4}
    assert _meta(out)["vae"] == "full"  # the picture itself: the default VAE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png", "out.preview.png"]


def test_vae_tiny_is_recorded_in_the_png(taesd_bundles, tmp_path):
    full, tiny = tmp_path / "full.png", tmp_path / "tiny.png"
    for vae, out in (("full", full), ("tiny", tiny)):
        r = run_cli(*RUN, str(taesd_bundles["beside"]), "-p", "a red cat", "--steps", "2",
                    "--seed", "1", "--vae", vae, "-q", "-o", str(out))
        assert r.returncode == 0, r.stderr[-2000:]
        assert _meta(out)["vae"] == vae
    with Image.open(full) as a, Image.open(tiny) as b:
        assert a.tobytes() != b.tobytes()
