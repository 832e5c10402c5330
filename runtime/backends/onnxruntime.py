"""onnxruntime backend: CUDA / CPU execution providers, whichever is installed (and
onnxruntime's TensorRT provider when asked for: ``--device tensorrt``)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ..bundle.spec import ComponentSpec
from ..errors import BundleError, UsageError, first_line
from .base import Backend
from .sessions import SessionFromOnnx

log = logging.getLogger(__name__)

TRT_PROVIDER = "TensorrtExecutionProvider"
# --device auto: CUDA, else the CPU. onnxruntime's TensorRT provider builds TensorRT engines of
# its own when a session opens (minutes for a U-Net), so it runs only when asked for
# (--device tensorrt); engines built once are `ldm-export engines` + --backend tensorrt.
PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")
DEVICE_PROVIDERS = {
    "auto": PROVIDER_ORDER,
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": (TRT_PROVIDER, "CUDAExecutionProvider", "CPUExecutionProvider"),
}
# where the TensorRT provider keeps its engines and tactic timings, under fsutil.cache_dir()
TRT_CACHE_SUBDIR = "ort-tensorrt"


# Providers with a MultiHeadAttention kernel: they open a variant's "ort-mha" form (attention
# fused, bundletools/forms.py) when it has one. TensorRT's provider reads the plain graph.
MHA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
# LDM_EDGE_FUSED_ATTENTION=0: open the plain graph anyway (for comparison)
FUSED_ATTENTION_ENV = "LDM_EDGE_FUSED_ATTENTION"


def fused_attention_wanted(flag: bool | None = None) -> bool:
    """``flag`` when given, else the environment (on unless LDM_EDGE_FUSED_ATTENTION=0)."""
    if flag is not None:
        return flag
    return os.environ.get(FUSED_ATTENTION_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def provider_settings(providers: list[str], graph: Path, weights_key: str = "") -> list:
    """``providers`` as onnxruntime takes them: TensorRT's with its engine and timing caches
    on, so a session builds an engine once per graph and shape range, not at every start.
    onnxruntime keys a cached engine by the graph's file name and tensor names, not its
    weights (TRTGenerateId), so each graph gets a folder of its own: its files' sha256, the
    onnxruntime version and the merged LoRA weights (``weights_key``) name it."""
    if TRT_PROVIDER not in providers:
        return list(providers)
    from ..fsutil import cache_dir
    from .ort_cache import graph_key

    root = cache_dir() / TRT_CACHE_SUBDIR
    try:
        key = graph_key(Path(graph))
        engines = root / hashlib.sha256(f"{key}\0{weights_key}".encode()).hexdigest()[:40]
        for folder in (engines, root / "timing"):
            folder.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # an unreadable graph (the session says it better), a full disk
        log.warning("onnxruntime's TensorRT provider runs without its engine cache (%s)",
                    first_line(e))
        return list(providers)
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines),
               "trt_timing_cache_enable": True, "trt_timing_cache_path": str(root / "timing")}
    return [(p, options) if p == TRT_PROVIDER else p for p in providers]


def choose_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    if device not in DEVICE_PROVIDERS:
        raise UsageError(f"unknown device {device!r}; use one of {', '.join(DEVICE_PROVIDERS)}")
    available = set(ort.get_available_providers())
    chosen = [p for p in DEVICE_PROVIDERS[device] if p in available]
    if device != "auto" and device != "cpu" and chosen[:1] != [DEVICE_PROVIDERS[device][0]]:
        raise UsageError(f"onnxruntime here has no {DEVICE_PROVIDERS[device][0]} "
                         f"(has {', '.join(sorted(available))}); pip install "
                         f"'ldm-edge[gpu-cu12]' or 'ldm-edge[gpu-cu13]', for the driver's CUDA")
    return chosen


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, spec: ComponentSpec, path: str | Path, *, device: str = "auto",
                 threads: int = 0, io_map: dict | None = None, graph_cache: bool = False,
                 precision: str = "fp32", fused_path: str | Path | None = None,
                 fused_attention: bool | None = None, memory_arena: bool = True,
                 lora=None, optimise: bool = True, prepack: bool = True):
        super().__init__(spec, precision=precision)
        # spec name -> graph name, for graphs whose I/O names differ from ours (Optimum's)
        self.io_map = dict(io_map or {})
        self.threads = threads
        self.providers = choose_providers(device)
        # the graph opened: the fused-attention form where the provider has the kernel
        self.form = None
        if (fused_path is not None and self.providers[0] in MHA_PROVIDERS
                and fused_attention_wanted(fused_attention)):
            path, self.form = fused_path, "ort-mha"
        self.path = Path(path)
        # lora: runtime/lora_apply.GraphWeights, the merged weights this graph opens with
        weights, external = lora.for_graph(path) if lora is not None else ({}, set())
        providers = provider_settings(self.providers, path, lora.key if lora is not None else "")
        loader = SessionFromOnnx(path, threads=threads, providers=providers,
                                 cache=graph_cache, label=spec.name, memory_arena=memory_arena,
                                 weights=weights, external=external, optimise=optimise,
                                 weights_key=lora.key if lora is not None else "",
                                 prepack=prepack)
        try:
            self.session = loader()
        except Exception as e:
            raise BundleError(f"{spec.name}: onnxruntime cannot load {Path(path).name} "
                              f"({first_line(e)}); the file is damaged or not ONNX — "
                              f"re-export the bundle")
        # "off", "hit" (opened the cached optimised graph) or "miss" (optimised and stored it)
        self.cache_state = loader.cache_state
        # onnxruntime reads added initializers from our memory for the session's life
        self._weights_owner = loader if weights else None
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(self._g(n) for n in spec.input_names):
            raise BundleError(f"{spec.name}: graph inputs {names} do not match the manifest's "
                              f"{spec.input_names}; re-export the bundle")
        self.on_device = self.session.get_providers()[0] != "CPUExecutionProvider"
        self._device_values = {}

    def _g(self, name: str) -> str:
        return self.io_map.get(name, name)

    def bind(self, feeds):
        super().bind(feeds)
        if self.on_device:
            import onnxruntime as ort

            self._device_values = {self._g(k): ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0)
                                   for k, v in feeds.items()}

    def unbind(self):
        super().unbind()
        self._device_values = {}

    def _run(self, feeds, bound):
        outputs = [self._g(n) for n in self.spec.output_names]
        if not self.on_device:
            full = {self._g(k): v for k, v in self._with_bound(feeds, bound).items()}
            outs = self.session.run(outputs, full)
            return dict(zip(self.spec.output_names, outs))
        io = self.session.io_binding()
        for k in bound:
            io.bind_ortvalue_input(self._g(k), self._device_values[self._g(k)])
        for k, v in feeds.items():
            io.bind_cpu_input(self._g(k), np.ascontiguousarray(v))
        for name in outputs:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        return dict(zip(self.spec.output_names, io.copy_outputs_to_cpu()))

    def close(self):
        super().close()
        self._device_values = {}
        self.session = None
        self._weights_owner = None
