"""onnxruntime backend: TensorRT / CUDA / CPU execution providers, whichever is installed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .backend_base import Backend
from .errors import BundleError, UsageError, first_line
from .spec import ComponentSpec

log = logging.getLogger(__name__)

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
DEVICE_PROVIDERS = {
    "auto": PROVIDER_ORDER,
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def choose_providers(device: str = "auto") -> list[str]:
    import onnxruntime as ort

    if device not in DEVICE_PROVIDERS:
        raise UsageError(f"unknown device {device!r}; use one of {', '.join(DEVICE_PROVIDERS)}")
    available = set(ort.get_available_providers())
    chosen = [p for p in DEVICE_PROVIDERS[device] if p in available]
    if device != "auto" and device != "cpu" and chosen[:1] != [DEVICE_PROVIDERS[device][0]]:
        raise UsageError(f"onnxruntime here has no {DEVICE_PROVIDERS[device][0]} "
                         f"(has {', '.join(sorted(available))}); install onnxruntime-gpu")
    return chosen


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, spec: ComponentSpec, path: str | Path, *, device: str = "auto",
                 threads: int = 0, io_map: dict | None = None, graph_cache: bool = False,
                 precision: str = "fp32"):
        super().__init__(spec, precision=precision)
        # spec name -> graph name, for graphs whose I/O names differ from ours (Optimum's)
        self.io_map = dict(io_map or {})
        self.threads = threads
        self.providers = choose_providers(device)
        # "off", "hit" (opened the cached optimised graph) or "miss" (optimised and stored it)
        self.cache_state = "off"
        if graph_cache and self.providers == ["CPUExecutionProvider"]:
            self.session = self._open_cached(Path(path))
        else:
            self.session = self._open(Path(path), self._options())
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(self._g(n) for n in spec.input_names):
            raise BundleError(f"{spec.name}: graph inputs {names} do not match the manifest's "
                              f"{spec.input_names}; re-export the bundle")
        self.on_device = self.session.get_providers()[0] != "CPUExecutionProvider"
        self._device_values = {}

    def _options(self, optimise: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        return opts

    def _open(self, path: Path, opts):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:
            msg = first_line(e)
            raise BundleError(f"{self.spec.name}: onnxruntime cannot load {path.name} ({msg}); "
                              f"the file is damaged or not ONNX — re-export the bundle")

    def _open_cached(self, path: Path):
        """The optimised graph from the cache, or optimise now and store it (ort_cache.py)."""
        import onnxruntime as ort

        from .onnx_scan import ScanError
        from .ort_cache import DATA, EXTERNAL_MIN_BYTES, MODEL, GraphCache, graph_key

        cache = GraphCache()
        try:
            key = graph_key(path)
        except (OSError, ScanError):  # the plain open names the problem
            return self._open(path, self._options())
        hit = cache.lookup(key)
        if hit is not None:
            try:
                session = ort.InferenceSession(str(hit), self._options(optimise=False),
                                               providers=self.providers)
                self.cache_state = "hit"
                return session
            except Exception as e:
                log.warning("%s: the cached optimised graph does not load (%s); making it again",
                            self.spec.name, first_line(e, 120))
                cache.remove(key)
        try:
            staged = cache.stage(key)
        except OSError as e:
            log.warning("onnxruntime graph cache: cannot write to %s (%s)", cache.root, e)
            return self._open(path, self._options())
        opts = self._options()
        opts.optimized_model_filepath = str(staged / MODEL)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                      str(EXTERNAL_MIN_BYTES))
        try:
            session = ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception:
            # the graph or the save (disk full?) failed: a plain open tells which
            cache.discard(staged)
            session = self._open(path, self._options())
            log.warning("%s: could not store the optimised graph in %s", self.spec.name, cache.root)
            return session
        if cache.commit(key, staged) is not None:
            self.cache_state = "miss"
        return session

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
