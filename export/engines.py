"""``ldm-export engines``: TensorRT engines for a bundle, built on the GPU that will run them.

A thin layer on Polygraphy's loaders, written against what TensorRT 10.3 (JetPack 6.1) and
11.x both have. Networks are strongly typed: the precision is the ONNX graph's (FP32, FP16
with FP32 islands, INT8 as Q/DQ), so there are no precision builder flags and no implicit
INT8 calibrator — TensorRT 11 has neither. Per component:

    NetworkFromOnnxPath(onnx, strongly_typed=True)
      -> CreateConfig(profiles=[one profile from the manifest's shape ranges], workspace, ...)
      -> EngineBytesFromNetwork -> SaveBytes(engines/<gpu>-sm<cc>-trt<ver>/<comp>.<prec>.<hash>.plan)

then the engine is recorded in the manifest (device, compute capability, TensorRT version,
profile, the ONNX file's sha256, file, size, sha256). No torch here: engines are usually
built on the device itself (a Jetson), which has TensorRT and no PyTorch.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ldm_edge.runtime.backends.trt_engines import (ENGINE_BACKEND, device_facts, engine_path,
                                                   import_tensorrt)
from ldm_edge.runtime.backends.trt_refit import REFIT_KIND, mark_refittable, refit_individual
from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.bundle.control_spec import is_controlnet, level_of
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.bundle.schema import (MANIFEST_NAME, BundleManifest, ComponentRecord,
                                            EngineRecord, edit_manifest)
from ldm_edge.runtime.bundle.spec import ComponentSpec
from ldm_edge.runtime.errors import LdmEdgeError, UsageError
from ldm_edge.runtime.fsutil import sha256_file
from ldm_edge.runtime.tasks import takes_prompt

# Components that see the negative and the positive prompt in one call under classifier-free
# guidance, so their batch is twice the number of images (and each ControlNet, `controlnet/*`,
# which runs on the U-Net's batch; in guess mode on its half, inside the profile's minimum).
GUIDED = ("text_encoder", "text_encoder_2", "unet")
SIZE_DIMS = {"latent_height": "height", "latent_width": "width",
             "height": "height", "width": "width"}


class EngineBuildError(LdmEdgeError):
    """TensorRT could not build an engine."""


@dataclass(frozen=True)
class ProfileOptions:
    """The shapes an engine accepts; None takes the bundle's exported range (or its defaults)."""

    static: bool = False
    min_size: int | None = None  # pixels, image side
    opt_size: int | None = None
    max_size: int | None = None
    max_batch: int | None = None  # images per call (doubled for the guided components)


# -- shape profiles (pure) --------------------------------------------------------------------
def shape_profile(manifest: BundleManifest, component: str, opts: ProfileOptions) -> dict:
    """One optimisation profile: graph input name -> {"min", "opt", "max"} shapes."""
    if opts.static and (opts.min_size or opts.max_size):
        raise UsageError("--static builds one shape: give --opt-size and --max-batch, "
                         "not --min-size/--max-size")
    rec = manifest.components[component]
    spec = rec.spec
    dims = {d: _dim_range(d, spec, manifest, component, opts)
            for t in spec.inputs for d in t.shape if isinstance(d, str)}
    profile = {}
    for t in spec.inputs:
        if not any(isinstance(d, str) for d in t.shape):
            continue  # fixed shape: nothing to profile
        shapes = [[dims[d][k] if isinstance(d, str) else int(d) for d in t.shape]
                  for k in range(3)]
        profile[rec.graph_name(t.name)] = dict(zip(("min", "opt", "max"), shapes))
    return profile


