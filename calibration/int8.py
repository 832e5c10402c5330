"""INT8 U-Net: timestep-aware static Q/DQ calibration, and a quality budget.

The bundle's own FP32 sampling loop is run over the calibration prompts, each with the next
of the schedulers the quality is checked for, and every U-Net call's inputs are captured
(``capture``), so the calibration set spans each scheduler's whole trajectory, from pure noise at t~1000 to the nearly clean latents of the last steps;
samples are taken evenly across timesteps. Activation ranges come from histograms of
those runs (percentile, entropy or min-max, ``ranges.py``), and ``unet.int8.onnx`` gets
explicit QuantizeLinear/DequantizeLinear around Conv and weight MatMul/Gemm layers
(``qdq.py``), with the layers known to be sensitive left in float.

With ``min_psnr`` the most harmful layers (by a per-unit sweep) are kept in float too,
greedily, until the end-to-end image PSNR vs FP32 meets it (``sensitivity.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ldm_edge.bundletools.files import file_record
from ldm_edge.bundletools.forms import FORM, default_size, make_form
from ldm_edge.bundletools.quality import (Reference, control_quality, measure_precision,
                                          schedulers_to_check)
from ldm_edge.bundletools.variant_txn import VariantTransaction
from ldm_edge.runtime import validate
from ldm_edge.runtime.bundle.control_spec import is_controlnet
from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.bundle.schema import (TENSORRT_FORM, BundleManifest, CalibrationRecord,
                                            Int8QualityRecord, VariantRecord)
from ldm_edge.runtime.cpu import cpu_summary
from ldm_edge.runtime.errors import ExportError, UsageError
from ldm_edge.runtime.request import BundleDefaults

from . import qdq, trt_form
from .int8_controlnet import quantize_controlnets
from .int8_tiny_vae import TINY_DECODER, decoder_calls, quantize_tiny_vae
from .ranges import METHODS, collect

# U-Net calls used for the ranges, spread evenly over the captured (prompt, step) pairs
# sorted by step: every timestep region is represented. Each is one FP32 run per
# calibration pass; 32 keep SD1.5 at 512^2 to minutes on a CPU while each tensor's
# histogram still sees tens of millions of values.
MAX_CALIB_SAMPLES = 32
# U-Net calls per unit in the sensitivity sweep (first, last and evenly between).
SENSITIVITY_SAMPLES = 4
# Fixed prompts and seeds for the recorded quality and the min-psnr budget; not among
# the first default calibration prompts, so the score is not measured on training data.
EVAL_PROMPTS = ["yellow circle, bottom left, white background",
                "a cat sleeping on a windowsill in the sun"]
EVAL_SEED = 0
VARIANT_FILE = "unet.int8.onnx"


def evenly_over_timesteps(runs: list[list[dict]], n: int) -> list[dict]:
    """Up to ``n`` of the captured U-Net calls (``runs``: one list per sampled image, in call
    order), spread evenly over the trajectory, alternating runs at each point. Runs may be of
    different lengths (schedulers differ in calls per step), so calls are ordered by how far
    along their run they are."""
    calls = [(i / len(run), r, call) for r, run in enumerate(runs) for i, call in enumerate(run)]
    if len(calls) <= n:
        return [c for _, _, c in calls]
    calls.sort(key=lambda c: c[:2])
    pick = sorted(set(np.linspace(0, len(calls) - 1, n).round().astype(int).tolist()))
    return [calls[i][2] for i in pick]


def check_schedulers(names: list[str]) -> list[str]:
    """``names`` once each, or a UsageError naming the unknown one and the choices."""
    from ldm_edge.runtime.schedulers import scheduler_names

    for n in names:
        if n not in scheduler_names():
            raise UsageError(f"unknown scheduler {n!r} in --schedulers; use any of "
                              f"{', '.join(scheduler_names())}")
    return list(dict.fromkeys(names))


def _materialize(proto, base_dir: Path) -> None:
    """Load the external data of the initializers still in ``proto`` (float ones left)."""
    from ldm_edge.bundletools.external_data import load_all

    load_all(proto, base_dir)  # onnx's own loader refuses hard-linked data files


def build_graph(proto, fp32_dir: Path, layers, ranges, quantize: set[str], weight_bits: int = 8,
                int32_bias: bool = True):
    g, _ = qdq.build(proto, layers, ranges, quantize, base_dir=str(fp32_dir),
                     weight_bits=weight_bits, int32_bias=int32_bias)
    _materialize(g, fp32_dir)
    return g


def keep_for_budget(bundle: Path, proto, fp32_dir: Path, layers, ranges, samples: list[dict],
                    min_psnr: float, steps: int, threads: int, progress,
                    schedulers: list[str] | None = None, weight_bits: int = 8,
                    size: tuple[int, int] | None = None) -> tuple[list[str], dict]:
    """Units to keep in float so that the end-to-end PSNR reaches ``min_psnr``, and the
    record of how they were chosen; ExportError when no INT8 variant can reach it."""
    from .sensitivity import EndToEnd, greedy_keep, unit_costs

    units = sorted({ly.unit for ly in layers})
    e2e = EndToEnd(bundle, EVAL_PROMPTS, steps, EVAL_SEED, schedulers, size=size)

    def measure(keep):
        return e2e(build_graph(proto, fp32_dir, layers, ranges, set(units) - set(keep),
                               weight_bits))

    plain = measure([])
    progress(f"all {len(units)} units INT8: end-to-end PSNR {plain:.2f} dB (target {min_psnr:.2f} dB)")
    record = {"target_db": min_psnr, "plain_int8_psnr_db": plain, "sensitivity": None, "greedy": []}
    if plain >= min_psnr:
        return [], record
    sweep = unit_costs(proto, fp32_dir, layers, ranges, samples, threads=threads,
                       progress=progress, weight_bits=weight_bits)
    kept, steps_taken, final = greedy_keep(sweep, measure, min_psnr, plain, progress)
    record.update(sensitivity=sweep, greedy=steps_taken)
    if final >= min_psnr and set(kept) != set(units):
        return kept, record
    every = final if set(kept) == set(units) else measure(units)  # the FP32 U-Net, no Q/DQ
    progress(f"every unit in float: end-to-end PSNR {every:.2f} dB")
    if every < min_psnr:
        raise ExportError(f"--min-psnr {min_psnr} dB is out of reach: even with every layer in "
                          f"float the images give {every:.2f} dB; nothing was written")
    raise ExportError(f"--min-psnr {min_psnr} dB is met only with every layer in float "
                      f"({every:.2f} dB; best with INT8 layers {final:.2f} dB): no INT8 variant "
                      f"written; lower --min-psnr")


@dataclass(frozen=True)
class Int8Options:
    """How ``make_int8`` calibrates, checks and records (its keywords, checked once here)."""

    prompts: list[str] | None = None
    num_prompts: int = 8
    calib_steps: int = 10
    method: str = "percentile"
    min_psnr: float | None = None
    threads: int = 0
    symmetric: bool = False
    schedulers: list[str] | None = None
    weight_bits: int = 7
    size: int | None = None
    fused_form: bool = True
    tensorrt_form: bool = True

    def __post_init__(self):
        if self.weight_bits not in qdq.WEIGHT_BITS:
            raise UsageError(f"--weight-bits {self.weight_bits}: use 7 or 8")
        if self.method not in METHODS:
            raise ExportError(f"unknown calibration method {self.method!r}; use one of "
                              f"{', '.join(METHODS)}")


@dataclass
class Calibration:
    """The FP32 sampling runs INT8 is calibrated on, and what they were run with."""

    manifest: Manifest
    fp32: Path  # the FP32 U-Net graph
    schedulers: list[str]
    prompts: list[str]  # as recorded (bundletools/task_inputs.py labels)
    hw: tuple[int, int]
    runs: list[list[dict]]  # per sampled image, its U-Net calls' inputs (graph names)
    calib: list[dict]  # the calls the ranges come from
    timesteps: list[float]
    # ControlNet component -> its calls' inputs in those runs (int8_controlnet.py)
    controlnets: dict[str, list[dict]] = field(default_factory=dict)
    # the tiny VAE decoder's inputs for those runs' decodes (int8_tiny_vae.py); [] without one
    decodes: list[dict] = field(default_factory=list)


@dataclass
class Quantisation:
    """The FP32 U-Net's graph, its quantisable layers, their ranges and the units kept float."""

    proto: object
    layers: list
    excluded: dict
    ranges: dict
    kept: list[str]
    budget: dict | None = None  # how ``kept`` was chosen, with min_psnr

    @property
    def units(self) -> list[str]:
        return sorted({ly.unit for ly in self.layers})


