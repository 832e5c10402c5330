"""`--ort-cache` measured: opening a component's onnxruntime session with and without the
graph cache, and what the cached graph computes and costs per call.

    python benchmarks/bench_ort_cache.py BUNDLE [--component unet] [--repeats 3] [--threads 2]
                                         [--calls 9]

1. In a fresh process with an empty cache: the first start (optimise + write the entry).
2. ``--repeats`` rounds, each a fresh process without the cache and one with it (a hit),
   alternating: session-open seconds, median.
3. In one process: both sessions, ``--calls`` calls each, interleaved: median seconds per
   call and the largest difference between their outputs on the same input.
The cache goes to a temporary folder (the user's is left alone) and is deleted after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def _feeds(manifest, spec, batch: int = 2, size: int | None = None) -> dict:
    """Random inputs from the component's spec: ``batch``, ``size`` pixels square (None: the
    bundle's default size)."""
    import numpy as np

    d = manifest.schema.defaults
    f = int(manifest.schema.vae_scale_factor)
    h, w = (size, size) if size else (d.height, d.width)
    sizes = {"batch": batch, "latent_height": h // f, "latent_width": w // f,
             "height": h, "width": w}
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec.inputs:
        shape = [dim if isinstance(dim, int) else sizes[dim] for dim in t.shape]
        if t.dtype.startswith("int"):
            feeds[t.name] = np.ones(shape, dtype=t.dtype)
        elif t.name == "timestep":
            feeds[t.name] = np.full(shape, 500, dtype=t.dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def _open(bundle, component, threads, cache):
    from ldm_edge.runtime.backends.choose import open_backend
    from ldm_edge.runtime.bundle.opener import open_bundle

    m = open_bundle(bundle, verify=False)
    t0 = time.perf_counter()
    b = open_backend(m, component, device="cpu", threads=threads, ort_cache=cache)
    return m, b, time.perf_counter() - t0


def _child(a) -> None:
    _, b, seconds = _open(a.bundle, a.component, a.threads, a.child == "cached")
    print(json.dumps({"open_s": seconds, "state": b.cache_state}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--component", default="unet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=9)
    ap.add_argument("--child", choices=["plain", "cached"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a)
    import shutil

    import numpy as np

    cache = tempfile.mkdtemp(prefix="ldm-edge-ort-cache-bench-")
    os.environ["LDM_EDGE_CACHE"] = cache
    try:
        def child(kind):
            r = subprocess.run([sys.executable, __file__, a.bundle, f"--component={a.component}",
                                f"--threads={a.threads}", f"--child={kind}"],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"{kind} run failed:\n{r.stderr[-2000:]}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        first = child("cached")
        assert first["state"] == "miss", first
        opens = {"plain": [], "cached": []}
        for _ in range(a.repeats):
            for kind in ("plain", "cached"):
                r = child(kind)
                assert r["state"] == ("hit" if kind == "cached" else "off"), r
                opens[kind].append(r["open_s"])

        m, plain, _ = _open(a.bundle, a.component, a.threads, False)
        _, cached, _ = _open(a.bundle, a.component, a.threads, True)
        feeds = _feeds(m, plain.spec)
        out = plain.spec.output_names[0]
        diff = float(np.abs(plain.run(feeds)[out] - cached.run(feeds)[out]).max())
        calls = {"plain": [], "cached": []}
        for i in range(a.calls):
            order = (("plain", plain), ("cached", cached)) if i % 2 else (("cached", cached), ("plain", plain))
            for kind, b in order:
                t0 = time.perf_counter()
                b.run(feeds)
                calls[kind].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in opens.items()}
    per = {k: statistics.median(v) for k, v in calls.items()}
    print(f"{a.component} of {a.bundle}, {a.threads} threads, opens median of {a.repeats} fresh "
          f"processes each, calls median of {a.calls} interleaved\n")
    print("| | session open (s) | per call (s) |")
    print("|---|---:|---:|")
    print(f"| no cache | {med['plain']:.2f} | {per['plain']:.4f} |")
    print(f"| `--ort-cache`, hit | {med['cached']:.2f} ({med['plain'] / med['cached']:.1f}× faster) | "
          f"{per['cached']:.4f} ({per['plain'] / per['cached']:.3f}×) |")
    print(f"| `--ort-cache`, first start (miss: optimise and write) | {first['open_s']:.2f} | – |")
    print(f"\nmax-abs difference of the outputs on the same input: {diff:.3g}")


if __name__ == "__main__":
    main()
