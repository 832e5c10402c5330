"""A real tritonserver serving the tiny SD1 bundle through `ldm-serve` (started once for the
module on free loopback ports, stopped by its PID): the served picture is ldm-run's, bit for
bit, over HTTP (ldm-run --server, curl) and gRPC; the pipeline calls its components through
BLS; the U-Net batches concurrent requests' calls; bad requests get ldm-run's line and the
server goes on; a cancelled request stops; SIGTERM lets the request in flight finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image
from serve_helpers import RUN, check_bad_request, start_serving, venv_run, wait_serving
from served_bad_inputs import SERVED_CASES, markdown, server_of

from ldm_edge.runtime.remote import generate, request_inputs

README = Path(__file__).parents[2] / "README.md"
TABLE_PAGE = Path(__file__).parents[2] / "docs" / "bad-input.md"
MAX_STEPS = 500  # the server's --max-steps here: long enough to cancel a request mid-way
MAX_PIXELS = 256 * 256  # its --max-pixels: 512x512 is refused
# Here the U-Net's batcher waits 20 ms for other calls: two pipelines stepping together
# always meet inside it (tiny-model steps take a few ms), so batching is certain, not luck.
BATCH_DELAY_US = 20000
SD1_CASES = [c for c in SERVED_CASES if server_of(c) == "sd1"]


@pytest.fixture(scope="module")
def served(serve_venv, tiny_bundles, tmp_path_factory):
    s = start_serving(tiny_bundles["sd1"], tmp_path_factory.mktemp("served"), serve_venv,
                      "--instances", "2", "--max-steps", str(MAX_STEPS),
                      "--max-pixels", str(MAX_PIXELS), "--batch-delay-us", str(BATCH_DELAY_US))
    failed = wait_serving(s)
    if failed:
        pytest.fail(failed)
    yield s
    s.stop()


def pngs(prefix: Path, n: int) -> list[Path]:
    return [prefix.with_suffix(".png")] if n == 1 else \
        [prefix.with_name(f"{prefix.name}-{i}.png") for i in range(n)]


@pytest.fixture(scope="module")
def init_png(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("init") / "start.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(p)
    return p


CASES = {
    "txt2img": (["-p", "a photo of a cat", "--seed", "7", "--steps", "6"], 1),
    "batch-euler-negative": (["-p", "a cat", "-p", "a dog", "-n", "blurry", "--scheduler",
                              "euler", "--seed", "1", "--steps", "5", "--guidance-scale", "5.5",
                              "--num-images", "2"], 4),
    "img2img": (["-p", "a red house", "--init-image", "INIT", "--strength", "0.6", "--seed",
                 "2", "--steps", "6"], 1),
    # a text-to-image model sampling without a prompt: --task reaches the server
    "unconditional": (["--task", "unconditional", "--seed", "4", "--steps", "4"], 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_served_png_is_local_png_byte_for_byte(case, served, tiny_bundles, init_png, tmp_path):
    args, n = CASES[case]
    args = [str(init_png) if a == "INIT" else a for a in args]
    local = run_cli(*RUN, str(tiny_bundles["sd1"]), *args, "-q", "-o", str(tmp_path / "local.png"))
    assert local.returncode == 0, local.stderr
    remote = run_cli(*RUN, "--server", served.http, *args, "-o", str(tmp_path / "served.png"))
    assert remote.returncode == 0, remote.stderr
    for a, b in zip(pngs(tmp_path / "local", n), pngs(tmp_path / "served", n)):
        assert a.read_bytes() == b.read_bytes(), f"{b.name} differs from {a.name}"


GRPC = """
import json, sys, numpy as np, tritonclient.grpc as g
c = g.InferenceServerClient(sys.argv[1])
ins = []
for name, kind, value in [("prompt", "BYTES", np.array([b"a photo of a cat"], dtype=object)),
                          ("seed", "UINT64", np.array([7], dtype=np.uint64)),
                          ("steps", "INT32", np.array([6], dtype=np.int32))]:
    t = g.InferInput(name, list(value.shape), kind); t.set_data_from_numpy(value); ins.append(t)
