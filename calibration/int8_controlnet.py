"""INT8 ControlNets: each ControlNet's graph in Q/DQ, calibrated on its own calls in the FP32
runs that calibrate the U-Net (every other run takes a ControlNet on a stand-in control image:
bundletools/task_inputs.py control_stand_in), checked on every residual against FP32.

One graph serves onnxruntime and TensorRT alike: biases float and activations symmetric (what
TensorRT's parser takes, calibration/trt_form.py), weights of the bits ``ldm-export int8``
was given (7 by default: onnxruntime's kernels cannot saturate on CPUs without VNNI). The
layers qdq.py keeps float by rule in a U-Net (time embedding, conv_in/conv_out, which in a
ControlNet include its conditioning embedding's first and last convs) stay float here too.
A ControlNet whose INT8 graph misses ``CONTROLNET_MIN_COSINE`` keeps no INT8 variant (its FP16
or FP32 graph runs under ``--precision int8``), which the progress line says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldm_edge.bundletools.files import file_record
from ldm_edge.bundletools.forms import FORM, default_size, make_form
from ldm_edge.bundletools.variant_txn import VariantTransaction
from ldm_edge.runtime.backends.sessions import SessionFromOnnx
from ldm_edge.runtime.bundle.schema import CalibrationRecord, VariantRecord
from ldm_edge.runtime.compare import compare

from . import qdq, trt_form
from .ranges import collect

# Every residual of the INT8 graph vs FP32's on the captured calls (the worst residual of the
# worst call). Measured on the tiny ControlNets: 0.9962-0.9980 over 2-8 prompts and the four
# default schedulers (0.9987 for all residuals joined on the quality check's own prompts);
# ranges calibrated on another scheduler's trajectory only gave 0.92-0.94 on the first
# residuals. 0.99 leaves ~3x headroom on 1 - cosine over the worst measured and catches that.
CONTROLNET_MIN_COSINE = 0.99
# calls calibrated on and calls checked on, each spread evenly over the captured ones
MAX_CALIB_CALLS = 32
# each calibration call also runs on each kind of stand-in control image (task_inputs
# stand_in_image: line art, a depth-like ramp), so the ranges see both whatever image its run
# took. A precaution for real ControlNets: on the tiny ones it changed no figure (the 0.94
# above came from the scheduler, fixed in calibration/capture.py by pairing the runs)
STAND_IN_KINDS = 2
MAX_CHECK_CALLS = 8


def _with_every_kind(calls: list[dict], cond: str) -> list[dict]:
    """Each call, and a copy of it with each kind of stand-in control image (a run takes one
    kind; real control images come in both: sparse lines and smooth ramps)."""
    from ldm_edge.bundletools.task_inputs import stand_in_image

    out = []
    for i, c in enumerate(calls):
        b, _, h, w = c[cond].shape
        out.append(c)
        for k in range(STAND_IN_KINDS):  # image STAND_IN_KINDS * i + k is of kind k
            px = stand_in_image(STAND_IN_KINDS * i + k, h, w).astype(np.float32) / 255.0
            out.append({**c, cond: np.repeat(px.transpose(2, 0, 1)[None], b, axis=0)})
    return out


def _evenly(calls: list, n: int) -> list:
    if len(calls) <= n:
        return list(calls)
    return [calls[i] for i in np.linspace(0, len(calls) - 1, n).round().astype(int)]


def quantize_controlnets(txn: VariantTransaction, cal, opts, progress) -> list[str]:
    """An INT8 variant (put in ``txn``) for each ControlNet the calibration runs called; the
    names of those written."""
    done = []
    for name, calls in sorted(cal.controlnets.items()):
        variant = quantize_controlnet(txn, cal, name, calls, opts, progress)
        if variant is not None:
            txn.put(name, "int8", variant)
            done.append(name)
    for name in cal.manifest.schema.controlnets:
        if f"controlnet/{name}" not in cal.controlnets:
            progress(f"controlnet/{name}: no INT8 graph (no calibration run used it: give more "
                     f"--num-prompts)")
    return done


def quantize_controlnet(txn: VariantTransaction, cal, name: str, calls: list[dict], opts,
                        progress) -> VariantRecord | None:
    """``NAME.int8.onnx`` beside the ControlNet's FP32 graph, or None (nothing left) when it
    misses CONTROLNET_MIN_COSINE."""
    comp = cal.manifest.component(name)
    fp32 = cal.manifest.variant(name, "fp32").path
    feeds = [{comp.graph_name(k): v for k, v in c.items()} for c in calls]
    calib = _with_every_kind(_evenly(feeds, MAX_CALIB_CALLS // (1 + STAND_IN_KINDS)),
                             comp.graph_name("controlnet_cond"))
    dest, files, layers, excluded = save_qdq_graph(txn, fp32, calib, opts)
    worst = _worst(dest, fp32, _evenly(feeds, MAX_CHECK_CALLS))
    progress(f"{name}: int8 {len(layers)} layers, every residual vs FP32: {worst}")
    if not worst:
        txn.discard(files)
        progress(f"{name}: no INT8 graph (under cosine {CONTROLNET_MIN_COSINE}); its float "
                 f"graph runs under --precision int8")
        return None
    variant = int8_record(txn.root, dest, files, layers, excluded, cal, opts, len(calib),
                          {**worst.to_json(), "reference": "onnxruntime fp32", "passed": True,
                           "samples": min(len(feeds), MAX_CHECK_CALLS),
                           "min_cosine": CONTROLNET_MIN_COSINE})
    root = txn.root
    if opts.fused_form:  # what ldm-run opens: the quality with control is measured on it
        form = make_form(root, comp.spec, variant, "int8", threads=opts.threads,
                         **default_size(txn.trial), reference=fp32, txn=txn)
        if form is not None:
            variant.forms[FORM] = form
    return variant


def save_qdq_graph(txn: VariantTransaction, fp32: Path, calib: list[dict], opts):
    """``NAME.int8.onnx`` beside ``fp32``, in ``txn``: every layer qdq.py quantises, ranges
    from ``calib`` (symmetric), float biases; (its path, its files, the layers, those kept
    float)."""
    import onnx

    from ldm_edge.bundletools.external_data import load_all

    proto = onnx.load(str(fp32), load_external_data=False)
    layers, excluded = qdq.analyse(proto.graph)
    tensors = list(dict.fromkeys([ly.act for ly in layers] + [ly.out for ly in layers if ly.out]))
    hists = collect(fp32, tensors, calib, threads=opts.threads)
    ranges = trt_form.symmetric({t: hists[t].range(opts.method) for t in tensors})
    graph, _ = qdq.build(proto, layers, ranges, {ly.unit for ly in layers}, base_dir=str(fp32.parent),
                         weight_bits=opts.weight_bits, int32_bias=False)
    load_all(graph, fp32.parent)
    dest = fp32.with_name(f"{fp32.stem}.int8.onnx")
    return dest, txn.save(graph, dest), layers, excluded


def int8_record(root: Path, dest: Path, files, layers, excluded, cal, opts, samples: int,
                parity: dict) -> VariantRecord:
    """The manifest's record of a graph ``save_qdq_graph`` wrote."""
    return VariantRecord(
        file=dest.relative_to(root).as_posix(), files=[file_record(p, root) for p in files],
        format="QDQ", weights=f"int8, per output channel, symmetric, {opts.weight_bits}-bit range",
        activations="int8, per tensor, symmetric (float biases: TensorRT reads it as it is)",
        method=opts.method, ops=list(qdq.QUANT_OPS),
        quantized_nodes=[ly.node for ly in layers], excluded_nodes=excluded,
        calibration=CalibrationRecord(prompts=cal.prompts, steps=opts.calib_steps,
                                      size=list(cal.hw), samples=samples,
                                      schedulers=list(cal.schedulers)),
        parity=parity)


def _worst(int8_path: Path, fp32_path: Path, samples: list[dict]):
    """The worst of every residual of every sample, INT8 vs FP32."""
    s8, s32 = SessionFromOnnx(int8_path)(), SessionFromOnnx(fp32_path)()
    results = []
    for i, feeds in enumerate(samples):
        for k, (out, ref) in enumerate(zip(s8.run(None, feeds), s32.run(None, feeds))):
            results.append(compare(out, ref, f"call {i} output {k}",
                                   min_cosine=CONTROLNET_MIN_COSINE))
    return min(results, key=lambda r: (bool(r), r.cosine))
