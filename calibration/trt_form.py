"""The INT8 U-Net's TensorRT form: the same layers and calibrated ranges as ``unet.int8.onnx``,
in the Q/DQ that TensorRT's ONNX parser reads.

onnxruntime and TensorRT want different INT8 graphs. onnxruntime fuses a Conv into its integer
kernels only with the bias as INT32 behind a DequantizeLinear (scale x_scale * w_scale);
TensorRT's parser refuses a DequantizeLinear on INT32 ("must have type FP8, FP4, Int4, Int8, or
UInt8") and fuses float biases itself. TensorRT quantises activations symmetrically only, and a
GPU has no 16-bit pair sums to saturate, so its form takes:

* biases float (the FP32 graph's own);
* activations int8 per tensor, symmetric: the calibrated range [lo, hi] widened to
  [-m, m], m = max(|lo|, |hi|);
* weights int8 per output channel, symmetric, the full 8-bit range.

The form is measured end to end against FP32 on the same prompts, seeds and schedulers as the
onnxruntime graph (``quality.int8``), in onnxruntime on the CPU with its graph optimisations off
(``tensorrt_like``): each DequantizeLinear runs, then the float layer — the rounding TensorRT
applies, with exact integer sums, not onnxruntime's CPU-kind dependent integer kernels (whose
16-bit pair sums saturate without VNNI; PITFALLS) — and recorded as
``variants.int8.forms["tensorrt"]`` with those figures. With ``--min-psnr`` it must meet it too,
or it is not written (``ldm-export engines --precision int8`` then says so).
"""

from __future__ import annotations

import copy
from pathlib import Path

from ldm_edge.bundletools.files import file_record
from ldm_edge.bundletools.variant_txn import VariantTransaction
from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.bundle.onnx_scan import int32_dequantize
from ldm_edge.runtime.bundle.schema import TENSORRT_FORM, FormRecord, VariantRecord
from ldm_edge.runtime.errors import ExportError

FORM_FILE = "unet.int8.tensorrt.onnx"
# Full-range weights: qdq.WEIGHT_BITS' 7-bit choice guards CPUs without VNNI (16-bit pair
# sums), which a GPU's int8 tensor cores do not have.
WEIGHT_BITS = 8
CHECK_REFERENCE = ("FP32 bundle, the prompts, seeds and schedulers of quality.int8; the form run "
                   "in onnxruntime on the CPU")


def symmetric(ranges: dict) -> dict:
    """Each tensor's range [lo, hi] widened to [-m, m] (zero point 0, TensorRT's only kind)."""
    return {t: (-max(abs(lo), abs(hi)), max(abs(lo), abs(hi))) for t, (lo, hi) in ranges.items()}


def record_form(txn: VariantTransaction, graph, measure, min_psnr: float | None,
                progress) -> FormRecord | None:
    """Write ``graph`` (the form) in the transaction, measure it with ``measure(manifest) ->
    quality dict`` through a trial manifest whose INT8 U-Net is the form, and describe it; None
    (its files deleted) when ``min_psnr`` is given and the form misses it."""
    root = txn.root
    written = txn.save(graph, root / FORM_FILE)
    int32 = int32_dequantize(root / FORM_FILE)
    if int32:  # the writer's own bug: never record a form TensorRT refuses
        raise ExportError(f"the TensorRT form still holds INT32 DequantizeLinear {int32[0]!r}")
    files = [file_record(p, root) for p in written]
    q = measure(_with_form(txn, files))
    by = ", ".join(f"{s} {v['psnr_db']:.2f} dB" for s, v in q["per_scheduler"].items())
    if min_psnr is not None and q["psnr_db"] < min_psnr:
        txn.discard(written)
        progress(f"TensorRT form: {by}, under --min-psnr {min_psnr}: not written (TensorRT "
                 f"INT8 engines need it; lower --min-psnr or build fp16 engines)")
        return None
    progress(f"TensorRT form ({FORM_FILE}: float biases, symmetric activations, 8-bit weights) "
             f"end to end vs FP32: {by}")
    check = {"reference": CHECK_REFERENCE, "psnr_db": q["psnr_db"],
             "worst_scheduler": q["worst_scheduler"],
             "per_scheduler_db": {s: v["psnr_db"] for s, v in q["per_scheduler"].items()},
             "activations": "int8, per tensor, symmetric",
             "weights": "int8, per output channel, symmetric", "bias": "float"}
    if "unet_cosine_min" in q:
        check["unet_cosine_min"] = q["unet_cosine_min"]
    return FormRecord(file=FORM_FILE, files=files, check=check)


def tensorrt_like(manifest, name: str, options, lora):
    """A Pipeline component provider: the U-Net in onnxruntime on the CPU without graph
    optimisations (see the module docstring), the other components as the bundle opens them."""
    from ldm_edge.runtime.backends.choose import interface
    from ldm_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from ldm_edge.runtime.pipeline import open_bundle_component

    if name != "unet":
        return open_bundle_component(manifest, name, options, lora)
    spec, io_map = interface(manifest.component(name))
    return OnnxRuntimeBackend(spec, manifest.variant(name, options["precision"]).path,
                              device="cpu", threads=options.get("threads", 0), io_map=io_map,
                              precision=options["precision"], optimise=False, lora=lora)


def _with_form(txn: VariantTransaction, files: list) -> Manifest:
    """The trial manifest with the form standing as the U-Net's INT8 variant."""
    schema = copy.deepcopy(txn.trial)
    schema.components["unet"].variants["int8"] = VariantRecord(file=FORM_FILE, files=files)
    return Manifest(Path(txn.root), schema)
