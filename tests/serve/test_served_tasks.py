"""Every task ldm-run draws is served the same way: a real tritonserver per task bundle (the
tiny SD inpainting, SD x4 upscaler and LDM super-resolution bundles, one repository each,
started side by side once for the module), and the served PNG is the local one byte for byte,
with --task, --mask and --noise-level sent. Their bad requests get ldm-run's own line, the
client's file named, and the server goes on. (Text-to-image and unconditional sampling of
the SD1 bundle: test_serving.py.)"""

from __future__ import annotations

import pytest
from helpers import run_cli
from serve_helpers import (RUN, check_bad_request, free_ports, start_serving, stop_serving,
                           wait_serving)
from served_bad_inputs import SERVED_CASES, TASK_SERVERS, server_of

# bundle -> the ldm-run arguments of one request (files by placeholder, conftest served_files)
TASK_CASES = {
    "inpaint": ["-p", "a red cat", "--task", "inpaint", "--init-image", "INIT", "--mask", "MASK",
                "--seed", "3", "--steps", "3"],
    "upscale": ["-p", "a red cat", "--task", "upscale", "--init-image", "LOW", "--noise-level",
                "30", "--seed", "3", "--steps", "3"],
    "ldm-sr": ["--task", "super-resolution", "--init-image", "LOW", "--seed", "3", "--steps",
               "3"],
}
BAD_CASES = [c for c in SERVED_CASES if server_of(c) != "sd1"]


@pytest.fixture(scope="module")
def task_servers(serve_venv, ldm_bundles, tmp_path_factory):
    """bundle key -> its server; one bundle per server (a repository holds one pipeline)."""
    tmp = tmp_path_factory.mktemp("task_servers")
    # the ports of all servers taken at once, so no two servers can be handed the same one
    ports = free_ports(3 * len(TASK_CASES))
    servers = {k: start_serving(ldm_bundles[k], tmp / k, serve_venv, ports=ports[3 * i:3 * i + 3])
               for i, k in enumerate(TASK_CASES)}
    failed = wait_serving(*servers.values())
    if failed:
        pytest.fail(failed)
    yield servers
    stop_serving(*servers.values())


def test_every_task_bundle_is_served_here():
    assert set(TASK_CASES) == set(TASK_SERVERS.values())


@pytest.mark.parametrize("key", sorted(TASK_CASES))
def test_served_task_png_is_local_png_byte_for_byte(key, task_servers, ldm_bundles,
                                                    served_files, tmp_path):
    args = [served_files.get(a, a) for a in TASK_CASES[key]]
    local = run_cli(*RUN, str(ldm_bundles[key]), *args, "-q", "-o", str(tmp_path / "local.png"))
    assert local.returncode == 0, local.stderr
    remote = run_cli(*RUN, "--server", task_servers[key].http, *args,
                     "-o", str(tmp_path / "served.png"))
    assert remote.returncode == 0, remote.stderr
    assert (tmp_path / "served.png").read_bytes() == (tmp_path / "local.png").read_bytes()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_task_request_then_server_goes_on(case, task_servers, ldm_bundles, served_files,
                                              tmp_path):
    key = server_of(case)
    check_bad_request(case, task_servers[key], ldm_bundles[key], served_files, tmp_path)
