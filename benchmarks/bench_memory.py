"""Peak memory of ldm-run with and without --low-memory / --vae-tiling, and what reopening
the sessions on every call costs in low-memory mode.

    python benchmarks/bench_memory.py BUNDLE [--size 512] [--steps 2] [--threads 2] \
        [--tile 256] [--calls 3] [--precision int8] [--diffusers DIFFUSERS_FOLDER]

Each mode runs in a fresh process; its peak RSS is the kernel's ru_maxrss for that process
(os.wait4). ``--diffusers``: the same image made by diffusers' StableDiffusionPipeline
(PyTorch eager, benchmarks/run_one.py) in a process of its own first, and each mode's peak
given as a ratio of it. The repeated-call figures come from one Pipeline generating ``--calls`` times in
its own process (first call and the median of the rest)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

RUN = [sys.executable, "-m", "ldm_edge.runtime"]
PROMPT = "a red circle in the top left on a white background"

REPEAT = r"""
import json, sys, time
from ldm_edge.runtime.pipeline import Pipeline
bundle, size, steps, threads, calls, low, PROMPT = sys.argv[1:8]
pipe = Pipeline(bundle, threads=int(threads), low_memory=low == "1")
times = []
for _ in range(int(calls)):
    t0 = time.perf_counter()
    pipe(PROMPT, num_inference_steps=int(steps), height=int(size), width=int(size), seed=0)
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


# onnxruntime's graph cache off (it is on for users): writing an entry is not what these
# rows measure; with --ort-cache in the ldm-run arguments a row says so itself
os.environ.setdefault("LDM_EDGE_ORT_CACHE", "0")


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one process running ``cmd``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-400:]}")
    return usage.ru_maxrss / 1024.0, wall


def diffusers_cmd(a, tmp: str) -> list[str]:
    """benchmarks/run_one.py making the same image with diffusers, PyTorch eager."""
    import numpy as np

    with open(os.path.join(a.bundle, "manifest.json")) as f:
        m = json.load(f)
    side = a.size or int(m.get("defaults", {}).get("height", 512))
    f = int(m.get("vae_scale_factor", 8))
    lat = os.path.join(tmp, "latents.npy")
    np.save(lat, np.random.default_rng(1).standard_normal(
        (1, int(m.get("latent_channels", 4)), side // f, side // f), dtype=np.float32))
    return [sys.executable, os.path.join(os.path.dirname(__file__), "run_one.py"), "--kind",
            "diffusers", "--model-dir", a.diffusers, "--size", str(side), "--steps", str(a.steps),
            "--threads", str(a.threads), "--prompt", PROMPT, "--latents", lat,
            "--t-spawn", str(time.time()), "--png", os.path.join(tmp, "d.png"),
            "--out", os.path.join(tmp, "d.json")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the bundle's)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tile", type=int, default=None, help="--vae-tile-size (default: the bundle's)")
    ap.add_argument("--calls", type=int, default=3, help="generations in one process, per mode")
    ap.add_argument("--precision", default="fp32", help="ldm-run --precision")
    ap.add_argument("--diffusers", default=None, metavar="FOLDER",
                    help="the diffusers folder the bundle was exported from: its peak as the baseline")
    a = ap.parse_args(argv)
    size = [] if a.size is None else ["--height", str(a.size), "--width", str(a.size)]
    tile = ["--vae-tiling"] + ([] if a.tile is None else ["--vae-tile-size", str(a.tile)])
    modes = {"plain": [], "--low-memory": ["--low-memory"], "--vae-tiling": tile,
             "--low-memory --vae-tiling": ["--low-memory"] + tile}
    with tempfile.TemporaryDirectory() as tmp:
        base = RUN + [a.bundle, "-p", PROMPT, "--steps", str(a.steps), "--seed", "0", "-q",
                      "--threads", str(a.threads), "-o", os.path.join(tmp, "x.png"),
                      "--precision", a.precision] + size
        print(f"{'mode':<28} {'peak RSS MiB':>12} {'wall s':>8}")
        baseline = None
        if a.diffusers:
            baseline, wall = peak_rss(diffusers_cmd(a, tmp))
            print(f"{'diffusers (baseline)':<28} {baseline:12.0f} {wall:8.2f}", flush=True)
        for name, extra in modes.items():
            try:
                rss, wall = peak_rss(base + extra)
            except SystemExit as e:  # one mode refused (a tile size, say): the others still run
                said = str(e).strip().splitlines()[-1] if str(e).strip() else "failed"
                print(f"{name + ' ' + a.precision:<28} {'-':>12} {'-':>8} {said}", flush=True)
                continue
            ratio = f" {rss / baseline:6.2f}x of diffusers" if baseline else ""
            print(f"{name + ' ' + a.precision:<28} {rss:12.0f} {wall:8.2f}{ratio}", flush=True)
    if a.calls > 1:
        side = str(a.size or 0)
        if not a.size:
            with open(os.path.join(a.bundle, "manifest.json")) as f:
                m = json.load(f)
            side = str(m.get("defaults", {}).get("height", 512))
        print(f"\n{a.calls} generations in one Pipeline: first / median of the rest, seconds")
        for low in ("0", "1"):
            out = subprocess.run([sys.executable, "-c", REPEAT, a.bundle, side, str(a.steps),
                                  str(a.threads), str(a.calls), low, PROMPT],
                                 capture_output=True, text=True, check=True)
            t = json.loads(out.stdout.strip().splitlines()[-1])
            rest = sorted(t[1:])[len(t[1:]) // 2]
            print(f"{'low memory' if low == '1' else 'plain':<28} {t[0]:8.3f} {rest:8.3f}")


if __name__ == "__main__":
    main()