def make_int8(bundle, prompts: list[str] | None = None, num_prompts: int = 8,
              calib_steps: int = 10, method: str = "percentile", min_psnr: float | None = None,
              progress=print, threads: int = 0, symmetric: bool = False,
              schedulers: list[str] | None = None, weight_bits: int = 7,
              size: int | None = None, fused_form: bool = True,
              tensorrt_form: bool = True) -> BundleManifest:
    """Add ``unet.int8.onnx`` to ``bundle``; record it and its end-to-end quality under
    each of ``schedulers`` (default: the model's own, ddim, euler, dpm++2m), the worst of
    which ``min_psnr`` holds. ``symmetric``: activation ranges made symmetric
    (zero points 0), as TensorRT requires. ``weight_bits`` 7 (default): weights within
    -63..63, so onnxruntime's kernels on CPUs without VNNI cannot saturate (qdq.WEIGHT_BITS);
    8: the full range, for CPUs with VNNI and GPUs only. ``size``: the square image side
    calibration and the check run at (default: the model's own size), recorded.
    ``fused_form``: add onnxruntime's fused-attention form of the new graph (checked against
    it) before the quality check, so the recorded figures are those of what ldm-run runs.
    ``tensorrt_form``: add the graph TensorRT builds INT8 engines from (trt_form.py), measured
    against FP32 the same way."""
    opts = Int8Options(prompts=prompts, num_prompts=num_prompts, calib_steps=calib_steps,
                       method=method, min_psnr=min_psnr, threads=threads, symmetric=symmetric,
                       schedulers=schedulers, weight_bits=weight_bits, size=size,
                       fused_form=fused_form, tensorrt_form=tensorrt_form)
    return add_int8(bundle, opts, progress)


