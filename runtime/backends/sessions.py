"""One way to open an onnxruntime session, for the runtime, the export checks, calibration
and the benchmarks.

A loader in Polygraphy's manner: ``SessionFromOnnx(path, threads=2)`` stores the graph and
the explicit settings; calling it opens the session. With ``cache=True`` (CPU only) the
graph onnxruntime optimises is kept on disk and reopened without optimising again
(``ort_cache.py``); ``cache_state`` then says what happened.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from ..errors import first_line

log = logging.getLogger(__name__)

CPU = ("CPUExecutionProvider",)
# onnxruntime's warnings about unused initializers and the like are noise to our users.
LOG_SEVERITY_ERROR = 3


class SessionFromOnnx:
    """Callable that opens ``model`` (a path, or the serialised graph as bytes).

    ``threads``: intra-op threads (0: onnxruntime's choice); ``inter_threads`` likewise;
    ``optimise``: every graph optimisation, or none; ``providers``: execution providers in
    order of preference; ``cache``: reuse this CPU's optimised graph from the disk cache
    (ignored unless the providers are CPU only and ``model`` is a path); ``label``: what
    log messages call the graph (default: its file name); ``memory_arena``: False turns off
    onnxruntime's CPU memory arena and memory pattern, so memory is returned when a run ends
    (a lower peak for a little speed; the low-memory mode). ``weights``: {initializer name:
    array} that replace the graph's own (merged LoRA weights, runtime/lora/apply.py), in
    memory, the file untouched: those in ``external`` (stored as external data) through
    ``add_external_initializers``, the rest written over the inline data of an in-memory
    copy of the graph (onnx_scan.patched_model; onnxruntime's ``add_initializer`` is not
    used: its NCHWc pass packs a Conv's original weight); ``weights_key`` says what they
    are, so the graph cache keeps their optimised graph apart from the base one.
    ``fixed_dims``: symbolic dimensions pinned to values ({"latent_height": 64, ...};
    onnxruntime's free-dimension overrides), so the session is planned for one size only.
    ``prepack=False``: the weights are used as stored, not copied into the kernels' layout
    at open (a faster open for a graph called a few times; runtime/backends/prepack.py).
    """

    def __init__(self, model: str | Path | bytes, *, threads: int = 0, inter_threads: int = 0,
                 optimise: bool = True, providers=CPU, cache: bool = False,
                 label: str | None = None, memory_arena: bool = True,
                 weights: dict | None = None, external=(), weights_key: str = "",
                 fixed_dims: dict[str, int] | None = None, prepack: bool = True):
        self.prepack = prepack
        self.model = model if isinstance(model, bytes) else Path(model)
        self.threads, self.inter_threads, self.optimise = threads, inter_threads, optimise
        self.providers = list(providers)
        self.memory_arena = memory_arena
        self.weights, self.external, self.weights_key = dict(weights or {}), set(external), weights_key
        self.fixed_dims = dict(fixed_dims or {})
        self.cache = cache and self.providers == list(CPU) and not isinstance(model, bytes)
        self.label = label or (self.model.name if isinstance(self.model, Path) else "graph")
        # after a call: "off", "hit" (opened the cached optimised graph) or "miss" (stored it)
        self.cache_state = "off"

    def options(self, optimise: bool | None = None):
        import onnxruntime as ort

        optimise = self.optimise if optimise is None else optimise
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                         else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        opts.log_severity_level = LOG_SEVERITY_ERROR
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self.inter_threads:
            opts.inter_op_num_threads = self.inter_threads
        if not self.memory_arena:
            opts.enable_cpu_mem_arena = False
            opts.enable_mem_pattern = False
        if self.weights:
            self._add_weights(opts, ort)
        for name, value in self.fixed_dims.items():
            opts.add_free_dimension_override_by_name(name, int(value))
        if not self.prepack:  # at open, not in the graph: a cached graph serves both ways
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return opts

    def _add_weights(self, opts, ort) -> None:
        # the OrtValues must outlive the session: kept on self
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                        for k, v in self.weights.items() if k in self.external}
        if self._values:
            opts.add_external_initializers(list(self._values), list(self._values.values()))

    def __call__(self):
        """The session; onnxruntime's own exception when the graph does not load."""
        self.cache_state = "off"
        if self.cache:
            return self._open_cached()
        return self._open(self.model, self.options())

    def _plain_options(self):
        """Options for a cached optimised graph: no optimising, no weights to add (the
        entry already holds them)."""
        weights, self.weights = self.weights, {}
        try:
            return self.options(optimise=False)
        finally:
            self.weights = weights

    def _open(self, model, opts):
        import onnxruntime as ort

        inline = {k: v for k, v in self.weights.items() if k not in self.external}
        if inline and isinstance(model, Path) and model == self.model:
            from ..bundle.onnx_scan import patched_model

            folder = str(Path(model).parent)
            model = patched_model(model, inline)  # the merged weights, in memory
            # its external data (if any) is still read from beside the file
            opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                          folder)
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, opts, providers=self.providers)

    def _open_cached(self):
        """The optimised graph from the cache, or optimise now and store it."""
        from ..bundle.onnx_scan import ScanError
        from .ort_cache import (DATA, EXTERNAL_MIN_BYTES, MODEL, STORED, GraphCache, graph_files,
                                graph_key)

        path = self.model
        cache = GraphCache()
        try:
            files = graph_files(path)  # read once: the key and the entry's size
            key = graph_key(path, files)
        except (OSError, ScanError):  # the plain open names the problem
            return self._open(path, self.options())
        if self.weights_key:  # the merged weights are in the optimised graph: their own entry
            key = hashlib.sha256(f"{key}|{self.weights_key}".encode()).hexdigest()[:40]
        if self.fixed_dims:  # a graph planned for one size: its own entry
            key = hashlib.sha256(f"{key}|{sorted(self.fixed_dims.items())}".encode()).hexdigest()[:40]
        hit = cache.lookup(key)
        if hit is not None:
            try:
                session = self._open(hit, self._plain_options())
                self.cache_state = "hit"
                return session
            except Exception as e:
                log.warning("%s: the cached optimised graph does not load (%s); making it again",
                            self.label, first_line(e, 120))
                cache.remove(key)
        size = sum(f.stat().st_size for f in files)  # about what its optimised copy takes
        if not cache.room_for(size):
            log.warning("%s: not keeping its optimised graph (%.1f GB) in %s: not enough room "
                        "(see LDM_EDGE_ORT_CACHE_MAX_GB, or --no-ort-cache)", self.label,
                        size / 1e9, cache.root)
            return self._open(path, self.options())
        try:
            staged = cache.stage(key)
        except OSError as e:
            log.warning("onnxruntime graph cache: cannot write to %s (%s)", cache.root, e)
            return self._open(path, self.options())
        opts = self.options()
        opts.optimized_model_filepath = str(staged / MODEL)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                      str(EXTERNAL_MIN_BYTES))
        try:
            session = self._open(path, opts)
        except Exception:
            # the graph or the save (disk full?) failed: a plain open tells which
            cache.discard(staged)
            session = self._open(path, self.options())
            log.warning("%s: could not store the optimised graph in %s", self.label, cache.root)
            return session
        if cache.commit(key, staged) is not None:
            self.cache_state = "miss"
            STORED.append(self.label)
            cache.trim(keep=key)
        return session

