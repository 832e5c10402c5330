"""Native TensorRT backend: one deserialised engine, one execution context, one CUDA stream.

Engines are built by ``ldm-export engines`` (strongly typed, so the precision is the ONNX
graph's) and recorded in the manifest; :func:`open_tensorrt` picks the record that fits this
machine. Per call: ``set_input_shape`` and ``set_tensor_address`` for every I/O tensor, one
``execute_async_v3`` on the shared stream, copies back, one synchronise. Device buffers are
kept per tensor and grow only when a call needs more; inputs given to :meth:`bind` (the text
embeddings) are uploaded once per prompt.

Activation memory: every context is created ``USER_MANAGED`` and pointed at one scratch area
shared by all engines in the process, sized for the largest. The engines of a pipeline run
one after another on one stream, so they never use it at the same time, and a GPU that holds
U-Net + decoder + text encoder pays for one activation area instead of three.

CUDA comes from cuda-python's runtime bindings (no torch). TensorRT, cuda-python: imported
when a backend is opened, never at module import.

TODO(cuda-graphs): for engines built with ``--static``, capture ``execute_async_v3`` once
(``cudaStreamBeginCapture`` / ``cudaStreamEndCapture`` / ``cudaGraphInstantiate``) and replay it
with ``cudaGraphLaunch``; buffers already keep fixed addresses per shape, which capture needs.
Left out until it can be measured on a device: the saving is the launch overhead per step.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import numpy as np

from ..bundle.manifest import Manifest, safe_member
from ..bundle.spec import ComponentSpec
from ..errors import BundleError, LdmEdgeError, UsageError, first_line
from ..fsutil import sha256_file
from .base import Backend
from .trt_engines import (TensorRTUnavailable, cuda_error, device_facts, import_cudart,
                          import_tensorrt, narrow_spec, profile_violation, rebuild_hint,
                          select_engine, tensorrt_records)

log = logging.getLogger(__name__)


class GpuError(LdmEdgeError):
    """A CUDA or TensorRT call failed while running (out of memory, driver error)."""


class Cuda:
    """The few CUDA runtime calls this backend makes, each checked."""

    def __init__(self):
        self.rt = import_cudart()
        self._ok = self.rt.cudaError_t.cudaSuccess

    def _check(self, result, what: str):
        err, rest = result[0], result[1:]
        if err != self._ok:
            raise GpuError(f"CUDA {what} failed: {cuda_error(self.rt, err)}")
        return rest[0] if len(rest) == 1 else None

    def malloc(self, nbytes: int) -> int:
        err, ptr = self.rt.cudaMalloc(max(int(nbytes), 1))
        if err != self._ok:
            raise GpuError(f"CUDA could not allocate {nbytes / 2**20:.0f} MiB "
                           f"({cuda_error(self.rt, err)}); close other GPU programs, or rebuild "
                           f"the engines for smaller shapes (--max-size, --max-batch)")
        return int(ptr)

    def free(self, ptr: int) -> None:
        if ptr:
            self._check(self.rt.cudaFree(ptr), "free")

    def create_stream(self):
        return self._check(self.rt.cudaStreamCreate(), "stream creation")

    def destroy_stream(self, stream) -> None:
        self._check(self.rt.cudaStreamDestroy(stream), "stream destruction")

    def sync(self, stream) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "stream synchronise")

    def upload(self, ptr: int, array: np.ndarray, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream),
                    "copy to the GPU")

    def download(self, array: np.ndarray, ptr: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream),
                    "copy from the GPU")


class SharedScratch:
    """One stream and one activation area for every TensorRT context in this process."""

    _instance: "SharedScratch | None" = None

    def __init__(self, cuda: Cuda):
        self.cuda = cuda
        self.stream = cuda.create_stream()
        self.handle = int(self.stream)  # what execute_async_v3 takes
        self.ptr, self.size = 0, 0
        self.contexts: list = []

    @classmethod
    def acquire(cls, cuda: Cuda) -> "SharedScratch":
        if cls._instance is None:
            cls._instance = cls(cuda)
        return cls._instance

    def attach(self, context, nbytes: int) -> None:
        """Point ``context`` at the area, growing it (and re-pointing the others) if needed."""
        if nbytes > self.size or not self.ptr:
            self.cuda.sync(self.stream)  # nothing may still be running in the old area
            new = self.cuda.malloc(max(nbytes, self.size))
            self.cuda.free(self.ptr)
            self.ptr, self.size = new, max(nbytes, self.size, 1)
            for c in self.contexts:
                _set_device_memory(c, self.ptr, self.size)
        _set_device_memory(context, self.ptr, self.size)
        self.contexts.append(context)

    def detach(self, context) -> None:
        self.contexts = [c for c in self.contexts if c is not context]
        if self.contexts:
            return
        self.cuda.sync(self.stream)
        self.cuda.free(self.ptr)
        self.cuda.destroy_stream(self.stream)
        SharedScratch._instance = None


def _set_device_memory(context, ptr: int, size: int) -> None:
    context.set_device_memory(ptr, size)  # TensorRT 10.1+ (the floor is 10.3)


def _device_memory_size(engine) -> int:
    return int(engine.device_memory_size_v2)  # 10.1+; the only one left in 11


_TRT_LOGGER = (None, None)  # (the tensorrt module it belongs to, the logger)


def _trt_logger(trt):
    """One logger per process and TensorRT module (a test's fake never reaches the real one)."""
    global _TRT_LOGGER
    if _TRT_LOGGER[0] is not trt:
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        _TRT_LOGGER = (trt, trt.Logger(trt.Logger.WARNING if debug else trt.Logger.ERROR))
    return _TRT_LOGGER[1]


def _start_runtime(trt, component: str):
    """``trt.Runtime``; the bindings raise TypeError ("... returned nullptr") when TensorRT
    cannot start (no usable GPU or driver, a library of another CUDA major)."""
    try:
        return trt.Runtime(_trt_logger(trt))
    except TypeError as e:
        raise GpuError(f"{component}: TensorRT could not start here ({first_line(e)}); check "
                       f"the GPU and its driver, or run with --backend onnxruntime") from None


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, spec: ComponentSpec, path: str | Path, *, record: dict,
                 io_map: dict | None = None, bundle: str = "BUNDLE", lora=None,
                 onnx_path: Path | None = None):
        # the engine's own ranges, which callers read to size their calls (see narrow_spec)
        super().__init__(narrow_spec(spec, record["profile"], io_map), precision=record["precision"])
        self.io_map = dict(io_map or {})  # spec name -> graph (engine tensor) name
        self.record = record
        self.profile = record["profile"]
        self._hint = rebuild_hint(bundle, self.precision)
        self.context = None
        trt = import_tensorrt()
        self.cuda = Cuda()
        self.runtime = _start_runtime(trt, spec.name)
        self.engine = self._deserialize(Path(path))
        if lora is not None:  # merged LoRA weights: refit the engine fresh from its plan
            self._refit(trt, lora, onnx_path)
        self.dtypes = self._io_dtypes(trt)
        context = self.engine.create_execution_context(
            trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise GpuError(f"{spec.name}: TensorRT could not create an execution context "
                           f"(out of GPU memory?)")
        self.shared = SharedScratch.acquire(self.cuda)
        self.shared.attach(context, _device_memory_size(self.engine))
        self.context = context
        self._buffers: dict[str, list[int]] = {}  # tensor -> [device pointer, capacity]
        self._bound_dev: dict[str, tuple[int, tuple]] = {}

    def _g(self, name: str) -> str:
        return self.io_map.get(name, name)

    def _deserialize(self, path: Path):
        try:  # mapped, not read: a U-Net plan is GBs and an 8 GB Jetson has no copy to spare
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                engine = self.runtime.deserialize_cuda_engine(buf)
        except TypeError:  # a binding that takes bytes only
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        except (OSError, ValueError):
            engine = None
        if engine is None:
            raise BundleError(f"{self.spec.name}: TensorRT cannot load {path.name} (damaged, or "
                              f"built by another TensorRT); rebuild it with {self._hint}")
        return engine

    def _refit(self, trt, lora, onnx_path: Path) -> None:
        from ..lora.files import LoraError
        from .trt_refit import REFIT_KIND, refit_engine

        if self.record.get("refittable") != REFIT_KIND:
            raise LoraError(f"{self.spec.name}: this TensorRT engine was not built refittable; "
                            f"rebuild it with {self._hint} --refittable to use --lora on it")
        weights, _ = lora.for_graph(onnx_path)
        refit_engine(trt, self.engine, _trt_logger(trt), weights, onnx_path, self.spec.name,
                     self._hint)

    def _io_dtypes(self, trt) -> dict[str, np.dtype]:
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        inputs = {n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        want_in = {self._g(n) for n in self.spec.input_names}
        want_out = {self._g(n) for n in self.spec.output_names}
        if inputs != want_in or not want_out <= set(names) - inputs:
            raise BundleError(f"{self.spec.name}: engine tensors {sorted(names)} do not match the "
                              f"manifest's; rebuild it with {self._hint}")
        return {n: self._numpy_dtype(trt, n) for n in names}

    def _numpy_dtype(self, trt, name: str) -> np.dtype:
        dtype = self.engine.get_tensor_dtype(name)
        try:
            return np.dtype(trt.nptype(dtype))
        except TypeError:  # BF16, FP8, INT4...: TensorRT's numpy bridge has no such type
            raise BundleError(f"{self.spec.name}: engine tensor {name!r} is {dtype}, which has "
                              f"no numpy type; rebuild the engine with {self._hint} (our "
                              f"graphs carry float32/float16/int64 I/O)") from None

    # -- buffers --------------------------------------------------------------------------
    def _buffer(self, key: str, nbytes: int) -> int:
        """A device buffer for ``key`` of at least ``nbytes``; reallocated only to grow."""
        buf = self._buffers.get(key)
        if buf is None or buf[1] < nbytes:
            if buf is not None:
                self.cuda.sync(self.shared.stream)  # its last user may still be running
                del self._buffers[key]
                self.cuda.free(buf[0])
            buf = self._buffers[key] = [self.cuda.malloc(nbytes), max(nbytes, 1)]
        return buf[0]

    def _host(self, name: str, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=self.dtypes[self._g(name)])

    # -- interface ------------------------------------------------------------------------
    def check(self, feeds, partial=False):
        for name, a in feeds.items():  # first: the engine's limits, with how to widen them
            why = profile_violation(self.profile, self._g(name), tuple(getattr(a, "shape", ())))
            if why and isinstance(a, np.ndarray):
                raise UsageError(f"{self.spec.name}: input {name!r} {why}; rebuild with "
                                 f"{self._hint} and a wider --min-size/--max-size/--max-batch "
                                 f"(or without --static), or use --backend onnxruntime")
        super().check(feeds, partial)

    def bind(self, feeds):
        super().bind(feeds)
        self._bound_dev = {}
        for name, array in feeds.items():
            host = self._host(name, array)
            ptr = self._buffer("bound:" + name, host.nbytes)
            self.cuda.upload(ptr, host, self.shared.stream)
            self._bound_dev[name] = (ptr, host.shape)
        self.cuda.sync(self.shared.stream)  # the host copies may go once this returns

    def unbind(self):
        super().unbind()
        self._bound_dev = {}

    def _run(self, feeds, bound):
        ctx, stream = self.context, self.shared.stream
        staged = []  # host arrays that must live until the copies are done
        for name in self.spec.input_names:
            g = self._g(name)
            if name in feeds:
                host = self._host(name, feeds[name])
                ptr, shape = self._buffer(name, host.nbytes), host.shape
                self.cuda.upload(ptr, host, stream)
                staged.append(host)
            else:
                ptr, shape = self._bound_dev[name]
            if not ctx.set_input_shape(g, tuple(int(n) for n in shape)):
                raise UsageError(f"{self.spec.name}: TensorRT refuses shape {list(shape)} for "
                                 f"{name!r}; rebuild the engine with {self._hint}")
            self._address(g, ptr)
        outputs = {}
        for name in self.spec.output_names:
            g = self._g(name)
            shape = tuple(ctx.get_tensor_shape(g))
            if any(n < 0 for n in shape):
                raise GpuError(f"{self.spec.name}: TensorRT could not infer the shape of {g}")
            host = np.empty(shape, self.dtypes[g])
            ptr = self._buffer(name, host.nbytes)
            self._address(g, ptr)
            outputs[name] = (host, ptr)
        if not ctx.execute_async_v3(self.shared.handle):
            raise GpuError(f"{self.spec.name}: TensorRT failed to run the engine "
                           f"(rerun with --debug for TensorRT's log)")
        for host, ptr in outputs.values():
            self.cuda.download(host, ptr, stream)
        self.cuda.sync(stream)
        del staged
        want = {t.name: np.dtype(t.dtype) for t in self.spec.outputs}
        return {n: h.astype(want[n], copy=False) for n, (h, _) in outputs.items()}

    def _address(self, name: str, ptr: int) -> None:
        """``set_tensor_address``, checked: TensorRT returns False for a name that is not an
        I/O tensor of the engine or a pointer it cannot use (misaligned)."""
        if not self.context.set_tensor_address(name, ptr):
            raise GpuError(f"{self.spec.name}: TensorRT refused the device address for tensor "
                           f"{name!r} (rerun with --debug for TensorRT's log)")

    def close(self):
        super().close()
        self._bound_dev = {}
        if self.context is None:
            return
        self.cuda.sync(self.shared.stream)
        for ptr, _ in self._buffers.values():
            self.cuda.free(ptr)
        self._buffers = {}
        self.shared.detach(self.context)
        self.context = None  # the context goes before its engine
        self.engine = None


# -- choosing and opening -----------------------------------------------------------------
def engine_for(manifest: Manifest, component: str, precision: str, facts) -> tuple[dict, Path]:
    """The engine record that fits this machine and its file, checked against the manifest."""
    records = tensorrt_records(manifest.component(component), precision)
    built_from = manifest.tensorrt_source(component, precision)[1]  # an INT8 U-Net: its form
    record = select_engine(records, facts, component=component, precision=precision,
                           onnx_sha256=built_from, bundle=str(manifest.root))
    what = f"{component} TensorRT engine"
    path = safe_member(manifest.root, record["file"], what)
    hint = rebuild_hint(str(manifest.root), precision)
    if not path.is_file():
        raise BundleError(f"{what}: {record['file']} is missing from the bundle; rebuild it with "
                          f"{hint}")
    if path.stat().st_size != record["size"] or sha256_file(path) != record["sha256"]:
        raise BundleError(f"{what}: {path.name} does not match its size/sha256 in the manifest "
                          f"(damaged copy?); rebuild it with {hint}")
    return record, path


def open_tensorrt(manifest: Manifest, component: str, precision: str, *, required: bool,
                  device: str = "auto", interface=None, lora=None) -> TensorRTBackend | None:
    """A TensorRT backend for ``component``; with ``required`` False (``--backend auto``) None
    instead of an error when this bundle has no engine for this machine or TensorRT is absent.
    ``interface``: the (spec, io_map) to open it with (backends.interface; default the
    manifest's own). ``lora``: merged LoRA weights to refit the engine with (an engine not
    built refittable: onnxruntime instead under auto, an error when required)."""
    comp = manifest.component(component)
    if not required:
        if device == "cpu" or not tensorrt_records(comp, precision):
            return None
        try:
            record, path = engine_for(manifest, component, precision, device_facts())
        except TensorRTUnavailable as e:
            log.info("%s: TensorRT engines present but unusable here (%s); using onnxruntime",
                     component, e)
            return None
        except BundleError as e:
            log.warning("%s; using onnxruntime", e)
            return None
        if lora is not None and record.get("refittable") is None:
            log.info("%s: the TensorRT engine is not refittable; onnxruntime applies the LoRA",
                     component)
            return None
    else:
        record, path = engine_for(manifest, component, precision, device_facts())
    spec, io_map = interface or (comp.spec, comp.io_map)
    try:
        return TensorRTBackend(spec, path, record=record, io_map=io_map,
                               bundle=str(manifest.root), lora=lora,
                               onnx_path=manifest.variant(component, precision).path)
    except (GpuError, TensorRTUnavailable, BundleError) as e:
        if required:
            raise
        log.warning("%s; using onnxruntime", first_line(e))  # --backend auto: say why
        return None
