"""The same U-Net variant of two bundles side by side (e.g. INT8 with 8-bit and with 7-bit
weights): onnxruntime CPU, batch 2, interleaved calls, median of repeats, and the outputs'
difference.

    python benchmarks/bench_variants.py BUNDLE_A BUNDLE_B --precision int8 --height 256 --width 256
"""

from __future__ import annotations

import argparse

import numpy as np

from ldm_edge.runtime.backends.choose import open_backend
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.cpu import cpu_summary

from bench_fused import interleaved, unet_feeds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    feeds = unet_feeds(open_bundle(a.a), a.height, a.width)
    runs = {k: open_backend(open_bundle(k), "unet", backend="onnxruntime", device="cpu",
                            threads=a.threads, precision=a.precision) for k in (a.a, a.b)}
    outs, med = interleaved(runs, feeds, a.repeats)
    x, y = outs[a.a].ravel().astype(np.float64), outs[a.b].ravel().astype(np.float64)
    cos = float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
    print(f"U-Net {a.precision}, batch 2, {a.height}x{a.width}, {a.threads} threads, median of "
          f"{a.repeats}, {cpu_summary()}: {a.a} {med[a.a] * 1e3:.1f} ms, {a.b} "
          f"{med[a.b] * 1e3:.1f} ms (A/B {med[a.a] / med[a.b]:.2f}x); outputs' cosine {cos:.5f}")


if __name__ == "__main__":
    main()
