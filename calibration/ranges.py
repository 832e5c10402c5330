"""Activation ranges for INT8: streaming histograms of intermediate tensors, and the
percentile / entropy / min-max rules that turn a histogram into a quantisation range.

Memory stays bounded for any U-Net size: the FP32 graph is run with a *group* of
intermediate tensors added as outputs, the group's total size kept under
``OUTPUT_BUDGET_BYTES`` (sizes from shape inference at the calibration shape); each
output is folded into a fixed-size histogram right after the run and dropped. More
tensors than fit in one budget simply cost more passes over the samples. The graph
with the extra outputs is written without its weights, next to the FP32 graph, whose
external weight files it shares (removed after).
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import numpy as np

METHODS = ("percentile", "entropy", "minmax")
# Bins of each signed histogram over [-R, R] (R = largest |value| seen). 4096 bins give
# the entropy search 2048 magnitude bins, 16x the 128 levels one sign of int8 has.
NUM_BINS = 4096
# percentile: each tail beyond this fraction of all values is clipped (99.999 % kept per
# side). Diffusion U-Net activations have rare, large outliers (e.g. after the
# residual adds); clipping 1e-5 of them trades a few saturated values for ~2-10x finer steps.
PERCENTILE_TAIL = 1e-5
# entropy (KL) search: quantised levels per sign and the stride of candidate thresholds.
ENTROPY_LEVELS = 128
ENTROPY_STRIDE = 16
# Extra outputs per calibration pass, all together. SD1.5 at 512^2, CFG batch 2: the
# inputs of its quantised layers and its convs' outputs are ~240 tensors, 1.5 GB in all
# (by shape, on a meta-device U-Net), so one pass; 768^2 would take two. The FP32 session
# itself holds ~3.4 GB of weights plus a few GB of working memory: ~9 GB, under 24 GB.
OUTPUT_BUDGET_BYTES = 2 << 30
# Initializers up to this many elements keep their values for shape inference (shape
# constants); larger ones are weights, whose shapes suffice.
SMALL_INITIALIZER = 64
# A range narrower than this (a tensor that is ~constant 0) gets this width instead.
MIN_RANGE = 1e-6


class Histogram:
    """Signed histogram with a symmetric range that grows (old counts re-binned)."""

    def __init__(self):
        self.counts = None
        self.radius = 0.0
        self.lo, self.hi = np.inf, -np.inf

    def _bin(self, x: np.ndarray, radius: float) -> np.ndarray:
        idx = ((x + radius) * (NUM_BINS / (2 * radius))).astype(np.int64)
        np.clip(idx, 0, NUM_BINS - 1, out=idx)
        return np.bincount(idx, minlength=NUM_BINS).astype(np.float64)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        if not x.size:
            return
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        r = max(abs(lo), abs(hi), MIN_RANGE)
        if self.counts is None:
            self.radius, self.counts = r, self._bin(x, r)
            return
        if r > self.radius:  # re-bin what we have at the old bin centres
            edges = np.linspace(-self.radius, self.radius, NUM_BINS + 1)
            centres = (edges[:-1] + edges[1:]) / 2
            self.counts = np.histogram(centres, bins=NUM_BINS, range=(-r, r), weights=self.counts)[0]
            self.radius = r
        self.counts += self._bin(x, self.radius)

    def edges(self) -> np.ndarray:
        return np.linspace(-self.radius, self.radius, NUM_BINS + 1)

    def range(self, method: str) -> tuple[float, float]:
        if self.counts is None:
            raise ValueError("no data collected")
        if method == "minmax":
            return self.lo, self.hi
        if method == "percentile":
            lo, hi = self._percentile()
        elif method == "entropy":
            t = self._entropy_threshold()
            lo, hi = -t, t
        else:
            raise ValueError(f"unknown calibration method {method!r}; use one of {METHODS}")
        return max(lo, self.lo), min(hi, self.hi)

    def _percentile(self) -> tuple[float, float]:
        cdf = np.cumsum(self.counts) / self.counts.sum()
        e = self.edges()
        lo = e[int(np.searchsorted(cdf, PERCENTILE_TAIL, side="right"))]
        hi = e[int(np.searchsorted(cdf, 1.0 - PERCENTILE_TAIL, side="left")) + 1]
        return float(lo), float(hi)

    def _entropy_threshold(self) -> float:
        """|x| threshold minimising KL(P || Q), P the clipped magnitude histogram and Q its
        ENTROPY_LEVELS-level quantisation (TensorRT's calibration rule)."""
        half = NUM_BINS // 2
        mag = self.counts[half:] + self.counts[:half][::-1]
        width = self.radius / half
        best, best_kl = half, np.inf
        nz = mag > 0
        for i in range(ENTROPY_LEVELS, half + 1, ENTROPY_STRIDE):
            p = mag[:i].copy()
            p[-1] += mag[i:].sum()
            if p.sum() == 0:
                continue
            # Q: each of the ENTROPY_LEVELS levels spreads its mass evenly over its bins
            # that held values (empty bins stay empty, as quantisation cannot fill them)
            starts = np.linspace(0, i, ENTROPY_LEVELS + 1).round().astype(int)
            sums = np.add.reduceat(mag[:i], starts[:-1])
            cnts = np.add.reduceat(nz[:i].astype(np.int64), starts[:-1])
            avg = np.where(cnts > 0, sums / np.maximum(cnts, 1), 0.0)
            q = np.repeat(avg, np.diff(starts)) * nz[:i]
            p, q = p / p.sum(), q / max(q.sum(), 1e-30)
            m = p > 0
            kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
            if kl < best_kl:
                best, best_kl = i, kl
        return best * width


def tensor_sizes(proto, feeds: dict, names: list[str]) -> dict[str, int]:
    """Bytes of each named tensor at the shapes of ``feeds``, by shape inference on the
    graph without its weights (float32 assumed, as the U-Net's activations are)."""
    import onnx

    g = copy.deepcopy(proto)
    # Big weights only need their shapes: declare them as typed inputs and drop their
    # data (keeps the copy small); small ones may be reshape targets, kept as values.
    big = [t for t in g.graph.initializer if np.prod(t.dims) > SMALL_INITIALIZER]
    declared = {i.name for i in g.graph.input}
    for t in big:
        if t.name not in declared:
            g.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    keep = [t for t in g.graph.initializer if np.prod(t.dims) <= SMALL_INITIALIZER]
    del g.graph.initializer[:]
    g.graph.initializer.extend(keep)
    for inp in g.graph.input:
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            for d, n in zip(dims, feeds[inp.name].shape):
                d.Clear()
                d.dim_value = int(n)
    try:  # onnxruntime's symbolic inference follows Shape->Gather->Reshape chains
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        g = SymbolicShapeInference.infer_shapes(g, auto_merge=True)
    except Exception:
        try:
            g = onnx.shape_inference.infer_shapes(g, data_prop=True)
        except Exception:  # every size unknown, estimated below
            pass
    known = {}
    for vi in list(g.graph.value_info) + list(g.graph.output) + list(g.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            known[vi.name] = int(np.prod([d.dim_value for d in dims])) * 4
    for k, v in feeds.items():
        known[k] = v.nbytes
    # Unsized: as large as the producer's largest input (exact for casts, reshapes and
    # elementwise ops), else as the largest of the other requested tensors.
    producer = {o: n for n in proto.graph.node for o in n.output}
    fallback = max((known[n] for n in names if n in known), default=OUTPUT_BUDGET_BYTES)
    sizes = {}
    for n in names:
        if n in known:
            sizes[n] = known[n]
        else:
            ins = [known[i] for i in getattr(producer.get(n), "input", []) if i in known]
            sizes[n] = max(ins, default=fallback)
    return sizes


def pack(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    groups, cur, used = [], [], 0
    for n in names:
        if cur and used + sizes[n] > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += sizes[n]
    return groups + ([cur] if cur else [])


@contextlib.contextmanager
def scratch_path(folder: Path, tag: str):
    """A hidden temporary graph path next to the FP32 graph: its external data (weights)
    resolve there without copies (onnxruntime refuses external data reached through a
    link out of the model's folder). The graph and its own data file are removed after."""
    path = Path(folder) / f".{tag}-{os.getpid()}.onnx"
    try:
        yield path
    finally:
        for p in (path, path.with_name(path.name + ".data")):
            p.unlink(missing_ok=True)


def collect(fp32_path: Path, names: list[str], samples: list[dict], *, threads: int = 0,
            budget: int = OUTPUT_BUDGET_BYTES, progress=lambda msg: None) -> dict[str, Histogram]:
    """Histogram of every tensor in ``names`` over all ``samples`` (feeds of the graph)."""
    import onnx

    from ldm_edge.runtime.backends.sessions import SessionFromOnnx

    fp32_path = Path(fp32_path)
    proto = onnx.load(str(fp32_path), load_external_data=False)
    hists = {n: Histogram() for n in names}
    graph_inputs = {i.name for i in proto.graph.input}
    direct = [n for n in names if n in graph_inputs]  # read from the feeds themselves
    for s in samples:
        for n in direct:
            hists[n].update(s[n])
    inner = [n for n in names if n not in graph_inputs]
    sizes = tensor_sizes(proto, samples[0], inner)
    groups = pack(inner, sizes, budget)
    have = {o.name for o in proto.graph.output}
    for gi, group in enumerate(groups):
        g = copy.deepcopy(proto) if len(groups) > 1 else proto
        for n in group:
            if n not in have:
                g.graph.output.append(onnx.ValueInfoProto(name=n))
        progress(f"calibration pass {gi + 1}/{len(groups)}: {len(group)} tensors, "
                 f"~{sum(sizes[n] for n in group) / 2**20:.0f} MiB per run, {len(samples)} runs")
        with scratch_path(fp32_path.parent, f"calib-{gi}") as path:
            onnx.save_model(g, str(path))
            del g
            sess = SessionFromOnnx(path, threads=threads)()
            for s in samples:
                for n, arr in zip(group, sess.run(group, s)):
                    hists[n].update(arr)
            del sess
    return hists
