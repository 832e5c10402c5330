"""Time ``ldm-export onnx`` on a model folder and measure its peak resident memory.

    OMP_NUM_THREADS=2 python benchmarks/sdxl_export_memory.py SDXL_DIR SDXL_BUNDLE

The export runs in a child process (``--debug``, so its memory log lines show: PyTorch
references computed, weights parked, onnxruntime session open, session closed, weights
released). Its peak is the kernel's own count for the child (``wait4``'s ru_maxrss, the same
figure as VmHWM); /proc/<pid>/status is also sampled every SAMPLE_S to time-stamp each line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SAMPLE_S = 0.5  # often enough to see each phase (the shortest, a session open, takes seconds)
GIB = 2**30
# the export's own lines worth keeping in the summary (export/onnx_export.py, release.py)
MEMORY_LINES = ("reference outputs computed", "session open", "session closed", "parked",
                "released", "exported with", ": ok (", "exporting", "wrote")


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes ({} once it has gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def _reader(stream, log, lines: list, t0: float, last: dict) -> None:
    for line in stream:
        rss = last.get("VmRSS", 0) / GIB
        stamped = f"[{time.perf_counter() - t0:7.1f}s rss {rss:5.1f} GiB] {line}"
        log.write(stamped)
        log.flush()
        if any(k in line for k in MEMORY_LINES):
            lines.append(stamped.rstrip())


def run(source: Path, out: Path, log_path: Path, extra: list[str]) -> dict:
    exe = Path(sys.executable).parent / "ldm-export"
    cmd = [str(exe), "--debug", "onnx", str(source), "-o", str(out), "--force", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
    lines: list[str] = []
    last: dict = {}
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        reader = threading.Thread(target=_reader, args=(child.stdout, log, lines, t0, last))
        reader.start()
        while True:
            last.update(_status(child.pid))
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(SAMPLE_S)
        child.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
    return dict(cmd=cmd, seconds=time.perf_counter() - t0, rc=child.returncode,
                peak=usage.ru_maxrss * 1024, sampled_peak=last.get("VmHWM", 0), lines=lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="the model folder (benchmarks/make_sdxl_arch.py)")
    ap.add_argument("out", type=Path, help="the bundle folder to write")
    ap.add_argument("--log", type=Path, default=Path("sdxl_export_memory.log"))
    ap.add_argument("extra", nargs="*", help="more ldm-export onnx options (after --)")
    a = ap.parse_args(argv)
    r = run(a.source, a.out, a.log, a.extra)
    print("\n".join(r["lines"]))
    print(f"command: {' '.join(r['cmd'])}")
    print(f"exit {r['rc']}; {r['seconds']:.0f} s; peak RSS {r['peak'] / GIB:.2f} GiB "
          f"(sampled VmHWM {r['sampled_peak'] / GIB:.2f} GiB); OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '2')}; full log: {a.log}")
    return r["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