def add_int8(bundle, opts: Int8Options, progress=print) -> BundleManifest:
    """``make_int8`` with its options in one object: calibrate, quantise, then write,
    measure and record the variant as one transaction (bundletools/variant_txn.py)."""
    bundle = Path(bundle)
    t0 = time.perf_counter()
    cal = capture_calibration(bundle, opts, progress)
    quant = layers_and_ranges(cal, opts, progress)
    if opts.min_psnr is not None:
        sens = evenly_over_timesteps(cal.runs, SENSITIVITY_SAMPLES)
        quant.kept, quant.budget = keep_for_budget(
            bundle, quant.proto, cal.fp32.parent, quant.layers, quant.ranges, sens,
            opts.min_psnr, opts.calib_steps, opts.threads, progress, cal.schedulers,
            opts.weight_bits, cal.hw if opts.size else None)
    with VariantTransaction(bundle) as txn:
        # its files are about to be replaced: forget them first, so that a failure from
        # here on leaves a bundle without INT8 rather than one whose hashes do not match
        txn.forget("int8", ["unet", *cal.controlnets, *([TINY_DECODER] if cal.decodes else [])])
        variant = write_variant(txn, cal, quant, opts)
        quantize_controlnets(txn, cal, opts, progress)  # a bundle with ControlNets
        if opts.fused_form:
            add_form(txn, variant, cal, opts, progress)
        # Measure through a manifest that names the new graph, then commit both at once.
        txn.put("unet", "int8", variant)
        reference = Reference(txn.manifest(), EVAL_PROMPTS, steps=opts.calib_steps,
                              seed=EVAL_SEED, schedulers=cal.schedulers,
                              size=cal.hw if opts.size else None)
        q = measure_within_budget(txn, variant, reference, opts, progress, t0)
        q["control"] = _with_control(txn, cal, opts, progress)
        if opts.tensorrt_form:
            add_tensorrt_form(txn, variant, cal, quant, reference, opts, progress)
        # after the U-Net's figures, which a bundle whose only VAE is TAESD decodes for with
        # its FP32 graph: they are the U-Net's alone
        quantize_tiny_vae(txn, cal, opts, progress)
        # onnxruntime's INT8 kernels, and so this figure, differ by CPU kind (runtime/cpu.py)
        q.update(method=opts.method, min_psnr=opts.min_psnr, kept_float_units=quant.kept,
                 cpu=cpu_summary())
        return txn.commit(quality={"int8": Int8QualityRecord.from_json(q, "quality.int8")})


def _with_control(txn: VariantTransaction, cal: Calibration, opts: Int8Options,
                  progress) -> dict | None:
    """The INT8 pictures with a ControlNet active vs FP32's (the U-Net was calibrated on runs
    with and without one: calibration/capture.py), for a bundle with ControlNets."""
    qc = control_quality(txn.manifest(), "int8", EVAL_PROMPTS, steps=opts.calib_steps,
                         seed=EVAL_SEED, size=cal.hw if opts.size else None)
    if qc is not None:
        progress(f"with a ControlNet active: end to end vs FP32 {qc['psnr_db']:.2f} dB, U-Net "
                 f"output cosine ≥ {qc['unet_cosine_min']:.4f}")
    return qc


