"""Which INT8 layers cost the most quality, and keeping them in float until a budget holds.

1. Sweep: one "switchable" graph (every unit's fake-quantisation behind a flag input)
   runs the calibration samples once per unit with only that unit in INT8; the cost of a
   unit is the U-Net output's SNR vs FP32 then (lower = more harmful).
2. Greedy: starting from everything in INT8, the most harmful units are kept in float
   one at a time, each step measured end to end (8-bit image PSNR vs the FP32 bundle,
   same prompts and seeds as the recorded quality), until the target is met; then kept
   units whose step did not help are tried back in INT8.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ldm_edge.bundletools.quality import Reference
from ldm_edge.bundletools.save import save_graph
from ldm_edge.runtime.backends.sessions import SessionFromOnnx
from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.bundle.schema import VariantRecord
from ldm_edge.runtime.pipeline import Pipeline

from . import qdq
from .ranges import scratch_path

# Tensors above this many bytes go to the external data file of a temporary graph.
INLINE_LIMIT = 1024


def save_referencing(proto, path: Path) -> None:
    """Write a temporary graph next to its source: unchanged weights stay in the source's
    external data, new tensors go to the graph's own data file."""
    import onnx
    from onnx.external_data_helper import set_external_data, uses_external_data

    path = Path(path)
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for t in proto.graph.initializer:
            if uses_external_data(t) or len(t.raw_data) <= INLINE_LIMIT:
                continue
            offset = f.tell()
            f.write(t.raw_data)
            set_external_data(t, data.name, offset, len(t.raw_data))
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(proto, str(path))


def unit_costs(proto, src_dir: Path, layers, ranges: dict, samples: list[dict], *,
               threads: int = 0, progress=lambda msg: None, weight_bits: int = 8) -> list[dict]:
    """Per unit: U-Net output SNR (dB) vs FP32 with only that unit in INT8, worst sample."""
    g, units = qdq.build(proto, layers, ranges, set(), switchable=True, base_dir=str(src_dir),
                         weight_bits=weight_bits)
    count = {u: sum(ly.unit == u for ly in layers) for u in units}
    with scratch_path(src_dir, "int8-sweep") as path:
        save_referencing(g, path)
        del g
        sess = SessionFromOnnx(path, threads=threads)()
        out_name = sess.get_outputs()[0].name
        snr = {u: math.inf for u in units}
        snr_all = math.inf
        for si, feeds in enumerate(samples):
            flags = np.zeros(len(units), bool)
            ref = sess.run([out_name], {**feeds, qdq.FLAGS_INPUT: flags})[0].astype(np.float64)
            power = float(np.sum(ref ** 2))

            def snr_of(f):
                out = sess.run([out_name], {**feeds, qdq.FLAGS_INPUT: f})[0]
                err = float(np.sum((out - ref) ** 2))
                return math.inf if err == 0 else 10 * math.log10(power / err)

            snr_all = min(snr_all, snr_of(np.ones(len(units), bool)))
            for i, u in enumerate(units):
                f = flags.copy()
                f[i] = True
                snr[u] = min(snr[u], snr_of(f))
            progress(f"sensitivity: sample {si + 1}/{len(samples)} done "
                     f"(timestep {float(np.ravel(feeds.get('timestep', [np.nan]))[0]):.0f})")
        del sess
    progress(f"sensitivity: U-Net output SNR with every unit INT8: {snr_all:.1f} dB")
    return [{"unit": u, "layers": count[u], "unet_snr_db_only_this_int8": snr[u]}
            for u in sorted(units, key=lambda u: snr[u])]


class EndToEnd:
    """8-bit image PSNR of candidate U-Net graphs vs the FP32 bundle, as
    ``bundletools.quality.end_to_end_psnr`` measures it: the worst over prompts and
    schedulers (FP32 references computed once)."""

    def __init__(self, bundle, prompts: list[str], steps: int, seed: int = 0,
                 schedulers: list[str] | None = None, size: tuple[int, int] | None = None):
        self.bundle = Path(bundle)
        self.reference = Reference(bundle, prompts, steps, seed, schedulers, unet_calls=False,
                                   size=size)

    def __call__(self, graph_proto) -> float:
        m = open_bundle(self.bundle, verify=False).schema  # a fresh copy, changed below
        name = f".unet.int8.candidate-{os.getpid()}.onnx"
        files = save_graph(graph_proto, self.bundle / name)
        try:
            m.components["unet"].variants["int8"] = VariantRecord(file=name)
            pipe = Pipeline(Manifest(self.bundle, m), precision="int8", ort_cache=False)
            value = self.reference.measure(pipe, cosines=False)["psnr_db"]
            pipe.close()
        finally:
            for f in files:
                f.unlink(missing_ok=True)
        return value


def greedy_keep(costs: list[dict], measure, min_psnr: float, start_psnr: float,
                progress=lambda msg: None) -> tuple[list[str], list[dict], float]:
    """Keep units in float, most harmful first, until ``measure(kept)`` >= ``min_psnr``;
    then try each kept unit whose own step did not raise the PSNR back in INT8, leaving
    it there if the target still holds (image PSNR over a sampling trajectory is not
    monotone in the U-Net's error: one step can lose dB by chance and the next regain
    them). Returns the kept units, every step (unit, PSNR after, gain, kept) and the
    PSNR of the final set."""
    kept, steps, current = [], [], start_psnr
    for c in costs:
        kept.append(c["unit"])
        value = measure(list(kept))
        steps.append({"unit": c["unit"], "layers": c["layers"],
                      "unet_snr_db_only_this_int8": c["unet_snr_db_only_this_int8"],
                      "psnr_db_after": value, "gain_db": value - current, "kept": True})
        progress(f"{c['unit']} ({c['layers']} layers) in float: end-to-end PSNR "
                 f"{current:.2f} -> {value:.2f} dB")
        current = value
        if current >= min_psnr:
            break
    if current < min_psnr:
        return kept, steps, current
    for step in reversed(steps[:-1]):
        if step["gain_db"] > 0:
            continue
        trial = [u for u in kept if u != step["unit"]]
        value = measure(trial)
        back = value >= min_psnr
        progress(f"{step['unit']} back in INT8: end-to-end PSNR {value:.2f} dB "
                 f"({'stays INT8' if back else 'misses the target, stays float'})")
        steps.append({"unit": step["unit"], "layers": step["layers"],
                      "unet_snr_db_only_this_int8": step["unet_snr_db_only_this_int8"],
                      "psnr_db_after": value, "gain_db": value - current, "kept": not back,
                      "pruning": True})
        if back:
            kept, current = trial, value
            step["kept"] = False
    return kept, steps, current
