"""The child process of the TensorRT-RTX tier (rtx_build.py starts it): compiles ONNX graphs
into EPContext models with the NvTensorRTRTX plugin, ahead of time for a target SM, no GPU.

Run as ``python rtx_child.py JOBS.json`` with LD_LIBRARY_PATH at the prepared library folder
(rtx_build.prepare). JOBS.json: {"plugin": path, "sm": "sm89", "jobs": [{"onnx": path,
"out": path, "profile": {input: {"min", "opt", "max"}}}, ...]}. Once set up it prints
``READY``; then, for each job, one line ``RESULT {json}`` (status, log lines, seconds) as
soon as the job ends, so a crash is pinned to the job it happened in.

Python's onnxruntime binding (1.32 too) cannot pass environment config entries, and the
plugin lists its driver-less ("virtual") device only when ``allow_virtual_devices`` and
``ep_factory.<EP>.nv_target_sm`` reach OrtEnvCreationOptions.config_entries. So this talks to
onnxruntime's C API through ctypes: the OrtApi is a table of function pointers whose slots
never move once released (new functions are appended), and the indices below are positions
in ``struct OrtApi`` of onnxruntime_c_api.h (all from releases <= 1.24, the plugin's floor).
``check_table`` verifies a few of them by what they answer before anything else is called.
"""

from __future__ import annotations

import ctypes as C
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

EP_NAME = "NvTensorRTRTXExecutionProvider"
P = C.c_void_p
# OrtApi slots (position in struct OrtApi; fixed since the release that added each)
GET_ERROR_MESSAGE = 2
CREATE_SESSION_OPTIONS = 10
SET_GRAPH_OPTIMIZATION_LEVEL = 23
GET_BUILD_INFO_STRING = 254
GET_COMPILE_API = 294
CREATE_KEY_VALUE_PAIRS = 295
ADD_KEY_VALUE_PAIR = 296
REGISTER_EP_LIBRARY = 301
GET_EP_DEVICES = 303
APPEND_EP_V2 = 304
EP_DEVICE_EP_NAME = 312
CREATE_ENV_WITH_OPTIONS = 406
# OrtCompileApi slots (struct OrtCompileApi)
COMPILE_OPTIONS_FROM_SESSION = 1
COMPILE_SET_INPUT_PATH = 2
COMPILE_SET_OUTPUT_PATH = 4
COMPILE_SET_EMBED_MODE = 7
COMPILE_MODEL = 8
COMPILE_SET_FLAGS = 9
ERROR_IF_NO_NODES_COMPILED = 1  # OrtCompileApiFlags: a graph the EP refuses is an error
DISABLE_ALL_OPTIMIZATIONS = 0  # GraphOptimizationLevel: the plugin gets the graph as written
LOG_WARNING = 2  # OrtLoggingLevel: what the log callback receives (warnings and errors)
# a graph file name: the child aborts instead of compiling it (tests of the harness only)
ABORT_ON = "RTX_CHILD_ABORT_ON"
LOG_CALLBACK = C.CFUNCTYPE(None, P, C.c_int, C.c_char_p, C.c_char_p, C.c_char_p, C.c_char_p)


class EnvCreationOptions(C.Structure):
    """OrtEnvCreationOptions (onnxruntime >= 1.24)."""

    _fields_ = [("version", C.c_uint32), ("logging_severity_level", C.c_int32),
                ("log_id", C.c_char_p), ("custom_logging_function", LOG_CALLBACK),
                ("custom_logging_param", P), ("threading_options", P), ("config_entries", P)]


class Api:
    """Typed access to one function table (OrtApi or OrtCompileApi)."""

    def __init__(self, table: int, error_message=None):
        self.table = C.cast(table, C.POINTER(P))
        self.error_message = error_message or self.fn(GET_ERROR_MESSAGE, C.c_char_p, P)

    def fn(self, slot: int, restype, *argtypes):
        return C.CFUNCTYPE(restype, *argtypes)(self.table[slot])

    def call(self, slot: int, *args):
        """Call a function that returns an OrtStatus*; raise with its message if any."""
        status = self.fn(slot, P, *[P] * len(args))(*args)
        if status:
            raise RuntimeError(self.error_message(status).decode(errors="replace"))


def open_api() -> tuple[Api, int]:
    """onnxruntime's shared library (not its Python binding), its OrtApi and API version."""
    spec = importlib.util.find_spec("onnxruntime")
    capi = Path(spec.origin).parent / "capi"
    lib = C.CDLL(str(max(capi.glob("libonnxruntime.so.1.*"))))
    lib.OrtGetApiBase.restype = P
    base = C.cast(lib.OrtGetApiBase(), C.POINTER(P))
    version = C.CFUNCTYPE(C.c_char_p)(base[1])().decode()
    api_version = int(version.split(".")[1])
    return Api(C.CFUNCTYPE(P, C.c_uint32)(base[0])(api_version)), api_version


