"""Helpers of the serving tier (tests/serve/conftest.py makes the venv)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path


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