def capture_calibration(bundle: Path, opts: Int8Options, progress) -> Calibration:
    """Run the bundle's FP32 loop over the calibration prompts, each prompt with the next of
    the schedulers checked, capturing every U-Net call; pick the calls calibrated on."""
    from ldm_edge.bundletools.task_inputs import labels
    from ldm_edge.runtime.tasks import takes_prompt

    from .capture import capture_runs, default_prompts

    manifest = open_bundle(bundle)
    schedulers = (check_schedulers(opts.schedulers) if opts.schedulers
                  else schedulers_to_check(manifest))
    fp32 = manifest.variant("unet", "fp32").path
    unet = manifest.component("unet")
    # a model that takes no prompt samples without (bundletools/task_inputs.py says with what)
    prompts = labels(manifest.schema, list(opts.prompts or default_prompts(opts.num_prompts)))
    hw = image_size(manifest, opts.size)
    progress(f"capturing U-Net inputs: FP32 sampling of {len(prompts)} prompts x "
             f"{opts.calib_steps} steps at {hw[0]}x{hw[1]}, schedulers {', '.join(schedulers)} "
             f"in turn" + (f" (the model takes no prompt: {prompts[0]}, ...)"
                           if not takes_prompt(manifest.schema.task) else ""))
    # each prompt samples with the next of the schedulers checked below, so the ranges see the
    # latents each of their trajectories visits (not the model's own scheduler's alone)
    captured = capture_runs(bundle, prompts, steps=opts.calib_steps, threads=opts.threads,
                            height=hw[0], width=hw[1], schedulers=schedulers)
    runs = [[{unet.graph_name(k): v for k, v in call.items()} for call in run["unet"]]
            for run in captured]
    nets = {n: [c for run in captured for c in run.get(n, [])]
            for n in sorted({k for run in captured for k in run if is_controlnet(k)})}
    calib = evenly_over_timesteps(runs, MAX_CALIB_SAMPLES)
    t_name = unet.graph_name("timestep")
    timesteps = sorted({float(np.ravel(r[t_name])[0]) for r in calib}, reverse=True)
    progress(f"{sum(map(len, runs))} U-Net calls captured; calibrating on {len(calib)} of "
             f"them (timesteps {timesteps[0]:.0f}..{timesteps[-1]:.0f})")
    return Calibration(manifest, fp32, schedulers, prompts, hw, runs, calib, timesteps, nets,
                       decoder_calls(manifest, captured))


def image_size(manifest: Manifest, size: int | None) -> tuple[int, int]:
    """(height, width) calibration and the check run at: ``size`` square (checked against the
    model's limits), else the model's default size."""
    d = BundleDefaults.from_manifest(manifest.schema)
    if size is not None:
        validate.size("size", size, d.size_multiple, d.min_size, d.max_size)
    return (size, size) if size else (d.height, d.width)


def layers_and_ranges(cal: Calibration, opts: Int8Options, progress) -> Quantisation:
    """The U-Net's quantisable layers and each one's activation (and Conv output) range from
    histograms over the calibration calls."""
    import onnx

    proto = onnx.load(str(cal.fp32), load_external_data=False)
    layers, excluded = qdq.analyse(proto.graph)
    if not layers:
        raise ExportError("the U-Net has no Conv/MatMul/Gemm layer INT8 may quantise")
    tensors = list(dict.fromkeys([ly.act for ly in layers] + [ly.out for ly in layers if ly.out]))
    hists = collect(cal.fp32, tensors, cal.calib, threads=opts.threads, progress=progress)
    ranges = {t: hists[t].range(opts.method) for t in tensors}
    if opts.symmetric:
        ranges = {t: (-max(abs(lo), abs(hi)), max(abs(lo), abs(hi)))
                  for t, (lo, hi) in ranges.items()}
    del hists
    quant = Quantisation(proto, layers, excluded, ranges, kept=[])
    progress(f"{len(layers)} layers in {len(quant.units)} units to INT8 ({opts.method} ranges); "
             f"{sum(map(len, excluded.values()))} nodes kept float by rule")
    return quant


