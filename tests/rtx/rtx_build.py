"""A real TensorRT parser and builder on the CPU, for the tests (never a user path).

PyPI's ``onnxruntime-ep-nv-tensorrt-rtx-cu12`` 0.5.0 (the ``test`` extra installs it on linux
x86_64) bundles TensorRT-RTX 1.7.1 and its ONNX parser as an onnxruntime plugin. Given a target
SM it compiles a graph ahead of time into an EPContext model holding a real TensorRT-RTX plan,
with no GPU and no driver. On Linux that needs, in a folder of its own (``prepare``):

* ``libcudart.so.12`` resolvable (the wheel ships only the versioned file), and stub
  ``libcuda.so.1`` / ``libnvidia-ml.so.1`` whose every call answers "no device" / "driver not
  loaded" (built here with gcc from the C below);
* a copy of the plugin library with its driver-less ("virtual device") path opened: the build
  keeps it behind a Windows-sandbox flag that is compiled false on Linux; three bytes flip it
  (``PATCH_OFFSETS``), in the pinned build only (``PLUGIN_SHA256``).

Each compile runs in a child process (rtx_child.py), so a crash in the plugin fails a test
instead of killing pytest. What is missing here (not linux x86_64, plugin absent or another
build, onnxruntime too old, no gcc) raises ``Unavailable`` with the reason: the tier skips.
TensorRT-RTX is not TensorRT: this checks parsing, Q/DQ placement, profiles and the build of
the graphs ``ldm-export engines`` hands TensorRT; it runs nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

PLUGIN_PACKAGE = "onnxruntime_ep_nv_tensorrt_rtx"
PLUGIN_LIBRARY = "libonnxruntime_providers_nv_tensorrt_rtx.so"
PLUGIN_DIST = "onnxruntime-ep-nv-tensorrt-rtx-cu12==0.5.0"
# The plugin library of the 0.5.0 cu12 manylinux x86_64 wheel: the only build whose bytes
# PATCH_OFFSETS were read from (any other build skips the tier rather than be patched blind).
PLUGIN_SHA256 = "861d7dae9e13c39c295a054caff8a5d0e52118d31bb5d60a2e23c8b1a3f13e21"
# `movb $0x0` -> `movb $0x1` where that build stores its "in a Windows sandbox" flag: true,
# it enumerates virtual devices for nv_target_sm instead of asking the (absent) driver.
PATCH_OFFSETS = (0xF368F, 0xF7CC2, 0xF88D2)
PATCH_FROM, PATCH_TO = b"\xc6\x00\x00", b"\xc6\x00\x01"
# TensorRT-RTX's ahead-of-time targets are sm86, sm89, sm120 and sm121; sm89 (Ada) is the
# oldest RTX architecture it supports with INT8 and FP8 alike.
DEFAULT_SM = "sm89"
# CreateEnvWithOptions with config entries and the plugin EP ABI arrived in onnxruntime 1.24.
MIN_ONNXRUNTIME = (1, 24)
# The slowest graph of the tier, a tiny U-Net, builds in 4-11 s on a 2-core AMD EPYC (12 s for
# an INT32-bias INT8 U-Net); a child silent for 10x that is hung, not slow.
JOB_TIMEOUT_S = 120
# Builds are single-threaded in the main: this project's machines have 2 cores.
WORKERS = max(1, min(2, os.cpu_count() or 1))
CHILD = Path(__file__).with_name("rtx_child.py")
CUDA_STUB = """
#define NO_DEVICE 100 /* CUDA_ERROR_NO_DEVICE */
#define F(name) int name(void) { return NO_DEVICE; }
F(cuInit) F(cuCtxCreate_v4) F(cuCtxDestroy_v2) F(cuCtxGetCurrent) F(cuCtxPopCurrent_v2)
F(cuCtxPushCurrent_v2) F(cuCtxSetCurrent) F(cuStreamGetCtx) F(cuImportExternalMemory)
F(cuDestroyExternalMemory) F(cuExternalMemoryGetMappedBuffer) F(cuImportExternalSemaphore)
F(cuDestroyExternalSemaphore) F(cuSignalExternalSemaphoresAsync)
F(cuWaitExternalSemaphoresAsync) F(cuFuncSetAttribute) F(cuLaunchKernel)
F(cuModuleGetFunction) F(cuModuleLoadData) F(cuModuleUnload)
int cuGetErrorString(int e, const char **s) { *s = "no CUDA device (stub driver)"; return 0; }
int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuDriverGetVersion(int *v) { *v = 0; return NO_DEVICE; }
int cuDeviceGetCount(int *n) { *n = 0; return NO_DEVICE; }
"""
NVML_STUB = """
#define DRIVER_NOT_LOADED 9 /* NVML_ERROR_DRIVER_NOT_LOADED */
int nvmlInit_v2(void) { return DRIVER_NOT_LOADED; }
int nvmlShutdown(void) { return DRIVER_NOT_LOADED; }
int nvmlSystemGetDriverVersion(char *v, unsigned n) { if (n) v[0] = 0; return DRIVER_NOT_LOADED; }
const char *nvmlErrorString(int e) { return "NVML: driver not loaded (stub)"; }
"""
STUBS = {"libcuda.so.1": CUDA_STUB, "libnvidia-ml.so.1": NVML_STUB}


class Unavailable(Exception):
    """A part the tier needs is missing here; the message says which (the skip reason)."""


class ChildFailed(AssertionError):
    """The child could not start compiling at all (its last lines say why)."""


@dataclass(frozen=True)
class Toolchain:
    lib_dir: Path  # the patched plugin, links to the wheel's libraries, the stubs
    sm: str = DEFAULT_SM

    @property
    def plugin(self) -> Path:
        return self.lib_dir / PLUGIN_LIBRARY


@dataclass(frozen=True)
class Job:
    onnx: Path
    profile: dict  # graph input -> {"min", "opt", "max"}: export/engines.py shape_profile
    label: str = ""


class BuildResult(NamedTuple):
    ok: bool
    error: str | None  # the parser's / builder's own words, or how the child died
    plan_bytes: int  # the TensorRT-RTX plan(s) in the EPContext model
    seconds: float
    label: str = ""


# -- the toolchain -----------------------------------------------------------------------------
def toolchain(work: Path, sm: str = DEFAULT_SM) -> Toolchain:
    """Check every part, then lay out ``work`` (a fresh folder) for the child processes."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise Unavailable(f"the pinned TensorRT-RTX plugin build is linux x86_64 only "
                          f"(this is {sys.platform} {platform.machine()})")
    import onnxruntime

    if tuple(int(p) for p in onnxruntime.__version__.split(".")[:2]) < MIN_ONNXRUNTIME:
        raise Unavailable(f"onnxruntime {onnxruntime.__version__} is older than 1.24, the "
                          f"plugin EP ABI's floor")
    plugin = find_plugin()
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    if digest != PLUGIN_SHA256:
        raise Unavailable(f"{plugin.name} is not the pinned {PLUGIN_DIST} build (sha256 "
                          f"{digest[:12]}…, pinned {PLUGIN_SHA256[:12]}…); its patch fits "
                          f"that build only")
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise Unavailable("no C compiler (gcc) to build the stub libcuda.so.1 and "
                          "libnvidia-ml.so.1 the plugin needs to load")
    prepare(plugin.parent, Path(work), compiler)
    return Toolchain(Path(work), sm)


