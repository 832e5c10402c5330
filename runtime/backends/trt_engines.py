"""TensorRT engines in a bundle: which machine they fit, where they live, which one to use.

Shared by ``ldm-export engines`` and the TensorRT backend, so both halves follow one naming
and one matching rule. A serialised engine runs only on the GPU model, compute capability
and TensorRT version it was built with; the manifest records those facts per engine and
:func:`select_engine` compares them with the running machine's as plain data (tested
without a GPU). ``tensorrt``, ``cuda-python`` and Polygraphy come from one
:class:`TensorRTEnvironment` (tests install fakes there), imported only when first asked;
anything missing becomes one line saying how to get it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
from dataclasses import dataclass

from ..bundle.spec import ComponentSpec
from ..errors import BundleError, UsageError

ENGINE_BACKEND = "tensorrt"
ENGINES_DIR = "engines"
# Name-based I/O (set_input_shape / set_tensor_address / execute_async_v3) and user-managed
# context memory arrived in TensorRT 10.0, but the refit a LoRA needs (mark_weights_refittable,
# BuilderFlag.REFIT_INDIVIDUAL) only in 10.2; JetPack 6.1 ships 10.3 (6.0 ships 8.6), JetPack 7
# ships 11.x. 10.3 is the oldest release this is written against.
MIN_TRT_VERSION = (10, 3)

# The install extra per CUDA major of the driver (pyproject.toml; docs/tensorrt.md#install).
TRT_EXTRAS = {12: "trt-cu12", 13: "trt-cu13"}
NO_TENSORRT = ("TensorRT is not installed (pip install 'ldm-edge[trt-cu12]' or "
               "'ldm-edge[trt-cu13]', for the CUDA major nvidia-smi shows; on Jetson, JetPack's "
               "python3-libnvinfer); onnxruntime runs this bundle on the CPU meanwhile")
NO_CUDA_PYTHON = ("cuda-python is not installed (pip install 'cuda-python<13' for a CUDA 12 "
                  "driver, 'cuda-python>=13,<14' for CUDA 13; the TensorRT backend reaches CUDA "
                  "through it); onnxruntime runs this bundle meanwhile")
NO_GPU = ("no CUDA GPU is visible here ({why}); TensorRT engines are built and run on the GPU "
          "they are for — onnxruntime runs this bundle on the CPU meanwhile")
OLD_DRIVER = ("the CUDA runtime of {runtime} (CUDA {needs}) needs a newer driver than this one "
              "(CUDA {has}): {fix}; onnxruntime runs this bundle meanwhile")
# cudaErrorInsufficientDriver: the driver is older than the CUDA runtime calling it (a CUDA 13
# cuda-python on a CUDA 12 driver, the trap of unpinned installs)
CUDA_ERROR_INSUFFICIENT_DRIVER = 35


class TensorRTUnavailable(UsageError):
    """TensorRT, cuda-python or a CUDA GPU is missing on this machine."""


@dataclass(frozen=True)
class DeviceFacts:
    """What decides whether a serialised engine can run here."""

    device_name: str  # as CUDA reports it, e.g. "NVIDIA H100 80GB HBM3", "Orin"
    compute_capability: str  # "major.minor", e.g. "8.7"
    trt_version: str  # tensorrt.__version__, compared exactly

    @property
    def sm(self) -> str:
        return "sm" + self.compute_capability.replace(".", "")

    def __str__(self) -> str:
        return f"{self.device_name} ({self.sm}, TensorRT {self.trt_version})"


# -- asking the machine (lazy, guarded imports) ------------------------------------------------
# what a build uses from polygraphy.backend.trt. The plan is built to bytes and written as they
# are: EngineFromNetwork + SaveEngine would deserialise each engine on the GPU only to serialise
# it again, which an 8 GB Jetson cannot spare beside the builder
POLYGRAPHY_LOADERS = ("Profile", "NetworkFromOnnxPath", "CreateConfig", "PostprocessNetwork",
                      "PostprocessConfig", "EngineBytesFromNetwork")
NO_POLYGRAPHY = ("Polygraphy is not installed (pip install polygraphy); ldm-export engines "
                 "builds through its TensorRT loaders")
# Older Polygraphy reads IBuilderConfig.int8_calibrator unguarded; TensorRT 11 removed it.
MIN_POLYGRAPHY_FOR_TRT11 = (0, 49, 24)


class TensorRTEnvironment:
    """Where TensorRT, cuda-python, Polygraphy and the device facts come from.

    Every caller (the backend, ``ldm-export engines``, ``--backend auto``) reaches them through
    :func:`import_tensorrt`, :func:`import_cudart`, :func:`import_polygraphy` and
    :func:`device_facts`, which ask the one installed environment. This one asks the machine;
    tests install fakes with :func:`set_environment`, so no module can reach the real TensorRT
    behind a test's back.
    """

    def __init__(self):
        self._facts: dict[int, DeviceFacts] = {}

    def tensorrt(self):
        try:
            import tensorrt as trt
        except Exception:  # ImportError, or OSError/RuntimeError when libnvinfer is missing
            raise TensorRTUnavailable(NO_TENSORRT) from None
        if not hasattr(trt, "Runtime"):  # PyPI's placeholder package, not NVIDIA's wheel
            raise TensorRTUnavailable(NO_TENSORRT)
        have = tuple(int(x) for x in re.findall(r"\d+", str(getattr(trt, "__version__", "0")))[:2])
        if have < MIN_TRT_VERSION:
            need = ".".join(map(str, MIN_TRT_VERSION))
            raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old; ldm-edge needs "
                                      f"TensorRT {need} or newer (JetPack 6.1 or later)")
        return trt

    def cudart(self):
        """cuda-python's runtime bindings: ``cuda.bindings.runtime`` (12.6+), else ``cuda.cudart``."""
        try:
            from cuda.bindings import runtime as cudart
        except Exception:
            try:
                from cuda import cudart
            except Exception:
                raise TensorRTUnavailable(NO_CUDA_PYTHON) from None
        return cudart

    def polygraphy(self):
        """(the Polygraphy loaders a build uses, ``G_LOGGER``), refused when too old for this
        TensorRT. The loaders: ``polygraphy.backend.trt``'s (``POLYGRAPHY_LOADERS``) and
        ``polygraphy.backend.common.SaveBytes``."""
        try:
            import polygraphy
            from polygraphy.backend import trt as poly_trt
            from polygraphy.backend.common import SaveBytes
            from polygraphy.logger import G_LOGGER
        except Exception:
            raise TensorRTUnavailable(NO_POLYGRAPHY) from None
        have = tuple(int(x) for x in re.findall(r"\d+", polygraphy.__version__)[:3])
        trt_major = version_major(self.tensorrt().__version__)
        if trt_major >= 11 and have < MIN_POLYGRAPHY_FOR_TRT11:
            need = ".".join(map(str, MIN_POLYGRAPHY_FOR_TRT11))
            raise TensorRTUnavailable(f"Polygraphy {polygraphy.__version__} cannot drive "
                                      f"TensorRT 11; pip install 'polygraphy>={need}'")
        loaders = {name: getattr(poly_trt, name) for name in POLYGRAPHY_LOADERS}
        return types.SimpleNamespace(**loaders, SaveBytes=SaveBytes), G_LOGGER

    def facts(self, device: int = 0) -> DeviceFacts:
        """The running machine's facts (asked once per device); raises
        :class:`TensorRTUnavailable` naming what is missing."""
        if device not in self._facts:
            self._facts[device] = self._ask_facts(device)
        return self._facts[device]

    def _ask_facts(self, device: int) -> DeviceFacts:
        trt, cudart = self.tensorrt(), self.cudart()
        ok = cudart.cudaError_t.cudaSuccess
        err, count = cudart.cudaGetDeviceCount()
        if err != ok and (problem := driver_problem(cudart, err)):
            raise TensorRTUnavailable(problem)
        if err != ok or count <= device:
            why = cuda_error(cudart, err) if err != ok else "the CUDA driver sees no device"
            raise TensorRTUnavailable(NO_GPU.format(why=why))
        err, prop = cudart.cudaGetDeviceProperties(device)
        if err != ok:
            raise TensorRTUnavailable(NO_GPU.format(why=cuda_error(cudart, err)))
        name = prop.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
        return DeviceFacts(str(name).strip(), f"{prop.major}.{prop.minor}", str(trt.__version__))