def check_table(api: Api) -> None:
    """The slots this file uses answer as the functions they are said to be."""
    info = api.fn(GET_BUILD_INFO_STRING, C.c_char_p)()
    if not info.startswith(b"ORT Build Info"):
        raise RuntimeError(f"OrtApi slot {GET_BUILD_INFO_STRING} is not GetBuildInfoString")
    try:
        api.call(CREATE_ENV_WITH_OPTIONS, None, C.byref(P()))
        raise RuntimeError("CreateEnvWithOptions(NULL) succeeded")
    except RuntimeError as e:
        if "CreateEnvWithOptions" not in str(e):
            raise RuntimeError(f"OrtApi slot {CREATE_ENV_WITH_OPTIONS} is not "
                               f"CreateEnvWithOptions ({e})") from None


def create_env(api: Api, api_version: int, sm: str, log) -> P:
    """An OrtEnv whose config entries let the plugin offer its virtual device for ``sm``."""
    entries = P()
    api.fn(CREATE_KEY_VALUE_PAIRS, None, C.POINTER(P))(C.byref(entries))
    add = api.fn(ADD_KEY_VALUE_PAIR, None, P, C.c_char_p, C.c_char_p)
    add(entries, f"ep_factory.{EP_NAME}.nv_target_sm".encode(), sm.encode())
    add(entries, b"allow_virtual_devices", b"1")
    opts = EnvCreationOptions(api_version, LOG_WARNING, b"rtx-tier", log, None, None, entries)
    env = P()
    api.call(CREATE_ENV_WITH_OPTIONS, C.byref(opts), C.byref(env))
    return env


def plugin_device(api: Api, env: P, plugin: str) -> P:
    api.call(REGISTER_EP_LIBRARY, env, EP_NAME.encode(), plugin.encode())
    devices, n = C.POINTER(P)(), C.c_size_t()
    api.call(GET_EP_DEVICES, env, C.byref(devices), C.byref(n))
    name = api.fn(EP_DEVICE_EP_NAME, C.c_char_p, P)
    found = [devices[i] for i in range(n.value) if name(devices[i]) == EP_NAME.encode()]
    if not found:
        raise RuntimeError(f"the plugin lists no {EP_NAME} device (its virtual-device path "
                           f"is closed: unpatched library or missing env entries)")
    return P(found[0])


def session_options(api: Api, env: P, device: P, profile: dict) -> P:
    options = P()
    api.call(CREATE_SESSION_OPTIONS, C.byref(options))
    api.fn(SET_GRAPH_OPTIMIZATION_LEVEL, P, P, C.c_int)(options, DISABLE_ALL_OPTIMIZATIONS)
    pairs = {}  # the target SM comes with the device (the env entry)
    if profile:
        for key in ("min", "opt", "max"):
            pairs[f"nv_profile_{key}_shapes"] = ",".join(
                f"{name}:{'x'.join(str(d) for d in shapes[key])}"
                for name, shapes in profile.items())
    keys = (C.c_char_p * len(pairs))(*[k.encode() for k in pairs])
    vals = (C.c_char_p * len(pairs))(*[v.encode() for v in pairs.values()])
    devices = (P * 1)(device)
    api.call(APPEND_EP_V2, options, env, devices, 1, keys, vals, len(pairs))
    return options


def compile_one(api: Api, compile_api: Api, env: P, options: P, job: dict) -> None:
    copts = P()
    compile_api.call(COMPILE_OPTIONS_FROM_SESSION, env, options, C.byref(copts))
    compile_api.call(COMPILE_SET_INPUT_PATH, copts, C.c_char_p(job["onnx"].encode()))
    compile_api.call(COMPILE_SET_OUTPUT_PATH, copts, C.c_char_p(job["out"].encode()))
    compile_api.fn(COMPILE_SET_EMBED_MODE, P, P, C.c_bool)(copts, True)
    compile_api.fn(COMPILE_SET_FLAGS, P, P, C.c_uint32)(copts, ERROR_IF_NO_NODES_COMPILED)
    compile_api.call(COMPILE_MODEL, env, copts)


def main(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    log_lines: list[str] = []

    def on_log(param, severity, category, logid, where, message):
        level = "VIWEF"[severity] if 0 <= severity < len("VIWEF") else "?"
        log_lines.append(f"{level} {message.decode(errors='replace')}")

    log = LOG_CALLBACK(on_log)  # kept alive for the whole run
    api, api_version = open_api()
    check_table(api)
    env = create_env(api, api_version, request["sm"], log)
    device = plugin_device(api, env, request["plugin"])
    compile_api = Api(api.fn(GET_COMPILE_API, P)(), api.error_message)
    print("READY", flush=True)  # set up: a death after this is a job's
    abort_on = os.environ.get(ABORT_ON)
    for job in request["jobs"]:
        if abort_on and Path(job["onnx"]).name == abort_on:
            os.abort()  # the tier's own test of a child that dies mid-run
        del log_lines[:]
        t0 = time.perf_counter()
        status = None
        try:
            options = session_options(api, env, device, job["profile"])
            compile_one(api, compile_api, env, options, job)
        except RuntimeError as e:
            status = str(e)
        result = {"onnx": job["onnx"], "status": status, "log": list(log_lines),
                  "seconds": round(time.perf_counter() - t0, 3)}
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