def _dim_range(dim: str, spec: ComponentSpec, manifest: BundleManifest, component: str,
               opts: ProfileOptions) -> tuple[int, int, int]:
    level = level_of(dim)
    if level is not None:  # a ControlNet residual's rows (columns): ceil(latent / 2^k)
        base, k = level
        return tuple(math.ceil(v / k) for v in _dim_range(base, spec, manifest, component, opts))
    lo, hi = spec.ranges.get(dim, (1, None))
    if dim == "batch":
        # a model that takes no prompt is never guided (runtime/tasks/)
        guided = component in GUIDED or is_controlnet(component)
        per = 2 if guided and takes_prompt(manifest.task) else 1
        images = opts.max_batch
        mn, opt, mx = 1, per, per * images if images else hi
        if opts.static:
            mn = opt = mx = per * (images or 1)
        return _within(dim, (mn, opt, mx), lo, hi, "re-export with a larger --max-batch")
    if dim not in SIZE_DIMS:  # a symbolic dim ldm-edge does not size (imported graphs)
        if hi is None:
            raise UsageError(f"{component}: no range recorded for dimension {dim!r}; re-export")
        return (lo, lo, hi)
    scale = manifest.vae_scale_factor if dim.startswith("latent") else 1
    mult = manifest.multiple
    default_opt = int(getattr(manifest.defaults, SIZE_DIMS[dim]))
    px = [opts.min_size or lo * scale, opts.opt_size or default_opt, opts.max_size or hi * scale]
    if opts.static:
        px = [px[1]] * 3
    elif not opts.opt_size:
        px[1] = min(max(px[1], px[0]), px[2])  # the model's default size, kept inside the range
    for label, v in zip(("--min-size", "--opt-size", "--max-size"), px):
        if v <= 0 or v % mult:
            raise UsageError(f"{label} {v} must be a positive multiple of {mult} pixels")
    return _within(dim, tuple(v // scale for v in px), lo, hi,
                   "re-export with `ldm-export onnx --min-size/--max-size`", scale)


def _within(dim, rng, lo, hi, fix, scale=1):
    mn, opt, mx = rng
    if not mn <= opt <= mx:
        raise UsageError(f"{dim}: min {mn * scale} <= opt {opt * scale} <= max {mx * scale} "
                         f"does not hold; fix the sizes")
    if mn < lo or (hi is not None and mx > hi):
        raise UsageError(f"{dim} {mn * scale}..{mx * scale} lies outside the range the ONNX "
                         f"graphs were exported for ({lo * scale}..{hi * scale}); {fix}")
    return rng


# -- building -----------------------------------------------------------------------------------
def import_polygraphy():
    """Polygraphy's TensorRT loaders, from the one TensorRT environment (``trt_engines``)."""
    from ldm_edge.runtime.backends.trt_engines import import_polygraphy as from_environment

    return from_environment()


@dataclass(frozen=True)
class Source:
    """The graph an engine is built from (Manifest.tensorrt_source) and its sha256."""

    path: Path
    sha256: str | None


def plan_builds(manifest: Manifest, precision: str, opts: ProfileOptions,
                components: tuple[str, ...] | None = None) -> list[tuple]:
    """(component, precision, source, profile) for each engine to build; checks everything
    that can be checked before TensorRT is touched."""
    from ldm_edge.runtime.backends.choose import pick_precision

    names = components or tuple(manifest.component_names)
    unknown = [n for n in names if not manifest.has(n)]
    if unknown:
        raise UsageError(f"this bundle has no {', '.join(unknown)}; it has "
                         f"{', '.join(manifest.component_names)}")
    if "unet" in names:
        manifest.variant("unet", precision)  # the U-Net must have it (says how to make it)
    plans = []
    for name in names:
        prec = pick_precision(manifest, name, precision)
        source = Source(*manifest.tensorrt_source(name, prec))
        check_for_tensorrt(name, prec, source.path)
        plans.append((name, prec, source, shape_profile(manifest.schema, name, opts)))
    return plans


def tensorrt_graph(manifest: Manifest, component: str, precision: str) -> Path:
    """The graph ``ldm-export engines`` hands TensorRT for ``component`` at ``precision``
    (the INT8 U-Net's TensorRT form), checked as it checks it."""
    path = manifest.tensorrt_source(component, precision)[0]
    check_for_tensorrt(component, precision, path)
    return path


def check_for_tensorrt(name: str, prec: str, path: Path) -> None:
    """Refuse, in one line, a graph TensorRT's parser would refuse or misread: INT32
    DequantizeLinear (onnxruntime's int32 biases) and non-zero zero points."""
    from ldm_edge.runtime.bundle.onnx_scan import int32_dequantize

    remake = "rerun `ldm-export int8 BUNDLE` (it writes the TensorRT form), or build fp16 engines"
    int32 = int32_dequantize(path)
    if int32:
        raise UsageError(f"{name} ({prec}): {path.name} has {len(int32)} DequantizeLinear node(s) "
                         f"on INT32 (e.g. {int32[0]!r}), which TensorRT's parser refuses; {remake}")
    if prec == "int8" and asymmetric_qdq(path):
        raise UsageError(f"{name} ({prec}): {path.name} has Q/DQ nodes with non-zero zero points "
                         f"(asymmetric activations); TensorRT quantises symmetrically only; "
                         f"{remake}")


def asymmetric_qdq(onnx_path: Path) -> int:
    """How many Quantize/DequantizeLinear nodes have a non-zero zero point (0 when the onnx
    package is absent: TensorRT's parser then says it, later and less plainly)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return 0
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: a.t for n in graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    bad = 0
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = consts.get(n.input[2])
            if zp is not None and zp.data_location != onnx.TensorProto.EXTERNAL:
                bad += bool(numpy_helper.to_array(zp).any())
    return bad


def build_engines(bundle, *, precision: str = "fp16", options: ProfileOptions = ProfileOptions(),
                  components: tuple[str, ...] | None = None, workspace_mb: int | None = None,
                  timing_cache: str | None = None, optimization_level: int | None = None,
                  debug: bool = False, progress: Callable[[str], None] = lambda m: None,
                  refittable: bool = False, tf32: bool = False) -> list[dict]:
    """Build and record one engine per component; return the records written.
    ``refittable``: the weights of each component's weights map stay refittable, for LoRA
    (runtime/backends/trt_refit.py); components without a map are built as usual. ``tf32``:
    FP32 convolutions and matrix products may use TF32 (off: FP32 as the ONNX graph)."""
    root = Path(bundle)
    manifest = open_bundle(root)
    if not (root / MANIFEST_NAME).is_file():
        raise UsageError("engines are recorded in manifest.json; make a bundle of this Optimum "
                         "folder first with `ldm-export import-optimum`")
    plans = plan_builds(manifest, precision, options, components)  # the graphs, before TensorRT
    facts = device_facts()  # one line if TensorRT, cuda-python or a GPU is missing
    poly = import_polygraphy()
    refit = {name: refit_names(manifest, name, prec, source.path) for name, prec, source, _ in plans
             if refittable and manifest.component(name).weights_map is not None}
    progress(f"building on {facts}")
    written = []
    for name, prec, source, profile in plans:
        rel = engine_path(facts, name, prec, profile)
        t0 = time.perf_counter()
        progress(f"{name} ({prec}): building {rel}")
        out = root / rel
        _build_one(poly, name, source.path, profile, out, workspace_mb=workspace_mb,
                   timing_cache=timing_cache, optimization_level=optimization_level, debug=debug,
                   refit=refit.get(name), tf32=tf32)
        rec = EngineRecord(
            backend=ENGINE_BACKEND, precision=prec, trt_version=facts.trt_version,
            device_name=facts.device_name, compute_capability=facts.compute_capability,
            profile=profile, onnx_sha256=source.sha256 or sha256_file(source.path),
            file=rel, size=out.stat().st_size, sha256=sha256_file(out),
            build_seconds=round(time.perf_counter() - t0, 1), workspace_mb=workspace_mb,
            optimization_level=optimization_level,
            refittable=REFIT_KIND if name in refit else None, tf32=bool(tf32))
        edit_manifest(root, lambda m, n=name, r=rec: _put_record(m.components[n], r))
        progress(f"{name} ({prec}): {rec.size / 1e6:.1f} MB in {rec.build_seconds} s")
        written.append({"component": name, **rec.to_json()})
    return written


def _build_one(poly, component: str, onnx_path: Path, profile: dict, out: Path, *,
               workspace_mb, timing_cache, optimization_level, debug: bool,
               refit: list[str] | None = None, tf32: bool = False) -> None:
    """Polygraphy: parse strongly typed, configure one profile, build, save (atomically).
    ``refit``: weight names to keep refittable (REFIT_INDIVIDUAL), or None. ``tf32``: set
    BuilderFlag.TF32 (given either way: Polygraphy clears it unless told, TensorRT sets it)."""
    trt = import_tensorrt()
    poly_trt, G_LOGGER = poly
    prof = poly_trt.Profile()
    for name, p in profile.items():
        prof.add(name, min=p["min"], opt=p["opt"], max=p["max"])
    config = {"profiles": [prof], "tf32": bool(tf32)}
    if workspace_mb:
        config["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(workspace_mb) << 20}
    if timing_cache:
        config["load_timing_cache"] = str(timing_cache)
    if optimization_level is not None:
        config["builder_optimization_level"] = int(optimization_level)
    network = poly_trt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    create = poly_trt.CreateConfig(**config)
    if refit:
        network = poly_trt.PostprocessNetwork(network, func=mark_refittable(refit),
                                              name="mark the LoRA weights refittable")
        create = poly_trt.PostprocessConfig(create, func=refit_individual(trt))
    cache = str(timing_cache) if timing_cache else None
    plan = poly_trt.EngineBytesFromNetwork(network, config=create, save_timing_cache=cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with G_LOGGER.verbosity(G_LOGGER.INFO if debug else G_LOGGER.ERROR):
            built = poly_trt.SaveBytes(plan, path=str(tmp))()
        del built  # the plan's bytes, in host memory: never deserialised on the GPU here
        os.replace(tmp, out)
    except Exception as e:
        if debug or isinstance(e, (LdmEdgeError, KeyboardInterrupt)):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EngineBuildError(f"{component}: TensorRT could not build the engine ({first}); "
                               f"rerun with --debug for TensorRT's log") from None
    finally:
        tmp.unlink(missing_ok=True)
        _remove_empty(out.parent)


def refit_names(manifest: Manifest, component: str, precision: str, graph: Path) -> list[str]:
    """The initializers of ``component``'s weights map, all present (as float) in ``graph``."""
    from ldm_edge.runtime.bundle.onnx_scan import initializer_dtypes
    from ldm_edge.runtime.lora.weights_map import read_weights_map

    if precision == "int8":
        raise UsageError(f"--refittable: the {component} INT8 graph holds quantised weights a "
                         f"LoRA cannot be refitted into; build fp32 or fp16 engines")
    names = sorted({p.initializer for p in read_weights_map(manifest, component).params.values()})
    table = initializer_dtypes(graph)
    lost = [n for n in names if table.get(n, ("", False))[0] not in ("float32", "float16")]
    if lost:
        raise UsageError(f"--refittable: {graph.name} has no float weight {lost[0]!r} of the "
                         f"{component} weights map; re-export the bundle")
    return names


def _remove_empty(folder: Path) -> None:
    for d in (folder, folder.parent):
        try:
            d.rmdir()  # only succeeds when empty: nothing half-built is left behind
        except OSError:
            return


def _put_record(comp: ComponentRecord, record: EngineRecord) -> None:
    """Add ``record``, replacing one for the same file (same machine, precision, profile)."""
    comp.engines = [r for r in comp.engines if r.file != record.file] + [record]