_ENVIRONMENT = TensorRTEnvironment()


def set_environment(env: TensorRTEnvironment) -> TensorRTEnvironment:
    """Install ``env`` as the one source of TensorRT, CUDA and device facts; returns the
    previous one (tests put it back)."""
    global _ENVIRONMENT
    previous, _ENVIRONMENT = _ENVIRONMENT, env
    return previous


def environment() -> TensorRTEnvironment:
    return _ENVIRONMENT


def import_tensorrt():
    return _ENVIRONMENT.tensorrt()


def import_cudart():
    return _ENVIRONMENT.cudart()


def import_polygraphy():
    return _ENVIRONMENT.polygraphy()


def device_facts(device: int = 0) -> DeviceFacts:
    """The running machine's facts; raises :class:`TensorRTUnavailable` naming what is missing."""
    return _ENVIRONMENT.facts(device)


def cuda_error(cudart, err) -> str:
    try:
        msg = cudart.cudaGetErrorString(err)[1]
        return msg.decode() if isinstance(msg, bytes) else str(msg)
    except Exception:
        return str(err)


def driver_problem(cudart, err) -> str | None:
    """One line naming the driver when it is why CUDA failed with ``err``: none loaded (which
    the runtime also reports as cudaErrorInsufficientDriver), or one that refused
    cuda-python's runtime (cudaErrorInsufficientDriver) or is of an older CUDA major than it:
    the CUDA-major mismatch, with the extra to install. None when the driver is not the cause."""
    ok = cudart.cudaError_t.cudaSuccess
    try:
        derr, driver = cudart.cudaDriverGetVersion()
        rerr, runtime = cudart.cudaRuntimeGetVersion()
        refused = int(err) == CUDA_ERROR_INSUFFICIENT_DRIVER
    except Exception:  # an older binding without these calls: the plain message will do
        return None
    if derr != ok or rerr != ok or not runtime:
        return None
    if not driver:  # cudaDriverGetVersion's 0: no libcuda
        return NO_GPU.format(why="no NVIDIA driver is loaded")
    (dmaj, dmin), (rmaj, _) = cuda_version(driver), cuda_version(runtime)
    if not (refused or dmaj < rmaj) or (dmaj, dmin) >= cuda_version(runtime):
        return None
    if dmaj == rmaj:  # a newer minor than this driver takes
        fix = f"pip install 'cuda-python<{dmaj}.{dmin + 1}' (or upgrade the driver)"
    elif dmaj in TRT_EXTRAS:
        fix = f"install 'ldm-edge[{TRT_EXTRAS[dmaj]}]' in a fresh venv (or upgrade the driver)"
    else:
        fix = f"upgrade the driver (ldm-edge's TensorRT needs CUDA {min(TRT_EXTRAS)} or newer)"
    needs = ".".join(map(str, cuda_version(runtime)))
    return OLD_DRIVER.format(runtime=_cuda_python(), has=f"{dmaj}.{dmin}", needs=needs, fix=fix)


