"""Start and stop a real ``tritonserver`` on a model repository.

Which server: the ``tritonserver`` on ``PATH`` (NVIDIA's container: all its backends), else
the one inside the ``nvidia-pytriton`` wheel of the serving venv (``make serve-venv``). That
one has only the Python backend, and it needs three things from its environment or it fails
(PITFALLS "Serving with Triton"): the venv's ``bin`` first on ``PATH`` (the backend stub finds
its packages through ``python3``), ``LD_LIBRARY_PATH`` with the wheel's libraries and the
interpreter's own ``LIBDIR``, and numpy<2 in the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ldm_edge.runtime.errors import UsageError

# Until the server is ready: Python models start a stub process each and open their
# onnxruntime sessions; the demo bundle takes ~5 s here, an SD1.5 one much longer.
DEFAULT_READY_TIMEOUT_S = 300.0
# SIGTERM: Triton stops taking requests and lets those in flight finish for this long.
EXIT_TIMEOUT_S = 60
POLL_S = 0.25
LOG_TAIL_LINES = 15


@dataclass
class TritonInstall:
    """A tritonserver binary and what it needs to run."""

    binary: Path
    backend_dir: Path | None  # None: the binary's own (NVIDIA's container)
    env: dict = field(default_factory=dict)  # added to the environment
    backends: tuple = ()  # the backends it has

    def has(self, backend: str) -> bool:
        return backend in self.backends


def find_triton(serve_venv: str | os.PathLike | None = None) -> TritonInstall:
    """``serve_venv`` given: the pytriton wheel's in it. Otherwise the ``tritonserver`` on PATH,
    else the wheel's in $LDM_EDGE_SERVE_VENV or ./.venv-serve."""
    on_path = shutil.which("tritonserver")
    if on_path and serve_venv is None:
        root = Path(on_path).resolve().parent.parent / "backends"
        have = tuple(sorted(p.name for p in root.iterdir())) if root.is_dir() else ()
        return TritonInstall(Path(on_path), None, {}, have)
    venv = Path(serve_venv or os.environ.get("LDM_EDGE_SERVE_VENV") or ".venv-serve")
    python = venv / "bin" / "python"
    if not python.exists():
        raise UsageError(f"no tritonserver on PATH and no serving venv at {venv}; create it "
                         f"with `make serve-venv` or pass --serve-venv")
    facts = _venv_facts(python)
    wheel = Path(facts["pytriton"]) / "tritonserver"
    return TritonInstall(wheel / "bin" / "tritonserver", None, {
        "PATH": f"{venv.resolve() / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": os.pathsep.join([facts["libs"], facts["libdir"]]
                                           + ([os.environ["LD_LIBRARY_PATH"]]
                                              if os.environ.get("LD_LIBRARY_PATH") else [])),
        "_STUB": str(wheel / "python_backend_stubs" / facts["version"]
                     / "triton_python_backend_stub"),
        "_PYTHON_BACKEND": str(wheel / "backends" / "python"),
    }, ("python",))


def _venv_facts(python: Path) -> dict:
    code = ("import json, sys, sysconfig, pathlib, pytriton, numpy\n"
            "p = pathlib.Path(pytriton.__file__).parent\n"
            "print(json.dumps({'pytriton': str(p), 'libs': str(p.parent / 'nvidia_pytriton.libs'),"
            " 'libdir': sysconfig.get_config_var('LIBDIR'), 'numpy': numpy.__version__,"
            " 'version': f'{sys.version_info[0]}.{sys.version_info[1]}'}))")
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        raise UsageError(f"{python} has no nvidia-pytriton (or numpy); recreate the serving "
                         f"venv with `make serve-venv`")
    facts = json.loads(run.stdout)
    if int(facts["numpy"].split(".")[0]) >= 2:
        raise UsageError(f"the serving venv has numpy {facts['numpy']}; the Triton Python "
                         f"backend needs numpy<2 there (`make serve-venv` installs it)")
    return facts


class TritonServer:
    """One tritonserver process; ``start()`` returns once it is ready, ``stop()`` is SIGTERM
    (in-flight requests finish) then, after ``EXIT_TIMEOUT_S``, SIGKILL."""

    def __init__(self, install: TritonInstall, repository: Path, *, host: str = "127.0.0.1",
                 http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 log_path: Path | None = None, verbose: bool = False):
        self.install, self.repository, self.host = install, Path(repository), host
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.log_path, self.verbose = log_path, verbose
        self.proc: subprocess.Popen | None = None
        self._scratch: str | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def endpoints(self) -> dict:
        return {"http": self.http_url, "grpc": f"{self.host}:{self.grpc_port}",
                "metrics": f"http://{self.host}:{self.metrics_port}/metrics"}

    def command(self) -> list[str]:
        cmd = [str(self.install.binary), "--model-repository", str(self.repository.resolve()),
               "--http-address", self.host, "--http-port", str(self.http_port),
               "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
               "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
               "--exit-timeout-secs", str(EXIT_TIMEOUT_S), "--log-verbose",
               "1" if self.verbose else "0"]
        if self._scratch:
            cmd += ["--backend-directory", f"{self._scratch}/backends",
                    "--cache-directory", f"{self._scratch}/cache"]
        return cmd

    def _backend_dir(self) -> None:
        """The wheel's Python backend with the stub for the venv's Python beside it."""
        env = self.install.env
        if "_STUB" not in env:
            return
        self._scratch = tempfile.mkdtemp(prefix="ldm-serve-triton-")
        python = Path(self._scratch) / "backends" / "python"
        shutil.copytree(env["_PYTHON_BACKEND"], python,
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(env["_STUB"], python / "triton_python_backend_stub")
        (Path(self._scratch) / "cache").mkdir()

    def start(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> TritonServer:
        self._backend_dir()
        env = {**os.environ, **{k: v for k, v in self.install.env.items()
                                if not k.startswith("_")}}
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self.log_path:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._cleanup()
                raise UsageError(f"tritonserver exited with code {self.proc.returncode} before it "
                                 f"was ready{self._log_tail()}")
            if self.ready():
                return self
            time.sleep(POLL_S)
        self.stop()
        raise UsageError(f"tritonserver was not ready after {timeout:.0f} s{self._log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self) -> int | None:
        """SIGTERM, wait for in-flight requests, SIGKILL after the grace period."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(EXIT_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup()
        return self.proc.returncode

    def _cleanup(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def _log_tail(self) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        lines = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        errors = [ln for ln in lines if " E" in ln[:2] or "error" in ln.lower()]
        return f": {(errors or lines or [''])[-1].strip()[:300]}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
