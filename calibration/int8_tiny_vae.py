"""An INT8 tiny VAE (TAESD) decoder: its graph in Q/DQ, calibrated on the latents the FP32
runs that calibrate the U-Net end with (each decoded once: with the full VAE in a bundle
that has both, those latents rescaled to the tiny VAE's scaling), every other one, and checked
against FP32 on the others, at the calibration size; written only where it holds.

The same graph form as the INT8 ControlNets (int8_controlnet.py: symmetric activations,
float biases). 32 of TAESD's 35 convolutions become integer kernels; the 3 kept float feed
several consumers. The full VAE's decoder gets no INT8 graph: it misses the bar
(docs/precision.md#an-int8-vae-decoder).
"""

from __future__ import annotations

import numpy as np

from ldm_edge.bundletools.variant_txn import VariantTransaction
from ldm_edge.runtime.backends.sessions import SessionFromOnnx
from ldm_edge.runtime.bundle.schema import VariantRecord
from ldm_edge.runtime.compare import psnr

from .fp16 import decoder_inputs_for
from .int8_controlnet import int8_record, save_qdq_graph

TINY_DECODER = "vae_decoder_tiny"
# The worst decode's PSNR, INT8 vs FP32, on the decoder's raw output over the FP32 output's
# range (for a trained TAESD that is the picture's PSNR: 38-42 dB on the demo TAESD's). 35 dB
# is what a VAE INT8 form is asked to keep. The raw output, not the 8-bit picture, because a
# random-weight TAESD's output lies far outside [-1, 1] (clipped, its picture is 0 or 255 and
# any sign change costs a whole level).
MIN_PSNR_DB = 35.0
MAX_CALIB_DECODES = 16  # and as many checked on


def decoder_calls(manifest, captured: list[dict]) -> list[dict]:
    """The tiny decoder's inputs (graph names) for every decode of the captured runs, or []
    where the bundle has no tiny decoder."""
    if not manifest.has(TINY_DECODER):
        return []
    ran = "vae_decoder" if any("vae_decoder" in run for run in captured) else TINY_DECODER
    calls = [c for run in captured for c in run.get(ran, [])]
    if ran != TINY_DECODER:
        calls = decoder_inputs_for(manifest, calls, ran, TINY_DECODER)
    comp = manifest.component(TINY_DECODER)
    return [{comp.graph_name(k): v for k, v in c.items()} for c in calls]


def raw_psnr(out: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of a decoder's raw output over the reference output's range."""
    return psnr(out, ref, peak=float(np.ptp(ref)))


def quantize_tiny_vae(txn: VariantTransaction, cal, opts, progress) -> VariantRecord | None:
    """``vae_decoder_tiny.int8.onnx`` put in ``txn``, or None (nothing left) without a tiny
    decoder, without decodes, or when the worst decode misses MIN_PSNR_DB."""
    calls = cal.decodes[:2 * MAX_CALIB_DECODES]
    if not calls:
        return None
    # calibrated on every other decode, checked on the rest (one decode: on it alone)
    calib, check = (calls[0::2], calls[1::2]) if len(calls) > 1 else (calls, calls)
    fp32 = cal.manifest.variant(TINY_DECODER, "fp32").path
    dest, files, layers, excluded = save_qdq_graph(txn, fp32, calib, opts)
    s8, s32 = SessionFromOnnx(dest)(), SessionFromOnnx(fp32)()
    worst = min(raw_psnr(s8.run(None, f)[0], s32.run(None, f)[0]) for f in check)
    progress(f"{TINY_DECODER}: int8 {len(layers)} layers, worst of {len(check)} decodes not "
             f"calibrated on vs FP32 {worst:.2f} dB (raw output; at least {MIN_PSNR_DB:.0f} kept)")
    if worst < MIN_PSNR_DB:
        txn.discard(files)
        progress(f"{TINY_DECODER}: no INT8 graph (under {MIN_PSNR_DB:.0f} dB); its float graph "
                 f"runs under --precision int8")
        return None
    variant = int8_record(txn.root, dest, files, layers, excluded, cal, opts, len(calib),
                          {"psnr_db": round(worst, 2), "reference": "onnxruntime fp32",
                           "passed": True, "samples": len(check), "min_psnr_db": MIN_PSNR_DB,
                           "held_out": len(calls) > 1})
    txn.put(TINY_DECODER, "int8", variant)
    return variant
