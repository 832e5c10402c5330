"""U-Net (or VAE decoder) plain graph vs its ort-mha form (attention fused into
MultiHeadAttention), onnxruntime CPU, interleaved calls, median of repeats. Needs a bundle
with forms (`ldm-export fuse BUNDLE`).

    python benchmarks/bench_fused.py BUNDLE --height 256 --width 256 --threads 2 --repeats 5
    python benchmarks/bench_fused.py BUNDLE --height 512 --width 512 --rss
    python benchmarks/bench_fused.py BUNDLE --component vae_decoder --height 512 --width 512

``--rss``: instead, each form opened and called twice in a process of its own, and that
process's peak resident memory printed (the score matrices are what the form saves).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from ldm_edge.runtime.backends.choose import open_backend
from ldm_edge.runtime.bundle.opener import open_bundle


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--component", choices=("unet", "vae_decoder"), default="unet")
    ap.add_argument("--rss", action="store_true", help="peak RSS of each form in its own process")
    ap.add_argument("--only", choices=("plain", "fused"), help=argparse.SUPPRESS)  # --rss child
    a = ap.parse_args()
    if a.rss:
        return peak_rss(a)
    m = open_bundle(a.bundle)
    feeds = (unet_feeds if a.component == "unet" else decoder_feeds)(m, a.height, a.width)
    if a.only:
        b = open_backend(m, a.component, backend="onnxruntime", device="cpu", threads=a.threads,
                         precision=a.precision, fused_attention=a.only == "fused")
        for _ in range(2):
            b.run(feeds)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
        return
    runs = {k: open_backend(m, a.component, backend="onnxruntime", device="cpu", threads=a.threads,
                            precision=a.precision, fused_attention=k == "fused") for k in ("plain", "fused")}
    assert runs["fused"].form == "ort-mha", "this bundle has no ort-mha form: ldm-export fuse BUNDLE"
    outs, med = interleaved(runs, feeds, a.repeats)
    print(f"{a.component} batch {len(next(iter(feeds.values())))}, {a.height}x{a.width}, {a.threads} threads, median of {a.repeats}: "
          f"plain {med['plain'] * 1e3:.1f} ms, fused {med['fused'] * 1e3:.1f} ms "
          f"({med['plain'] / med['fused']:.2f}x); max-abs {np.abs(outs['plain'] - outs['fused']).max():.1e}")


def interleaved(runs: dict, feeds: dict, repeats: int) -> tuple[dict, dict]:
    """One warm-up call of each backend (its U-Net output kept), then ``repeats`` rounds of
    one call each, in turn; the median seconds per call of each."""
    outs = {k: next(iter(b.run(feeds).values())) for k, b in runs.items()}
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, b in runs.items():
            t0 = time.perf_counter()
            b.run(feeds)
            times[k].append(time.perf_counter() - t0)
    return outs, {k: statistics.median(v) for k, v in times.items()}


def unet_feeds(m, height: int, width: int) -> dict:
    spec, f = m.spec("unet"), m.schema.vae_scale_factor
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((2, spec.inputs[0].shape[1], height // f, width // f), np.float32),
            "timestep": np.array([500.0, 500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((2, *spec.inputs[2].shape[1:]), np.float32)}


def decoder_feeds(m, height: int, width: int) -> dict:
    f, c = m.schema.vae_scale_factor, m.schema.latent_channels
    return {"latent": np.random.default_rng(0).standard_normal((1, c, height // f, width // f), np.float32)}


def peak_rss(a) -> None:
    mib = {}
    for form in ("plain", "fused"):
        out = subprocess.run([sys.executable, __file__, a.bundle, "--height", str(a.height),
                              "--width", str(a.width), "--threads", str(a.threads),
                              "--precision", a.precision, "--component", a.component,
                              "--only", form],
                             capture_output=True, text=True, check=True).stdout
        mib[form] = int(out.split()[-1]) / 1024
    print(f"{a.component}, {a.height}x{a.width}, two calls, peak RSS of the process: "
          f"plain {mib['plain']:.0f} MiB, fused {mib['fused']:.0f} MiB "
          f"({mib['plain'] / mib['fused']:.1f}x less)")


if __name__ == "__main__":
    main()
