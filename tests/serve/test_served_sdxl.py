"""SDXL served: a real tritonserver with the tiny SDXL bundle (two text encoders, the second
with two outputs; a U-Net with text_embeds and time_ids); the served PNG is the local one byte
for byte with the micro-conditioning sent as pairs; a refused request gets ldm-run's own line
and the server goes on."""

from __future__ import annotations

import pytest
from helpers import need_export_extra, run_cli
from serve_helpers import RUN, start_serving, stop_serving, wait_serving

ARGS = ["-p", "a red cat", "--seed", "3", "--steps", "3", "--original-size", "256", "192",
        "--crop-top-left", "8", "16", "--target-size", "128", "96", "--width", "96"]


@pytest.fixture(scope="module")
def sdxl_served(serve_venv, tmp_path_factory):
    need_export_extra()
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

    tmp = tmp_path_factory.mktemp("sdxl_served")
    bundle = tmp / "bundle"
    export_bundle(load_model(save_tiny_sdxl(tmp / "model", "base")), bundle, ExportOptions())
    server = start_serving(bundle, tmp / "serve", serve_venv)
    failed = wait_serving(server)
    if failed:
        pytest.fail(failed)
    yield bundle, server
    stop_serving(server)


def test_served_sdxl_png_is_local_png_byte_for_byte(sdxl_served, tmp_path):
    bundle, server = sdxl_served
    local = run_cli(*RUN, str(bundle), *ARGS, "-q", "-o", str(tmp_path / "local.png"))
    assert local.returncode == 0, local.stderr
    remote = run_cli(*RUN, "--server", server.http, *ARGS, "-o", str(tmp_path / "served.png"))
    assert remote.returncode == 0, remote.stderr
    assert (tmp_path / "served.png").read_bytes() == (tmp_path / "local.png").read_bytes()


def test_refused_then_the_server_goes_on(sdxl_served, tmp_path):
    bundle, server = sdxl_served
    bad = run_cli(*RUN, "--server", server.http, "-p", "x", "--steps", "1", "--aesthetic-score",
                  "5", "-o", str(tmp_path / "bad.png"))
    assert bad.returncode == 2
    assert "--aesthetic-score is the SDXL refiner's" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad.png").exists()
    ok = run_cli(*RUN, "--server", server.http, "-p", "x", "--steps", "1", "-o",
                 str(tmp_path / "ok.png"))
    assert ok.returncode == 0, ok.stderr
