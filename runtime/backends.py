"""Pick and open a backend for one component of a bundle."""

from __future__ import annotations

import importlib.util
import logging

from .backend_base import Backend
from .errors import UsageError
from .manifest import PRECISIONS, Manifest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")
# When a component has no variant of the asked precision, take the next wider one:
# INT8 bundles usually quantise only the U-Net.
FALLBACK = {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise UsageError("the tensorrt backend needs TensorRT's Python package, which is not "
                             "installed here; use --backend onnxruntime")
        raise UsageError("native TensorRT engines are not built into this bundle yet; "
                         "use --backend onnxruntime (its TensorRT execution provider runs the "
                         "same ONNX graphs where onnxruntime-gpu is installed)")
    return "onnxruntime"


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


def open_backend(manifest: Manifest, component: str, *, backend: str = "auto",
                 precision: str = "fp32", device: str = "auto", threads: int = 0) -> Backend:
    kind = resolve_backend(backend)
    prec = pick_precision(manifest, component, precision)
    variant = manifest.variant(component, prec)
    spec = manifest.spec(component)
    if kind == "onnxruntime":
        from .backend_onnxruntime import OnnxRuntimeBackend

        io_map = manifest["components"][component].get("io_map")
        b = OnnxRuntimeBackend(spec, variant.path, device=device, threads=threads, io_map=io_map)
        b.precision = prec
        return b
    raise UsageError(f"backend {kind} is not available")  # pragma: no cover