def cuda_version(encoded: int) -> tuple[int, int]:
    """(major, minor) of CUDA's encoded version (1000 * major + 10 * minor: 12060 is 12.6)."""
    return int(encoded) // 1000, int(encoded) % 1000 // 10


def _cuda_python() -> str:
    """``cuda-python X.Y.Z`` as installed (just ``cuda-python`` when pip has no record)."""
    from importlib import metadata

    for dist in ("cuda-python", "cuda-bindings"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return "cuda-python"


def version_major(version: str) -> int:
    m = re.match(r"(\d+)", str(version))
    return int(m.group(1)) if m else 0


# -- naming -------------------------------------------------------------------------------------
def engine_dir_name(facts: DeviceFacts) -> str:
    """``engines/<gpu-name>-sm<cc>-trt<version>``: one folder per machine kind."""
    slug = re.sub(r"[^a-z0-9]+", "-", facts.device_name.lower()).strip("-") or "gpu"
    version = re.sub(r"[^0-9A-Za-z.]+", "-", facts.trt_version)
    return f"{slug}-{facts.sm}-trt{version}"


def profile_hash(profile: dict) -> str:
    """12 hex digits naming a shape profile (min/opt/max per input), independent of key order."""
    text = json.dumps(profile, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def engine_path(facts: DeviceFacts, component: str, precision: str, profile: dict) -> str:
    """The bundle-relative path of one engine (posix separators, as the manifest stores it)."""
    return (f"{ENGINES_DIR}/{engine_dir_name(facts)}/"
            f"{component}.{precision}.{profile_hash(profile)}.plan")


# -- choosing -----------------------------------------------------------------------------------
_RECORD_KEYS = ("backend", "precision", "trt_version", "device_name", "compute_capability",
                "profile", "onnx_sha256", "file", "size", "sha256")


def record_facts(record: dict) -> DeviceFacts:
    return DeviceFacts(str(record["device_name"]), str(record["compute_capability"]),
                       str(record["trt_version"]))


def rebuild_hint(bundle: str, precision: str) -> str:
    return f"`ldm-export engines {bundle} --precision {precision}`"


def tensorrt_records(component_record, precision: str) -> list[dict]:
    """This component's TensorRT engine records of ``precision`` (malformed ones refused), as
    JSON; ``component_record`` is a schema ComponentRecord (or its JSON)."""
    out = []
    engines = component_record.engine_dicts() if hasattr(component_record, "engine_dicts") \
        else component_record.get("engines") or []
    for rec in engines:
        if not isinstance(rec, dict) or rec.get("backend") != ENGINE_BACKEND:
            continue
        missing = [k for k in _RECORD_KEYS if k not in rec]
        if missing:
            raise BundleError(f"a TensorRT engine record lacks {', '.join(missing)}; "
                              f"rebuild the engines with `ldm-export engines`")
        if rec["precision"] == precision:
            out.append(rec)
    return out


def select_engine(records: list[dict], facts: DeviceFacts, *, component: str, precision: str,
                  onnx_sha256: str | None, bundle: str = "BUNDLE") -> dict:
    """The engine record that runs here, or a one-line :class:`BundleError` saying how to rebuild.

    ``records`` are this component's TensorRT records of ``precision``. Several may fit (one per
    shape profile); the one accepting the largest shapes wins, the latest on a tie.
    """
    hint = rebuild_hint(bundle, precision)
    if not records:
        raise BundleError(f"{component} has no {precision} TensorRT engine in this bundle; build "
                          f"one here with {hint}, or use --backend onnxruntime")
    here = [r for r in records if record_facts(r) == facts]
    if not here:
        built = sorted({str(record_facts(r)) for r in records})
        more = f" and {len(built) - 2} more" if len(built) > 2 else ""
        raise BundleError(f"{component}: the {precision} TensorRT engines in this bundle are for "
                          f"{', '.join(built[:2])}{more}, not this {facts}; rebuild them here "
                          f"with {hint}")
    fresh = [r for r in here if onnx_sha256 is None or r["onnx_sha256"] == onnx_sha256]
    if not fresh:
        raise BundleError(f"{component}: the {precision} TensorRT engine was built from an "
                          f"older ONNX graph (sha256 differs from the manifest's); rebuild it "
                          f"with {hint}")
    widest = max(range(len(fresh)), key=lambda i: (profile_volume(fresh[i]["profile"]), i))
    return fresh[widest]


def variant_sha256(variant_record: dict) -> str | None:
    """The recorded sha256 of a variant's main ONNX file (None when the manifest has none)."""
    for f in variant_record.get("files") or []:
        if isinstance(f, dict) and f.get("path") == variant_record.get("file"):
            return f.get("sha256")
    return None


def profile_volume(profile: dict) -> float:
    """Sum over inputs of the elements at the profile's max shape (a size to rank profiles)."""
    return float(sum(math.prod(v["max"]) for v in profile.values()))


def profile_violation(profile: dict, name: str, shape: tuple) -> str | None:
    """Why ``shape`` does not fit the engine's profile for input ``name`` (None when it fits)."""
    p = profile.get(name)
    if p is None or len(shape) != len(p["min"]):
        return None  # fixed-shape input, or a wrong rank: the spec check names those
    lo, hi = list(p["min"]), list(p["max"])
    if any(not a <= n <= b for n, a, b in zip(shape, lo, hi)):
        return f"shape {list(shape)} is outside the engine's profile {lo}..{hi}"
    return None


def narrow_spec(spec: ComponentSpec, profile: dict, io_map: dict | None = None) -> ComponentSpec:
    """``spec`` with each symbolic dim's range cut to what the engine's profile accepts, so the
    pipeline sizes its calls to the engine (it splits a guided batch an engine cannot take)."""
    io_map = io_map or {}
    ranges = {k: tuple(v) for k, v in spec.ranges.items()}
    for t in spec.inputs:
        p = profile.get(io_map.get(t.name, t.name))
        for i, d in enumerate(t.shape if p else ()):
            if isinstance(d, str):
                lo, hi = ranges.get(d, (p["min"][i], p["max"][i]))
                ranges[d] = (max(lo, p["min"][i]), min(hi, p["max"][i]))
    return dataclasses.replace(spec, ranges=ranges)