def find_plugin() -> Path:
    """The installed plugin library, found without importing its package (importing it
    rewrites links in its own folder)."""
    spec = importlib.util.find_spec(PLUGIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable(f"{PLUGIN_DIST} is not installed (`pip install -e '.[test]'` on "
                          f"linux x86_64 installs it)")
    plugin = Path(next(iter(spec.submodule_search_locations))) / PLUGIN_LIBRARY
    if not plugin.is_file():
        raise Unavailable(f"{PLUGIN_DIST} is installed without {PLUGIN_LIBRARY}")
    return plugin


def prepare(wheel_dir: Path, work: Path, compiler: str) -> None:
    """``work``: the patched plugin, links to the wheel's other libraries under their
    versioned, soname and bare names, and the two stub libraries."""
    work.mkdir(parents=True, exist_ok=True)
    for lib in sorted(wheel_dir.glob("lib*.so*")):
        if lib.name != PLUGIN_LIBRARY:
            for name in _names(lib.name):
                if not (work / name).exists():
                    (work / name).symlink_to(lib)
    data = bytearray((wheel_dir / PLUGIN_LIBRARY).read_bytes())
    for off in PATCH_OFFSETS:
        if data[off:off + len(PATCH_FROM)] != PATCH_FROM:
            raise AssertionError(f"{PLUGIN_LIBRARY} at {off:#x}: not the pinned build's bytes")
        data[off:off + len(PATCH_TO)] = PATCH_TO
    (work / PLUGIN_LIBRARY).write_bytes(bytes(data))
    for name, source in STUBS.items():
        src = work / f"{name}.c"
        src.write_text(source)
        r = subprocess.run([compiler, "-shared", "-fPIC", "-O1", f"-Wl,-soname,{name}",
                            "-o", str(work / name), str(src)], capture_output=True, text=True,
                           check=False)
        if r.returncode:
            raise AssertionError(f"{compiler} could not build {name}: {r.stderr[-500:]}")


def _names(filename: str) -> list[str]:
    """libx.so.12.9.79 -> itself, libx.so.12 (its soname) and libx.so (what dlopen asks)."""
    m = re.fullmatch(r"(lib.+?\.so)\.(\d+)(\..+)?", filename)
    return [filename] if not m else list(dict.fromkeys([filename, f"{m[1]}.{m[2]}", m[1]]))


# -- compiling ---------------------------------------------------------------------------------
def compile_graph(tc: Toolchain, onnx_path, profile: dict, out_dir: Path,
                  label: str = "") -> BuildResult:
    return compile_graphs(tc, [Job(Path(onnx_path), profile, label)], out_dir)[0]


def compile_graphs(tc: Toolchain, jobs: list[Job], out_dir: Path,
                   workers: int = WORKERS) -> list[BuildResult]:
    """Each job compiled for ``tc.sm`` with its profile; results in the jobs' order. Jobs are
    shared between ``workers`` child processes, largest graph first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[BuildResult | None] = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].onnx.stat().st_size)
    groups: list[list[int]] = [[] for _ in range(max(1, min(workers, len(jobs))))]
    for n, i in enumerate(order):
        groups[n % len(groups)].append(i)
    errors: list[BaseException] = []

    def work(group: list[int]) -> None:
        try:
            for i, r in zip(group, _run_children(tc, [jobs[i] for i in group], out_dir)):
                results[i] = r
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _run_children(tc: Toolchain, jobs: list[Job], out_dir: Path) -> list[BuildResult]:
    """Run ``jobs`` in child processes, one child after another: when a child dies, the job
    it was on fails with its last lines and the rest go to a new child."""
    done: list[BuildResult] = []
    while len(done) < len(jobs):
        todo = jobs[len(done):]
        outs = [out_dir / f"{os.getpid()}-{threading.get_ident()}-{len(done) + k}.ctx.onnx"
                for k in range(len(todo))]
        ready, lines, died = _child(tc, todo, outs)
        for line, job, out in zip(lines, todo, outs):
            done.append(_result(job, json.loads(line), out))
        if died:
            if not ready:
                raise ChildFailed(f"the TensorRT-RTX child could not set up: {died}")
            if len(lines) == len(todo):
                raise ChildFailed(f"the TensorRT-RTX child died after its last graph: {died}")
            job = todo[len(lines)]
            done.append(BuildResult(False, f"the child died compiling {job.onnx.name}: {died}",
                                    0, 0.0, job.label))
    return done


def _child(tc: Toolchain, jobs: list[Job],
           outs: list[Path]) -> tuple[bool, list[str], str | None]:
    """One child over ``jobs``: whether it set up, its RESULT lines, and how it died (None
    when it did not). A child silent for JOB_TIMEOUT_S is killed."""
    request = {"plugin": str(tc.plugin), "sm": tc.sm,
               "jobs": [{"onnx": str(j.onnx), "out": str(o), "profile": _checked(j.profile)}
                        for j, o in zip(jobs, outs)]}
    req = outs[0].with_suffix(".request.json")
    req.write_text(json.dumps(request))
    paths = [str(tc.lib_dir), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(paths)}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(CHILD), str(req)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        out, died = [], None
        while (line := _next(lines)) is not None:
            if line is TimeoutError:
                proc.kill()
                died = f"no result within {JOB_TIMEOUT_S} s"
                break
            out.append(line)
        code = proc.wait()
        died = died or (f"exit status {code}" if code else None)
        err.seek(0)
        tail = "\n".join((("\n".join(out)) + "\n" + err.read()).strip().splitlines()[-12:])
    results = [ln[len("RESULT "):] for ln in out if ln.startswith("RESULT ")]
    return "READY" in out, results, (f"{died}; its last lines:\n{tail}" if died else None)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _next(lines: queue.Queue):
    """The child's next line, None at its end, TimeoutError when it fell silent."""
    try:
        return lines.get(timeout=JOB_TIMEOUT_S)
    except queue.Empty:
        return TimeoutError


def _checked(profile: dict) -> dict:
    for name in profile:
        if any(c in name for c in ",:"):  # the plugin's shape option format: "in:1x4x8x8,..."
            raise ValueError(f"input name {name!r} cannot be written in nv_profile_*_shapes")
    return profile


def _result(job: Job, r: dict, out: Path) -> BuildResult:
    """ok: compiled without error, every node of the output an EPContext holding a plan
    (nothing left for onnxruntime to run), no ERROR in the parser's or builder's log."""
    errors = [_clean(line[2:]) for line in r["log"] if line.startswith("E ")]
    errors = [e for e in errors if e and not re.search(r"--- (Begin|End) node ---", e)]
    problem = r["status"] or _profile_problem(job)
    if job.profile and any("No explicit optimization profile" in line for line in r["log"]):
        problem = problem or "the plugin built without the profile it was given"
    plan_bytes = 0
    if problem is None:
        plans, others = _contexts(out)
        plan_bytes = sum(len(p) for p in plans)
        if others:
            problem = (f"{len(others)} node(s) left outside TensorRT: "
                       + ", ".join(others[:5]))
        elif not plans or not all(p.startswith(b"vtrt") for p in plans):
            problem = "the EPContext model holds no TensorRT-RTX plan"
    out.unlink(missing_ok=True)
    detail = " | ".join(errors)
    error = None
    if problem or errors:
        error = "; ".join(x for x in (detail, problem) if x)[:1500]
    return BuildResult(error is None, error, plan_bytes, r["seconds"], job.label)


def _profile_problem(job: Job) -> str | None:
    """Why ``job.profile`` does not fit its graph's inputs (the plugin ignores names it does
    not know and fixed dimensions, and falls back to a profile of its own), or None."""
    import onnx

    graph = onnx.load(str(job.onnx), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    inputs = {i.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in i.type.tensor_type.shape.dim]
              for i in graph.input if i.name not in inits}
    for name, shapes in job.profile.items():
        if name not in inputs:
            return f"the profile names {name!r}, not an input of {job.onnx.name}"
        dims = inputs[name]
        for key in ("min", "opt", "max"):
            shape = shapes[key]
            if len(shape) != len(dims) or any(d not in (None, s) for d, s in zip(dims, shape)):
                return f"profile {key} {shape} of {name!r} does not fit its shape {dims}"
    loose = [n for n, dims in inputs.items() if None in dims and n not in job.profile]
    if job.profile and loose:
        return f"dynamic input(s) {', '.join(loose)} left out of the profile"
    return None


def _clean(message: str) -> str:
    """TensorRT's log line without its timestamp and severity."""
    return " ".join(re.sub(r"^\[[^\]]*ERROR\]\s*", "", message).split())


def _contexts(out: Path) -> tuple[list[bytes], list[str]]:
    """The plans of the EPContext nodes of ``out``, and the other nodes ("Op 'name'")."""
    import onnx

    graph = onnx.load(str(out), load_external_data=False).graph
    plans, others = [], []
    for node in graph.node:
        if node.op_type == "EPContext":
            plans += [a.s for a in node.attribute if a.name == "ep_cache_context"]
        else:
            others.append(f"{node.op_type} {node.name!r}")
    return plans, others
