"""ldm-export as a user calls it."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

EXPORT = ("-m", "ldm_edge.export.cli")


def test_onnx_writes_checked_bundle_with_summary(tiny_models, tmp_path):
    out = tmp_path / "b"
    r = run_cli(*EXPORT, "onnx", str(tiny_models["sd1"]), "-o", str(out), "--max-batch", "2",
                "--min-size", "64", "--max-size", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unet (fp32)" in r.stdout and "pass" in r.stdout  # the summary table
    assert "checking against PyTorch" in r.stderr  # progress output
    m = json.loads((out / "manifest.json").read_text())
    assert m["dims"]["max_batch"] == 2
    assert m["components"]["unet"]["spec"]["ranges"]["latent_height"] == [8, 32]
    assert m["components"]["unet"]["spec"]["ranges"]["batch"] == [1, 4]
    r2 = run_cli(*EXPORT, "onnx", str(tiny_models["sd1"]), "-o", str(out))
    assert r2.returncode != 0 and "--force" in r2.stderr and "Traceback" not in r2.stderr


@pytest.mark.parametrize("args,needle,code", [
    (["MISSING"], "not found", 2),
    (["EMPTYDIR"], "missing unet/", 2),
    (["NOTMODEL"], "not a diffusers folder", 2),
    (["TINY", "--min-size", "36"], "multiple of 8", 1),
    (["TINY", "--opset", "12"], "12", 2),
])
def test_bad_input_one_line(args, needle, code, tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.txt").write_text("x")
    subs = {"MISSING": str(tmp_path / "nope"), "EMPTYDIR": str(tmp_path / "empty"),
            "NOTMODEL": str(tmp_path / "model.txt"), "TINY": str(tiny_models["sd1"])}
    r = run_cli(*EXPORT, "onnx", *[subs.get(a, a) for a in args], "-o", str(tmp_path / "b"))
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert needle in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists()


def test_help_lists_commands():
    r = run_cli(*EXPORT, "--help")
    assert r.returncode == 0 and "onnx" in r.stdout
