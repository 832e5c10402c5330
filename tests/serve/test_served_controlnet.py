"""ControlNets served: a real tritonserver with the tiny SD1 bundle and its two ControlNets
(tests/conftest.py), each a model of the repository. ``ldm-run --server --control`` sends the
control images' bytes beside their NAME:IMAGE:SCALE values, and the served PNG is the local one
byte for byte: two ControlNets at different scales within a window of the schedule, and guess
mode. A refused request gets ldm-run's own line and the server goes on."""

from __future__ import annotations

import pytest
from helpers import run_cli
from serve_helpers import RUN, start_serving, stop_serving, wait_serving

BASE = ["-p", "a red cat", "--seed", "5", "--steps", "3", "--width", "72"]
CASES = {
    "two ControlNets, a window": ["--control", "edges:CONTROL:0.8", "--control", "depth:CONTROL:1.3",
                                  "--control-start", "0.2", "--control-end", "0.9"],
    "guess mode": ["--control", "edges:CONTROL", "--guess-mode"],
}


@pytest.fixture(scope="module")
def control_served(serve_venv, controlnet_bundle, tmp_path_factory):
    server = start_serving(controlnet_bundle, tmp_path_factory.mktemp("cn_served"), serve_venv)
    failed = wait_serving(server)
    if failed:
        pytest.fail(failed)
    yield controlnet_bundle, server
    stop_serving(server)


@pytest.mark.parametrize("case", list(CASES))
def test_served_control_png_is_local_png_byte_for_byte(case, control_served, control_png,
                                                       tmp_path):
    bundle, server = control_served
    args = BASE + [a.replace("CONTROL", str(control_png)) for a in CASES[case]]
    local = run_cli(*RUN, str(bundle), *args, "-q", "-o", str(tmp_path / "local.png"))
    assert local.returncode == 0, local.stderr
    remote = run_cli(*RUN, "--server", server.http, *args, "-o", str(tmp_path / "served.png"))
    assert remote.returncode == 0, remote.stderr
    assert (tmp_path / "served.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    plain = run_cli(*RUN, str(bundle), *BASE, "-q", "-o", str(tmp_path / "plain.png"))
    assert plain.returncode == 0, plain.stderr
    # the ControlNets acted: their picture is not the plain one
    assert (tmp_path / "plain.png").read_bytes() != (tmp_path / "served.png").read_bytes()


def test_unknown_controlnet_refused_then_the_server_goes_on(control_served, control_png,
                                                            tmp_path):
    bundle, server = control_served
    args = BASE + ["--control", f"canny:{control_png}"]
    local = run_cli(*RUN, str(bundle), *args, "-o", str(tmp_path / "local.png"))
    bad = run_cli(*RUN, "--server", server.http, *args, "-o", str(tmp_path / "bad.png"))
    assert bad.returncode == 2 and local.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last == local.stderr.strip().splitlines()[-1]
    assert "no ControlNet of that name (it has: edges, depth)" in last
    assert not (tmp_path / "bad.png").exists()
    ok = run_cli(*RUN, "--server", server.http, *BASE, "--control", f"depth:{control_png}",
                 "-q", "-o", str(tmp_path / "ok.png"))
    assert ok.returncode == 0, ok.stderr
