"""onnxruntime with the graph's symbolic dimensions pinned to the request's size (free-dimension
overrides) vs the dynamic graph: U-Net, CPU, interleaved calls, median of repeats.

    python benchmarks/bench_fixed_dims.py BUNDLE --height 256 --width 256 --threads 2 --repeats 9
    python benchmarks/bench_fixed_dims.py BUNDLE --precision int8 --form plain

A session planned for one size can fold shape arithmetic and plan memory ahead; this says
whether that pays on this CPU. Both sessions run the same graph file (the bundle's form for
onnxruntime unless ``--form plain``) with the same threads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_fused import interleaved, unet_feeds
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.backends.sessions import SessionFromOnnx


class _Session:
    """A session with bench_fused.interleaved's ``run(feeds)`` returning a dict."""

    def __init__(self, session):
        self.session = session
        self.names = [o.name for o in session.get_outputs()]

    def run(self, feeds):
        return {"model_output": self.session.run(None, feeds)[0]}


def symbolic_dims(path: Path, feeds: dict) -> dict[str, int]:
    """Each symbolic dimension of the graph's inputs, with its value in ``feeds``."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    dims = {}
    for inp in g.input:
        for d, n in zip(inp.type.tensor_type.shape.dim, feeds[inp.name].shape):
            if d.dim_param:
                dims[d.dim_param] = int(n)
    return dims


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--form", choices=("auto", "plain"), default="auto",
                    help="auto: the ort-mha form where the bundle has it")
    a = ap.parse_args()
    m = open_bundle(a.bundle)
    variant = m.variant("unet", a.precision)
    forms = variant.record.forms or {}
    path = m.root / forms["ort-mha"].file if a.form == "auto" and "ort-mha" in forms else variant.path
    feeds = unet_feeds(m, a.height, a.width)
    dims = symbolic_dims(path, feeds)
    runs = {k: _Session(SessionFromOnnx(path, threads=a.threads, fixed_dims=d)())
            for k, d in (("dynamic", None), ("fixed", dims))}
    outs, med = interleaved(runs, feeds, a.repeats)
    print(f"{path.name}, batch 2, {a.height}x{a.width}, {a.threads} threads, median of {a.repeats}: "
          f"dynamic {med['dynamic'] * 1e3:.1f} ms, fixed {dims} {med['fixed'] * 1e3:.1f} ms "
          f"({med['dynamic'] / med['fixed']:.2f}x); max-abs "
          f"{np.abs(outs['dynamic'] - outs['fixed']).max():.1e}")


if __name__ == "__main__":
    main()
