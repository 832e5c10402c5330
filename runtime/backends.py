"""Pick and open a backend for one component of a bundle."""

from __future__ import annotations

import importlib.util
import logging

from .backend_base import Backend
from .errors import UsageError
from .manifest import PRECISIONS, Manifest

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
# When a component has no variant of the asked precision, take the next wider one:
# INT8 bundles usually quantise only the U-Net.
FALLBACK = {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32"), "fp32": ("fp32",)}


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


def open_backend(manifest: Manifest, component: str, *, backend: str = "auto",
                 precision: str = "fp32", device: str = "auto", threads: int = 0,
                 ort_cache: bool = False) -> Backend:
    """``tensorrt``: the manifest's engine for this machine, or a one-line error saying how to
    build it. ``auto``: that engine when it exists and TensorRT imports, else onnxruntime.
    ``ort_cache``: onnxruntime on the CPU opens its optimised graph from the disk cache
    (runtime/ort_cache.py)."""
    kind = resolve_backend(backend)
    prec = pick_precision(manifest, component, precision)
    io_map = manifest["components"][component].get("io_map")
    if kind == "openvino":
        from .backend_openvino import OpenVINOBackend

        return OpenVINOBackend(manifest.spec(component), manifest.variant(component, prec).path,
                               threads=threads, io_map=io_map, precision=prec)
    if kind != "onnxruntime":
        from .backend_tensorrt import open_tensorrt

        b = open_tensorrt(manifest, component, prec, required=kind == "tensorrt", device=device)
        if b is not None:
            return b
    variant = manifest.variant(component, prec)
    spec = manifest.spec(component)
    from .backend_onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(spec, variant.path, device=device, threads=threads, io_map=io_map,
                              graph_cache=ort_cache, precision=prec)