def write_variant(txn: VariantTransaction, cal: Calibration, quant: Quantisation,
                  opts: Int8Options) -> VariantRecord:
    """Save the Q/DQ graph (the units not kept float in INT8) and describe it."""
    graph = build_graph(quant.proto, cal.fp32.parent, quant.layers, quant.ranges,
                        set(quant.units) - set(quant.kept), opts.weight_bits)
    files = txn.save(graph, txn.root / VARIANT_FILE)
    kept = quant.kept
    quantized = [ly.node for ly in quant.layers if ly.unit not in kept]
    kept_nodes = [ly.node for ly in quant.layers if ly.unit in kept]
    return VariantRecord(
        file=VARIANT_FILE, files=[file_record(p, txn.root) for p in files],
        format="QDQ", weights="int8, per output channel, symmetric"
        + ("" if opts.weight_bits == 8 else f", {opts.weight_bits}-bit range"),
        activations=f"int8, per tensor, {'symmetric' if opts.symmetric else 'asymmetric'}",
        method=opts.method,
        ops=list(qdq.QUANT_OPS), quantized_nodes=quantized,
        excluded_nodes={**quant.excluded,
                        **({"kept by min_psnr": kept_nodes} if kept_nodes else {})},
        kept_float_units=kept,
        calibration=CalibrationRecord(
            prompts=cal.prompts, steps=opts.calib_steps, size=list(cal.hw),
            samples=len(cal.calib), schedulers=list(cal.schedulers), timesteps=cal.timesteps),
        min_psnr=quant.budget)


def add_form(txn: VariantTransaction, variant: VariantRecord, cal: Calibration,
             opts: Int8Options, progress) -> None:
    """onnxruntime's fused-attention form of the new graph, checked against it; the backend
    opens it, so the quality is measured on what ldm-run runs."""
    form = make_form(txn.root, cal.manifest.component("unet").spec, variant, "int8",
                     threads=opts.threads, **default_size(txn.trial), reference=cal.fp32,
                     txn=txn)
    if form is not None:
        variant.forms[FORM] = form
    progress(f"fused-attention form: {form.file if form else 'none (see the log)'}")


def add_tensorrt_form(txn: VariantTransaction, variant: VariantRecord, cal: Calibration,
                      quant: Quantisation, reference: Reference, opts: Int8Options,
                      progress) -> None:
    """TensorRT's form of the new graph (trt_form.py): the same layers kept float and the same
    calibrated ranges, measured against ``reference`` like the graph itself."""
    graph = build_graph(quant.proto, cal.fp32.parent, quant.layers, trt_form.symmetric(quant.ranges),
                        set(quant.units) - set(quant.kept), trt_form.WEIGHT_BITS, int32_bias=False)
    form = trt_form.record_form(
        txn, graph, lambda m: measure_precision(reference, m, "int8", trt_form.tensorrt_like),
        opts.min_psnr, progress)
    if form is not None:
        variant.forms[TENSORRT_FORM] = form


def measure_within_budget(txn: VariantTransaction, variant: VariantRecord,
                          reference: Reference, opts: Int8Options, progress, t0: float) -> dict:
    """The end-to-end quality of the trial manifest's INT8 U-Net (its form, if any); without
    the form if only it misses ``min_psnr``; ExportError if the plain graph misses it too."""
    min_psnr = opts.min_psnr

    def measure():
        q = measure_precision(reference, txn.manifest(), "int8")
        by = ", ".join(f"{s} {v['psnr_db']:.2f} dB (cosine ≥ {v['unet_cosine_min']:.4f})"
                       for s, v in q["per_scheduler"].items())
        progress(f"end to end vs FP32{' (fused form)' if variant.forms else ''}: {by}; U-Net "
                 f"output cosine per step on the FP32 trajectory in brackets "
                 f"({time.perf_counter() - t0:.0f} s in all)")
        return q

    q = measure()
    if min_psnr is not None and q["psnr_db"] < min_psnr and variant.forms:
        # the sweep chose the float layers on the plain graph; the form's rounding moved
        # the figure under the budget: keep the plain graph, which the sweep measured
        progress(f"the fused form gives {q['psnr_db']:.2f} dB, under --min-psnr {min_psnr}: "
                 f"recording the plain INT8 graph only")
        # the forms' own files (the weights they read are the plain graph's)
        txn.discard([txn.root / f.path for form in variant.forms.values() for f in form.files
                     if f not in variant.files])
        variant.forms.clear()
        q = measure()
    if min_psnr is not None and q["psnr_db"] < min_psnr:  # the sweep measured the same
        raise ExportError(f"INT8 re-measured at {q['psnr_db']:.2f} dB, under --min-psnr "
                          f"{min_psnr}; nothing was recorded")
    return q
