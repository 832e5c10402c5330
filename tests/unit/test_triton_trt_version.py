"""``ldm-export triton --components tensorrt``: a plan loads only in the TensorRT release that
built it. Given the serving container's release (``--trt-version``), engines of another are
refused in one line and nothing is written; without it, a note says what the engines need."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from ldm_edge.runtime.errors import BundleError, UsageError
from ldm_edge.serve.repository import same_release, write_repository

JETPACK = "10.3.0.30"  # as JetPack 6.1's tensorrt.__version__ reads
CONTAINER = "10.5.0.18"  # another release, as a Triton container's notes name it


def with_engines(bundle, *versions):
    """Engine records (and stand-in plan files) as `ldm-export engines` writes them, one per
    TensorRT release given, for every component."""
    m = json.loads((bundle / "manifest.json").read_text())
    for name, comp in m["components"].items():
        comp["engines"] = []
        for v in versions:
            plan = f"{name}.fp32.{v}.plan"
            (bundle / plan).write_bytes(f"plan of TensorRT {v}".encode())
            comp["engines"].append({"backend": "tensorrt", "precision": "fp32",
                                    "trt_version": v, "device_name": "Orin",
                                    "compute_capability": "8.7", "file": plan})
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_without_the_version_the_note_says_what_the_engines_need(bundle, tmp_path):
    with_engines(bundle, JETPACK)
    notes = []
    repo = write_repository(bundle, tmp_path / "repo", components="tensorrt", note=notes.append)
    assert (repo / "unet" / "1" / "model.plan").read_bytes() == f"plan of TensorRT {JETPACK}".encode()
    assert len(notes) == 1 and "\n" not in notes[0]
    assert f"TensorRT {JETPACK} on Orin (compute capability 8.7)" in notes[0]
    assert "build the engines inside the serving container" in notes[0]
    assert "--trt-version" in notes[0]


def test_the_containers_release_picks_its_engine(bundle, tmp_path):
    with_engines(bundle, JETPACK, CONTAINER)
    notes = []
    repo = write_repository(bundle, tmp_path / "repo", components="tensorrt",
                            trt_version="10.5.0", note=notes.append)
    plan = repo / "text_encoder" / "1" / "model.plan"
    assert plan.read_bytes() == f"plan of TensorRT {CONTAINER}".encode()
    assert notes and "matches the container's 10.5.0" in notes[0]


def test_another_release_is_refused_and_nothing_is_written(bundle, tmp_path):
    with_engines(bundle, JETPACK)
    out = tmp_path / "repo"
    with pytest.raises(BundleError) as e:
        write_repository(bundle, out, components="tensorrt", trt_version="10.5.0")
    msg = str(e.value)
    assert "\n" not in msg and not out.exists()
    assert f"built with TensorRT {JETPACK}, the serving container has 10.5.0" in msg
    assert "build the engines inside the serving container" in msg


def test_a_malformed_version_is_a_usage_error(bundle, tmp_path):
    with pytest.raises(UsageError, match="--trt-version '10.3'.*major.minor.patch"):
        write_repository(bundle, tmp_path / "repo", components="tensorrt", trt_version="10.3")


@pytest.mark.parametrize("built, given, same", [
    ("10.3.0.30", "10.3.0", True), ("10.3.0", "10.3.0", True), ("10.3.0.30", "10.3.0.30", True),
    ("10.3.0.30", "10.3.1", False), ("10.13.0", "10.1.3", False), (None, "10.3.0", False),
    ("10.3.0", "10.3.0.30", False),
])
def test_releases_compare_over_the_parts_given(built, given, same):
    assert same_release(built, given) is same


def test_the_cli_refuses_in_one_line(bundle, tmp_path):
    with_engines(bundle, JETPACK)
    out = tmp_path / "repo"
    r = run_cli("-m", "ldm_edge.export.cli", "triton", str(bundle), "-o", str(out),
                "--components", "tensorrt", "--trt-version", "10.5.0")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1, r.stderr
    assert lines[0].startswith("ldm-export: error: text_encoder: its fp32 TensorRT engine was "
                               f"built with TensorRT {JETPACK}")
    assert not out.exists()
    r = run_cli("-m", "ldm_edge.export.cli", "triton", str(bundle), "-o", str(out),
                "--components", "tensorrt")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("note: the tensorrt_plan models load only in a Triton whose ")
