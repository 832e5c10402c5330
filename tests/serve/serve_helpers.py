"""Helpers of the serving tier (tests/serve/conftest.py makes the venv): a real `ldm-serve`
started on free loopback ports and stopped by its PID, and the served bad-input check."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import run_cli
from served_bad_inputs import TASK_SERVERS

RUN = ("-m", "ldm_edge.runtime")
READY_TIMEOUT_S = 240  # start + Python model stubs on a busy 2-core machine
POLL_S = 0.05


def venv_run(venv: Path, code: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` with the serving venv's Python (it has tritonclient and protobuf)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "python"), "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (bound and released at once)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Served:
    proc: subprocess.Popen
    http: str
    grpc: str
    stdout: Path
    stderr: Path

    def stats(self, model: str) -> dict:
        with urllib.request.urlopen(f"{self.http}/v2/models/{model}/stats", timeout=10) as r:
            s = json.load(r)["model_stats"][0]
        inf = s["inference_stats"]
        return {"executions": s["execution_count"], "inferences": s["inference_count"],
                "success": inf["success"]["count"], "fail": inf["fail"]["count"]}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http}/v2/health/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_for(self, model: str, key: str, above: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.stats(model)[key] <= above:
            assert time.monotonic() < deadline, f"{model} {key} stayed at {above}"
            time.sleep(POLL_S)

    def stop(self) -> None:
        stop_serving(self)


def stop_serving(*servers: Served) -> None:
    """SIGTERM to each (they stop side by side), then wait for each."""
    for s in servers:
        if s.proc.poll() is None:
            os.kill(s.proc.pid, signal.SIGTERM)
    for s in servers:
        s.proc.wait(120)


def start_serving(bundle: Path, folder: Path, venv: Path, *options: str,
                  ports: list[int] | None = None) -> Served:
    """`ldm-serve bundle` (Python components) on free ports (``ports``: http, grpc, metrics,
    taken by the caller when it starts several servers), its files in ``folder``; returns at
    once (``wait_serving``)."""
    folder.mkdir(parents=True, exist_ok=True)
    http, grpc, metrics = ports or free_ports(3)
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    cmd = [sys.executable, "-m", "ldm_edge.serve.cli", str(bundle),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--components", "python", "--repository", str(folder / "repo"),
           "--serve-venv", str(venv), "--log", str(folder / "tritonserver.log"), *options]
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, start_new_session=True)
    return Served(proc, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", out, err)


def wait_serving(*servers: Served) -> str | None:
    """Wait until each serves (it prints its endpoints); the first failure's stderr, or None.
    Started together, the servers come up side by side."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for s in servers:
        while "metrics" not in s.stdout.read_text():
            if s.proc.poll() is not None or time.monotonic() > deadline:
                try:
                    stop_serving(*servers)
                except subprocess.TimeoutExpired:
                    for other in servers:
                        other.proc.kill()
                return f"ldm-serve did not come up: {s.stderr.read_text()[-2000:]}"
            time.sleep(0.2)
    return None


def check_bad_request(case: tuple, served: Served, bundle: Path, files: dict,
                      tmp_path: Path) -> None:
    """One row of served_bad_inputs.SERVED_CASES against ``served``, which serves ``bundle``:
    the client gets its one line (a local run's very line where the row says so), no PNG,
    and the server goes on."""
    what, how, args, code, needle, local = case
    if how == "http":
        req = urllib.request.Request(f"{served.http}/v2/models/ldm_pipeline/infer",
                                     data=json.dumps({"inputs": args}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == code
        assert needle in json.loads(e.value.read())["error"]
    else:
        args = args[1:] if args and args[0] in TASK_SERVERS else args
        sub = [files.get(a) or (str(bundle) if a == "BUNDLE" else
                                f"127.0.0.1:{free_ports(1)[0]}" if a == "SERVER" else a)
               for a in args]
        if "--server" not in sub:
            sub = ["--server", served.http, *sub]
        r = run_cli(*RUN, *sub, "-o", str(tmp_path / "r.png"))
        assert r.returncode == code
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("ldm-run: error: ") and needle in lines[0]
        if local:  # the very line ldm-run prints when it runs the bundle itself
            sub = sub[2:] if sub[0] == "--server" else sub
            mine = run_cli(*RUN, str(bundle), *sub, "-o", str(tmp_path / "l.png"))
            assert (mine.returncode, mine.stderr) == (code, r.stderr)
        assert not (tmp_path / "r.png").exists()
    assert served.ready()