r = c.infer("ldm_pipeline", ins)
np.save(sys.argv[2], r.as_numpy("images"))
print(r.as_numpy("parameters")[0].decode())
"""


def test_grpc_and_curl_get_the_local_pixels(served, serve_venv, tiny_bundles, tmp_path):
    local = run_cli(*RUN, str(tiny_bundles["sd1"]), "-p", "a photo of a cat", "--seed", "7",
                    "--steps", "6", "-q", "-o", str(tmp_path / "local.png"))
    assert local.returncode == 0, local.stderr
    want = np.asarray(Image.open(tmp_path / "local.png"))
    r = venv_run(serve_venv, GRPC, served.grpc, tmp_path / "grpc.npy")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "grpc.npy")[0], want)
    assert json.loads(r.stdout)["seed"] == 7
    body = json.dumps({"inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a photo of a cat"]},
        {"name": "seed", "shape": [1], "datatype": "UINT64", "data": [7]},
        {"name": "steps", "shape": [1], "datatype": "INT32", "data": [6]}]})
    c = subprocess.run(["curl", "-sf", "-d", body, f"{served.http}/v2/models/ldm_pipeline/infer"],
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stderr
    images = next(o for o in json.loads(c.stdout)["outputs"] if o["name"] == "images")
    assert np.array_equal(np.array(images["data"], np.uint8).reshape(images["shape"])[0], want)


def test_pipeline_calls_each_component_through_bls(served):
    steps = 4
    before = {m: served.stats(m) for m in ("text_encoder", "unet", "vae_decoder")}
    # ddim: one U-Net call a step (the tiny model's default, PNDM, adds a warm-up call)
    generate(served.http, request_inputs(prompts=["a cat"], seed=3, steps=steps,
                                         scheduler="ddim"))
    after = {m: served.stats(m) for m in before}
    diff = {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}
    assert diff["text_encoder"]["success"] == 1 and diff["vae_decoder"]["success"] == 1
    assert diff["unet"]["success"] == steps
    assert diff["unet"]["inferences"] == 2 * steps  # guidance: cond + uncond in each call


def test_unet_batches_calls_of_concurrent_requests(served):
    steps, seeds = 8, (11, 12)
    ask = dict(prompts=["a cat"], steps=steps, scheduler="ddim")  # ddim: one call a step
    alone = {s: generate(served.http, request_inputs(seed=s, **ask))
             for s in seeds}
    before = served.stats("unet")
    together, threads = {}, []
    for s in seeds:
        def one(s=s):
            together[s] = generate(served.http, request_inputs(seed=s, **ask))
        threads.append(threading.Thread(target=one))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    after = served.stats("unet")
    calls = after["success"] - before["success"]
    assert calls == len(seeds) * steps
    # Triton's own count: fewer model executions than U-Net calls = calls ran as one batch
    assert after["executions"] - before["executions"] < calls
    for s in seeds:  # a batched U-Net call computes each element as it would alone
        assert np.array_equal(together[s].images, alone[s].images)


@pytest.mark.parametrize("case", SD1_CASES, ids=[c[0] for c in SD1_CASES])
def test_bad_request_then_server_goes_on(case, served, tiny_bundles, served_files, tmp_path):
    check_bad_request(case, served, tiny_bundles["sd1"], served_files, tmp_path)


def test_docs_have_the_served_table():
    assert markdown() in TABLE_PAGE.read_text(), "regenerate: python tests/serve/served_bad_inputs.py"


def test_good_request_after_the_bad_ones(served):
    r = generate(served.http, request_inputs(prompts=["a cat"], seed=1, steps=2))
    assert r.images.shape[0] == 1


def test_readme_client_example(served, serve_venv, tmp_path):
    text = README.read_text().split("<!-- client-example -->")[1]
    code = text.split("```python\n")[1].split("```")[0]
    code = code.replace("127.0.0.1:8000", served.http.split("//")[1])
    r = venv_run(serve_venv, f"import os; os.chdir({str(tmp_path)!r})\n{code}")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "client.png").size == (128, 128)  # the tiny bundle's default
    assert "'seed': 3" in r.stdout


CANCEL = """
import sys, time, json, urllib.request, numpy as np, tritonclient.grpc as g
http, grpc, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
def unet_calls():
    with urllib.request.urlopen(http + "/v2/models/unet/stats") as r:
        return json.load(r)["model_stats"][0]["inference_stats"]["success"]["count"]
c = g.InferenceServerClient(grpc)
ins = []
for name, kind, value in [("prompt", "BYTES", np.array([b"a cat"], dtype=object)),
                          ("steps", "INT32", np.array([steps], dtype=np.int32))]:
    t = g.InferInput(name, [1], kind); t.set_data_from_numpy(value); ins.append(t)
start = unet_calls()
ctx = c.async_infer("ldm_pipeline", ins, callback=lambda r, e: None)
while unet_calls() < start + 3:  # the loop is running
    time.sleep(0.05)
ctx.cancel()  # what a client does when its user gives up: the gRPC call is cancelled
print(json.dumps({"start": start}))
"""


def test_cancelled_request_stops_its_loop(served, serve_venv):
    log = served.stderr.read_text().split(", log ")[1].split()[0]
    before = served.stats("ldm_pipeline")
    r = venv_run(serve_venv, CANCEL, served.http, served.grpc, MAX_STEPS, timeout=120)
    assert r.returncode == 0, r.stderr
    start = json.loads(r.stdout)["start"]
    served.wait_for("ldm_pipeline", "executions", before["executions"])  # the request ended
    assert served.stats("unet")["success"] - start < MAX_STEPS  # before its last step
    assert "ldm_pipeline: request cancelled by its client" in Path(log).read_text()
    generate(served.http, request_inputs(prompts=["a cat"], seed=1, steps=2))  # still serving


def test_sigterm_lets_the_request_in_flight_finish(served):
    """Last in the module: stops the server."""
    before, got = served.stats("unet")["success"], {}

    def one():
        got["result"] = generate(served.http, request_inputs(prompts=["a cat"], seed=5, steps=40))
    t = threading.Thread(target=one)
    t.start()
    served.wait_for("unet", "success", before)  # in flight
    os.kill(served.proc.pid, signal.SIGTERM)
    assert served.proc.wait(120) == 0
    t.join(120)
    assert got["result"].images.shape[0] == 1
    err = served.stderr.read_text()
    assert "stopped (tritonserver exit code 0)" in err
    pid = int(err.split("tritonserver pid ")[1].split(",")[0])
    assert not Path(f"/proc/{pid}").exists()
    assert not served.ready()
