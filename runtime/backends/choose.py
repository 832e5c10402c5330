"""Pick and open a backend for one component of a bundle."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ..bundle.manifest import Manifest, safe_member
from ..bundle.schema import PRECISIONS, ComponentRecord
from ..bundle.spec import ComponentSpec, TensorSpec
from ..errors import UsageError
from .base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
# When a component has no variant of the asked precision, take the next wider one:
# INT8 bundles usually quantise only the U-Net.
FALLBACK = {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}
# What a VAE encoder returns when its graph draws the latent itself (older Optimum exports)
# instead of returning the posterior's parameters: the pipeline then uses it as it is.
DRAWN_LATENT = "latent"


def resolve_backend(name: str) -> str:
    """Check the name; ``tensorrt`` also checks that TensorRT, cuda-python and a GPU are here
    (one line naming what is missing). ``auto`` decides per component in :func:`open_backend`."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "tensorrt":
        from .trt_engines import device_facts

        device_facts()
    if name == "openvino" and importlib.util.find_spec("openvino") is None:
        raise UsageError("the openvino backend needs OpenVINO: pip install 'ldm-edge[openvino]'")
    return name


def pick_precision(manifest: Manifest, component: str, precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    have = manifest.precisions(component)
    for p in FALLBACK[precision]:
        if p in have:
            if p != precision:
                log.info("%s has no %s variant; using %s", component, precision, p)
            return p
    manifest.variant(component, precision)  # raises with what to run to make it


def interface(comp: ComponentRecord) -> tuple[ComponentSpec, dict]:
    """The spec and graph-name map a backend is opened with. The manifest's quirks stop here:
    a VAE encoder whose graph samples the latent (``output_kind`` "sample") names its output
    ``latent`` rather than ``latent_parameters``, so callers see which of the two they get."""
    spec, io_map = comp.spec, dict(comp.io_map)
    if comp.output_kind == "sample":
        out = spec.outputs[0]
        io_map[DRAWN_LATENT] = io_map.pop(out.name, out.name)
        spec = ComponentSpec(spec.name, spec.inputs, (TensorSpec(DRAWN_LATENT, out.dtype, out.shape),),
                             spec.ranges)
    return spec, io_map


def open_backend(manifest: Manifest, component: str, *, backend: str = "auto",
                 precision: str = "fp32", device: str = "auto", threads: int = 0,
                 ort_cache: bool = False, fused_attention: bool | None = None,
                 memory_arena: bool = True, lora=None, calls: int | None = None) -> Backend:
    """``tensorrt``: the manifest's engine for this machine, or a one-line error saying how to
    build it. ``auto``: that engine when it exists and TensorRT imports, else onnxruntime.
    ``ort_cache``: onnxruntime on the CPU opens its optimised graph from the disk cache
    (runtime/backends/ort_cache.py). ``fused_attention``: onnxruntime opens the variant's ``ort-mha``
    form where it has one (None: unless LDM_EDGE_FUSED_ATTENTION=0). ``memory_arena=False``:
    onnxruntime without its memory arena (low-memory mode; the other backends ignore it).
    ``lora``: the component's merged LoRA weights (runtime/lora_apply.GraphWeights) or None.
    ``calls``: how many times the caller will call it (None: unknown); onnxruntime skips
    pre-packing a float graph called only a few times (runtime/backends/prepack.py)."""
    kind = resolve_backend(backend)
    prec = pick_precision(manifest, component, precision)
    if lora is not None:
        from ..lora.apply import check_lora_precision

        check_lora_precision(component, prec, kind)
    spec, io_map = interface(manifest.component(component))
    if kind == "openvino":
        from .openvino import OpenVINOBackend

        return OpenVINOBackend(spec, manifest.variant(component, prec).path,
                               threads=threads, io_map=io_map, precision=prec, lora=lora)
    if kind != "onnxruntime":
        from .tensorrt import open_tensorrt

        b = open_tensorrt(manifest, component, prec, required=kind == "tensorrt", device=device,
                          interface=(spec, io_map), lora=lora)
        if b is not None:
            return b
    variant = manifest.variant(component, prec)
    from .onnxruntime import OnnxRuntimeBackend
    from .prepack import prepack_wanted

    return OnnxRuntimeBackend(spec, variant.path, device=device, threads=threads, io_map=io_map,
                              graph_cache=ort_cache, precision=prec, memory_arena=memory_arena,
                              fused_path=fused_form(manifest, variant), fused_attention=fused_attention,
                              lora=lora, prepack=prepack_wanted(prec, calls))


def fused_form(manifest: Manifest, variant) -> Path | None:
    """The variant's fused-attention form (its files were checked with the manifest's), or None."""
    form = variant.record.forms.get("ort-mha")
    if form is None:
        return None
    return safe_member(manifest.root, form.file, f"{variant.component} ({variant.precision}) ort-mha form")
