"""ControlNet as a user meets it: `ldm-export onnx --controlnet`, `ldm-export controlnet` and
`ldm-run --control`, each in a subprocess."""

from __future__ import annotations

import json
import shutil

import numpy as np
from helpers import run_cli
from PIL import Image

EXPORT = ("-m", "ldm_edge.export.cli")
RUN = ("-m", "ldm_edge.runtime")


def _control_png(tmp_path):
    path = tmp_path / "edges.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(path)
    return path


def test_ldm_run_control_records_it_in_the_png(controlnet_bundle, tmp_path):
    png = _control_png(tmp_path)
    out = tmp_path / "out.png"
    r = run_cli(*RUN, str(controlnet_bundle), "-p", "a red cat", "--steps", "3", "--seed", "1",
                "--control", f"edges:{png}:0.7", "--control", f"depth:{png}",
                "--control-end", "0.5", "--guess-mode", "-o", str(out))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "controlnet" in r.stderr  # its row of the timing table
    meta = json.loads(Image.open(out).text["ldm-edge"])["control"]
    assert meta["start"] == 0.0 and meta["end"] == 0.5 and meta["guess_mode"] is True
    assert [(c["name"], c["scale"], c["image"]) for c in meta["controlnets"]] == [
        ("edges", 0.7, "edges.png"), ("depth", 1.0, "edges.png")]


def test_export_adds_a_controlnet_to_a_bundle_that_takes_residuals(
        controlnet_bundle, controlnet_models, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(controlnet_bundle, bundle)
    r = run_cli(*EXPORT, "controlnet", str(bundle), f"third={controlnet_models['depth']}")
    assert r.returncode == 0, r.stderr[-1500:]
    m = json.loads((bundle / "manifest.json").read_text())
    assert list(m["controlnets"]) == ["edges", "depth", "third"]
    assert m["controlnets"]["third"]["component"] == "controlnet/third"
    assert m["components"]["controlnet/third"]["variants"]["fp32"]["parity"]["passed"]
    assert not [p for p in bundle.iterdir() if p.name.startswith(".")]  # no stage left
    png = _control_png(tmp_path)
    r = run_cli(*RUN, str(bundle), "-p", "a cat", "--steps", "2", "--seed", "0", "-q",
                "--control", f"third:{png}", "-o", str(tmp_path / "o.png"))
    assert r.returncode == 0, r.stderr[-1500:]
    again = run_cli(*EXPORT, "controlnet", str(bundle), f"third={controlnet_models['depth']}")
    assert again.returncode == 1 and "already has a ControlNet named third" in again.stderr


def test_export_controlnet_refuses_a_unet_without_residuals(tiny_bundles, controlnet_models,
                                                          tmp_path):
    bundle = tmp_path / "plain"
    shutil.copytree(tiny_bundles["sd1"], bundle)
    before = (bundle / "manifest.json").read_bytes()
    r = run_cli(*EXPORT, "controlnet", str(bundle), str(controlnet_models["edges"]))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "re-export the bundle with `ldm-export onnx SOURCE " \
                               "--controlnet DIR`" in lines[0], r.stderr
    assert (bundle / "manifest.json").read_bytes() == before
    assert not (bundle / "controlnet").exists()


def test_export_refuses_a_controlnet_of_another_architecture(tiny_models, tmp_path):
    from diffusers import ControlNetModel

    other = tmp_path / "wide"
    ControlNetModel(in_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                      "DownBlock2D"),
                    cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
                    conditioning_embedding_out_channels=(8, 8, 16, 16)).save_pretrained(other)
    out = tmp_path / "b"
    r = run_cli(*EXPORT, "onnx", str(tiny_models["sd1"]), "-o", str(out), "--controlnet",
                str(other))
    assert r.returncode == 1
    assert "ControlNet wide is for another model: its cross_attention_dim 64 vs the " \
           "U-Net's 32" in r.stderr, r.stderr
    assert not out.exists()
