"""U-Net latency of a bundle's fp32 / fp16 / int8 variants in onnxruntime on the CPU.

    python benchmarks/bench_unet_precision.py BUNDLE [--repeats N] [--threads T]
        [--batch B] [--height H --width W] [--warmup W] [--json FILE]

Every variant the bundle holds gets its own session (CPU execution provider, all graph
optimisations, T intra-op threads); after warm-up the variants run in turn, one call
each per round, the order rotating every round, so drift of a shared machine (other
jobs, clocks, caches) falls on all of them alike. Reported: median and spread per
variant, speed relative to fp32, and the output's agreement with fp32 on the same
input, as a markdown table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PRECISIONS = ("fp32", "fp16", "int8")
# Calls per session before timing: the first runs allocate arenas and pre-pack weights.
DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_feeds(manifest, batch: int, height: int | None, width: int | None) -> dict:
    spec = manifest.spec("unet")
    m = manifest.schema
    unet = m.components["unet"]
    f = int(m.vae_scale_factor)
    h = (height or m.defaults.height) // f
    w = (width or m.defaults.width) // f
    rng = np.random.default_rng(0)
    feeds = {}
    for t in spec.inputs:
        if t.name == "sample":
            arr = rng.standard_normal((batch, int(m.latent_channels), h, w))
        elif t.name == "timestep":
            arr = np.full((batch,), 500)  # mid-trajectory
        else:  # encoder_hidden_states (and, for some graphs, extra conditioning)
            shape = [batch if d == "batch" else int(d) for d in t.shape]
            arr = rng.standard_normal(shape)
        feeds[unet.graph_name(t.name)] = arr.astype(t.dtype)
    return feeds


def session(path: Path, threads: int):
    from ldm_edge.runtime.backends.sessions import SessionFromOnnx

    return SessionFromOnnx(path, threads=threads, inter_threads=1)()


def run(bundle, repeats: int = DEFAULT_REPEATS, threads: int = 2, batch: int = 2,
        height: int | None = None, width: int | None = None,
        warmup: int = DEFAULT_WARMUP) -> dict:
    import onnxruntime as ort

    from ldm_edge.runtime.compare import compare
    from ldm_edge.runtime.bundle.opener import open_bundle

    m = open_bundle(bundle)
    have = [p for p in PRECISIONS if p in m.precisions("unet")]
    feeds = make_feeds(m, batch, height, width)
    sessions = {p: session(m.variant("unet", p).path, threads) for p in have}
    outputs = {}
    for p, s in sessions.items():
        for _ in range(warmup):
            outputs[p] = s.run(None, feeds)[0]
    times = {p: [] for p in have}
    for r in range(repeats):
        order = have[r % len(have):] + have[: r % len(have)]
        for p in order:
            t0 = time.perf_counter()
            sessions[p].run(None, feeds)
            times[p].append(time.perf_counter() - t0)
    med = {p: statistics.median(v) for p, v in times.items()}
    rows = []
    for p in have:
        c = compare(outputs[p], outputs["fp32"]) if "fp32" in outputs else None
        size = sum(f.size for f in m.variant("unet", p).record.files)
        rows.append({
            "precision": p, "median_ms": med[p] * 1e3,
            "min_ms": min(times[p]) * 1e3, "max_ms": max(times[p]) * 1e3,
            "speedup_vs_fp32": med["fp32"] / med[p] if "fp32" in med else None,
            "cosine_vs_fp32": c.cosine if c else None, "max_abs_vs_fp32": c.max_abs if c else None,
            "file_mb": size / 1e6,
            "psnr_db_recorded": getattr(m.schema.quality.get(p), "psnr_db", None),
        })
    shape = {k: list(v.shape) for k, v in feeds.items()}
    return {"bundle": str(bundle), "cpu": cpu_name(), "threads": threads, "repeats": repeats,
            "warmup": warmup, "onnxruntime": ort.__version__, "inputs": shape, "results": rows}


def table(res: dict) -> str:
    lines = [f"U-Net, inputs {res['inputs']}, {res['threads']} threads, {res['cpu']}, "
             f"onnxruntime {res['onnxruntime']}, median of {res['repeats']} interleaved runs",
             "",
             "| precision | median ms | min-max ms | vs fp32 | cosine vs fp32 | file MB | e2e PSNR dB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["results"]:
        sp = f"{r['speedup_vs_fp32']:.2f}x" if r["speedup_vs_fp32"] else "-"
        cos = f"{r['cosine_vs_fp32']:.6f}" if r["cosine_vs_fp32"] is not None else "-"
        q = r["psnr_db_recorded"]
        q = "-" if q is None else ("inf" if q == float("inf") else f"{q:.1f}")
        lines.append(f"| {r['precision']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} "
                     f"| {sp} | {cos} | {r['file_mb']:.1f} | {q} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    ap.add_argument("--batch", type=int, default=2, help="2 = one image with guidance")
    ap.add_argument("--height", type=int, help="pixels (default: the model's)")
    ap.add_argument("--width", type=int, help="pixels (default: the model's)")
    ap.add_argument("--json", dest="json_out", help="also write the JSON here")
    a = ap.parse_args(argv)
    res = run(a.bundle, a.repeats, a.threads, a.batch, a.height, a.width, a.warmup)
    print(table(res))
    print()
    print(json.dumps(res, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
