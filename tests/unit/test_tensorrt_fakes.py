"""The TensorRT build and run code paths against fakes of Polygraphy, TensorRT and cuda-python.

Not a substitute for tests/gpu/test_tensorrt.py: the fakes implement only the calls this
project makes (with the signatures read from TensorRT 10.3 / 11 and Polygraphy's sources), so
these tests check our side — records, names, buffers, binding, the shared scratch area,
clean-up and one-line errors — on machines without a GPU.

The fakes are as strict as the real thing where it matters: every Polygraphy call is bound to
the installed Polygraphy's own signature (a misspelt keyword fails), an execution context
refuses input shapes outside the profile its engine was built with (set_input_shape returns
False, as TensorRT's does), and the fakes are installed as the one TensorRT environment
(``trt_engines.set_environment``), which every module asks.

The fake ``tensorrt`` module and every object it hands out are held to the real API surface
of the TensorRT release they claim to be (tests/trt_surface.py, recorded from NVIDIA's
bindings wheels in tests/data/tensorrt_api.json): a name, keyword or arity that release does
not have fails as the bindings fail, enums are enum members, and the key tests run against
both the floor (10.3, JetPack 6.1) and the newest 11.x. A refusal the code under test
swallows still fails the test (``no_refusals``).
"""

from __future__ import annotations

import ctypes
import inspect
import json
import shutil
import sys
import types

import numpy as np
import pytest
import trt_surface
from trt_surface import FLOOR, member

from ldm_edge.export import engines
from ldm_edge.export.engines import EngineBuildError, ProfileOptions, build_engines
from ldm_edge.runtime.backends import tensorrt as backend_tensorrt
from ldm_edge.runtime.backends import trt_engines
from ldm_edge.runtime.errors import BundleError, UsageError
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.backends.trt_engines import DeviceFacts
# taken at import time, before any fake is installed: the environment must reach these too
from ldm_edge.runtime.backends.trt_engines import device_facts as captured_device_facts
from ldm_edge.runtime.backends.trt_engines import import_tensorrt as captured_import_tensorrt

try:  # the real signatures the Polygraphy fakes are bound to
    from polygraphy.backend import common as REAL_COMMON
    from polygraphy.backend import trt as REAL_POLY
    from polygraphy.logger import G_LOGGER as REAL_LOGGER
except ImportError:
    REAL_POLY = REAL_LOGGER = REAL_COMMON = None
    print("Polygraphy is not installed: the Polygraphy fakes record calls without binding them "
          "to its signatures (pip install 'polygraphy>=0.49.24')")

FACTS = DeviceFacts("Fake GPU", "8.7", FLOOR)
# the releases the key tests run against: the floor and the newest 11.x recorded
VERSIONS = (FLOOR, trt_surface.newest(11))
MEMORY = {"unet": 4096, "text_encoder": 1024}  # scratch bytes each fake engine asks for


class FakeCudart:
    """Device memory as bytearrays keyed by fake pointers."""

    class cudaError_t:
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.mem, self.next, self.mallocs, self.uploads = {}, 1 << 20, 0, 0

    def cudaGetErrorString(self, err):
        return 0, b"fake error"

    def cudaMalloc(self, n):
        ptr, self.next = self.next, self.next + ((n + 511) // 256) * 256
        self.mem[ptr] = bytearray(n)
        self.mallocs += 1
        return 0, ptr

    def cudaFree(self, ptr):
        del self.mem[ptr]
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.mem[dst][:n] = ctypes.string_at(src, n)
            self.uploads += 1
        else:
            ctypes.memmove(dst, bytes(self.mem[src][:n]), n)
        return (0,)

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(bytes(self.mem[ptr][:n]), dtype=dtype).reshape(shape)


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addr, self.memory = engine, {}, {}, None

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def set_input_shape(self, name, shape):
        """False, as TensorRT returns, for a shape outside the engine's optimisation profile."""
        lo, hi = self.engine.profile.get(name, (None, None))
        if lo is not None and (len(shape) != len(lo) or
                               any(not a <= n <= b for n, a, b in zip(shape, lo, hi))):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        return True

    def get_tensor_shape(self, name):
        first = self.shapes[self.engine.inputs[0][0]]
        return first + (32,) if self.engine.kind == "text_encoder" else first

    def execute_async_v3(self, stream_handle):
        assert stream_handle == 7 and self.memory is not None
        rt, e = self.engine.cudart, self.engine
        x = {n: rt.read(self.addr[n], self.shapes[n], dt) for n, dt in e.inputs}
        if e.kind == "unet":  # a "U-Net" whose output checks every input arrived
            y = (2 * x["sample"] + x["timestep"][:, None, None, None]
                 + x["encoder_hidden_states"].mean(axis=(1, 2))[:, None, None, None])
        else:
            y = np.repeat(x["input_ids"][..., None].astype(np.float32), 32, axis=-1)
        out = e.outputs[0][0]
        rt.mem[self.addr[out]][:y.nbytes] = np.ascontiguousarray(y, np.float32).tobytes()
        return True


STATIC = member("ExecutionContextAllocationStrategy.STATIC")
USER_MANAGED = member("ExecutionContextAllocationStrategy.USER_MANAGED")


class FakeEngine:
    def __init__(self, kind, cudart, profile):
        self.kind, self.cudart = kind, cudart
        self.profile = profile  # input -> (min shape, max shape), as the plan was built
        self.inputs = ([("sample", np.float32), ("timestep", np.float32),
                        ("encoder_hidden_states", np.float32)] if kind == "unet"
                       else [("input_ids", np.int64)])
        self.outputs = [("model_output" if kind == "unet" else "last_hidden_state", np.float32)]
        self.names = dict(self.inputs + self.outputs)
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = MEMORY[kind]

    def get_tensor_name(self, i):
        return list(self.names)[i]

    def get_tensor_mode(self, name):
        return member("TensorIOMode.INPUT" if name in dict(self.inputs) else "TensorIOMode.OUTPUT")

    def get_tensor_dtype(self, name):
        return TRT_TYPE[np.dtype(self.names[name])]

    def create_execution_context(self, strategy=STATIC):
        assert strategy == USER_MANAGED
        return FakeContext(self)


# what the real bindings' nptype maps (tensorrt/__init__.py); every other DataType (BF16, FP8,
# INT4, FP4, E8M0) is a TypeError
NUMPY_TYPE = {member(f"DataType.{k}"): v for k, v in (
    ("FLOAT", np.float32), ("HALF", np.float16), ("INT8", np.int8), ("INT32", np.int32),
    ("INT64", np.int64), ("BOOL", np.bool_), ("UINT8", np.uint8))}
TRT_TYPE = {np.dtype(v): k for k, v in NUMPY_TYPE.items()}
NO_NUMPY_TYPE = ("BF16", "FP8", "INT4", "FP4", "E8M0")  # those a release has of these


class FakeWeights:
    """``trt.Weights(a)``: a view of the array, not a copy; ValueError, with the bindings' own
    messages (10.3 and 11.4 over stub libraries), for an array TensorRT has no weights type
    for (float64) or one that is not contiguous."""

    def __init__(self, a):
        if not isinstance(a, np.ndarray):
            raise trt_surface.FakeGap("the fake Weights implements only Weights(a: ndarray)")
        if a.dtype not in TRT_TYPE:
            raise ValueError(f"[TRT] [E] Could not implicitly convert NumPy data type: "
                             f"{a.dtype.kind}{8 * a.dtype.itemsize} to TensorRT.")
        if not a.flags["C_CONTIGUOUS"]:
            raise ValueError("Could not convert non-contiguous NumPy array to Weights. Please "
                             "use numpy.ascontiguousarray() to fix this.")
        self.array = a
        self.dtype, self.size, self.nbytes = TRT_TYPE[a.dtype], int(a.size), int(a.nbytes)

    def numpy(self):
        return self.array


MADE: list = []  # every fake tensorrt module made in this test (no_refusals checks them)


def fake_tensorrt(cudart, runtime_fails: bool = False, *, version: str = FLOOR,
                  make_engine=None, **impl):
    """A fake ``tensorrt`` module of release ``version``, held to its recorded API surface.

    ``runtime_fails``: ``Runtime`` fails as the real one does where TensorRT cannot start
    (its factory returns nullptr, which the bindings raise as TypeError). ``make_engine(plan,
    cudart)``: the fake engine a plan deserialises to (default :class:`FakeEngine`); ``impl``:
    more implementations by TensorRT name (``Refitter=...``)."""
    make_engine = make_engine or (lambda plan, rt: FakeEngine(plan["kind"], rt, plan["profile"]))

    class Logger:
        def __init__(self, min_severity=member("ILogger.Severity.WARNING")):
            self.min_severity = min_severity

    class Runtime:
        def __init__(self, logger):
            if runtime_fails:
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def deserialize_cuda_engine(self, serialized_engine):
            """None for bytes that are not a plan, as TensorRT answers."""
            data = bytes(serialized_engine)
            if not data.startswith(b"FAKE:"):
                return None
            return make_engine(json.loads(data[5:]), cudart)

    def nptype(trt_type):
        if trt_type not in NUMPY_TYPE:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return NUMPY_TYPE[trt_type]
    trt = trt_surface.surface(version).module(
        Logger=Logger, Runtime=Runtime, nptype=nptype, Weights=FakeWeights, **impl)
    MADE.append(trt)
    return trt


def take_refusals() -> list:
    """What the guard refused in this test's fake modules (and forget it)."""
    out = [r for trt in MADE for r in trt_surface.refusals(trt)]
    for trt in MADE:
        trt_surface.refusals(trt).clear()
    return out


@pytest.fixture(autouse=True)
def no_refusals():
    """A name, keyword or arity the claimed TensorRT release does not have fails the test even
    where the code under test caught the bindings' TypeError/AttributeError."""
    MADE.clear()
    yield
    assert take_refusals() == []


def bind_real(real, args, kwargs) -> None:
    """Bind a call to the real Polygraphy callable's signature: TypeError where Polygraphy would
    refuse it (a misspelt or removed keyword, a missing argument). ``CreateConfig(**kwargs)``
    hands the rest to its base class, so those are bound there too."""
    if real is None:
        return
    sig = inspect.signature(real)
    bound = sig.bind(*args, **kwargs)
    rest = [p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD]
    if rest and isinstance(real, type) and bound.arguments.get(rest[0]):
        base = next(c for c in real.__mro__[1:] if "__init__" in vars(c))
        bind_real(base, (), bound.arguments[rest[0]])


def real(name):
    if REAL_POLY is None:
        return None
    return getattr(REAL_COMMON if name == "SaveBytes" else REAL_POLY, name)


def plan_bytes(kind: str, profile: dict) -> bytes:
    """A fake plan: the component and the profile it accepts (input -> [min, max])."""
    return b"FAKE:" + json.dumps({"kind": kind, "profile": profile}).encode()


def fake_polygraphy(calls, fail=False):
    class Profile(dict):
        def add(self, name, min, opt, max):
            bind_real(real("Profile").add if REAL_POLY else None, (self, name),
                      {"min": min, "opt": opt, "max": max})
            self[name] = (list(min), list(max))
            return self

    def loader(kind, name):
        def make(*args, **kw):
            bind_real(real(name), args, kw)
            calls.append((kind, args, kw))
            return (kind, args, kw)
        return make

    def save_bytes(*args, **kw):
        bind_real(real("SaveBytes"), args, kw)
        engine, path = inspect.signature(lambda obj, path: None).bind(*args, **kw).args

        def run():
            if fail:
                raise RuntimeError("Invalid Engine. Please ensure the engine was built "
                                   "correctly\nmore")
            # EngineBytesFromNetwork((NetworkFromOnnxPath, (path,), kw), config=CreateConfig(...))
            onnx = engine[1][0][1][0]
            profile = engine[2]["config"][2]["profiles"][0]
            with open(path, "wb") as f:
                f.write(plan_bytes(onnx.rsplit("/", 1)[-1].split(".")[0], profile))
            return "engine"
        return run

    def verbosity(*args, **kw):
        bind_real(REAL_LOGGER.verbosity if REAL_LOGGER else None, args, kw)
        return __import__("contextlib").nullcontext()
    poly = types.SimpleNamespace(Profile=Profile,
                                 NetworkFromOnnxPath=loader("network", "NetworkFromOnnxPath"),
                                 CreateConfig=loader("config", "CreateConfig"),
                                 EngineBytesFromNetwork=loader("engine", "EngineBytesFromNetwork"),
                                 SaveBytes=save_bytes)
    return poly, types.SimpleNamespace(verbosity=verbosity, INFO=20, ERROR=40)


def facts_for(version: str) -> DeviceFacts:
    return DeviceFacts(FACTS.device_name, FACTS.compute_capability, version)


@pytest.fixture(params=VERSIONS, ids=lambda v: f"trt{v}")
def fakes(request, monkeypatch, tiny_bundles, tmp_path, fake_trt):
    """A bundle and the fakes of one TensorRT release (each key test runs on the floor and on
    the newest 11.x)."""
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], b)
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart, version=request.param)
    calls = []
    env = fake_trt(facts=facts_for(request.param), tensorrt=trt, cudart=cudart,
                   polygraphy=fake_polygraphy(calls))
    monkeypatch.setattr(backend_tensorrt.SharedScratch, "_instance", None)
    return types.SimpleNamespace(bundle=b, cudart=cudart, calls=calls, env=env, trt=trt,
                                 version=request.param)


OPTS = ProfileOptions(min_size=64, max_size=256, max_batch=2)


def build(fx, **kw):
    return build_engines(fx.bundle, precision="fp32", options=OPTS,
                         components=("text_encoder", "unet"), **kw)


def test_build_records_engines_in_manifest(fakes):
    recs = build(fakes, workspace_mb=512, optimization_level=2)
    m = json.loads((fakes.bundle / "manifest.json").read_text())
    unet = m["components"]["unet"]["engines"]
    onnx = m["components"]["unet"]["variants"]["fp32"]["files"][0]
    assert len(unet) == 1
    assert unet[0]["file"].startswith(f"engines/fake-gpu-sm87-trt{fakes.version}/unet.fp32.")
    assert unet[0]["onnx_sha256"] == onnx["sha256"]
    assert unet[0]["profile"]["sample"]["max"] == [4, 4, 32, 32]
    plan = json.loads((fakes.bundle / unet[0]["file"]).read_bytes()[5:])
    assert plan == {"kind": "unet", "profile": {
        k: [v["min"], v["max"]] for k, v in unet[0]["profile"].items()}}
    # built to bytes and saved as they are: never deserialised on the GPU only to be
    # serialised again (the fake has no EngineFromNetwork/SaveEngine to call)
    assert [c[0] for c in fakes.calls].count("engine") == 2
    network = [c for c in fakes.calls if c[0] == "network"]
    assert all(c[2] == {"strongly_typed": True} for c in network)
    config = [c[2] for c in fakes.calls if c[0] == "config"][0]
    assert config["memory_pool_limits"] == {fakes.trt.MemoryPoolType.WORKSPACE: 512 << 20}
    assert config["builder_optimization_level"] == 2 and "fp16" not in config
    assert [r["component"] for r in recs] == ["text_encoder", "unet"]
    build(fakes)  # the same machine, precision and profile: replaced, not added
    m = json.loads((fakes.bundle / "manifest.json").read_text())
    assert len(m["components"]["unet"]["engines"]) == 1
    assert not list(fakes.bundle.rglob(".*partial*"))


def test_failed_build_is_one_line_and_leaves_nothing(fakes):
    fakes.env.parts["polygraphy"] = fake_polygraphy([], fail=True)
    before = (fakes.bundle / "manifest.json").read_bytes()
    with pytest.raises(EngineBuildError) as e:
        build(fakes)
    assert "\n" not in str(e.value) and "text_encoder: TensorRT could not build" in str(e.value)
    assert (fakes.bundle / "manifest.json").read_bytes() == before
    assert not (fakes.bundle / "engines").exists()


def test_built_engines_run_bind_once_and_share_scratch(fakes):
    from ldm_edge.runtime.backends.choose import open_backend

    build(fakes)
    m = open_bundle(fakes.bundle)
    unet = open_backend(m, "unet", backend="tensorrt")
    text = open_backend(m, "text_encoder", backend="auto")
    assert {type(unet).__name__, type(text).__name__} == {"TensorRTBackend"}
    assert unet.spec.ranges["batch"] == (1, 4)  # the engine's, not the exported (1, 8)
    assert unet.spec.ranges["latent_height"] == (8, 32)
    shared = backend_tensorrt.SharedScratch._instance
    assert shared.size == max(MEMORY.values())
    memory = [trt_surface.unwrap(b.context).memory for b in (unet, text)]
    assert memory == [(shared.ptr, shared.size)] * 2
    ids = np.arange(2 * 77, dtype=np.int64).reshape(2, 77)
    np.testing.assert_array_equal(text.run({"input_ids": ids})["last_hidden_state"][..., 0], ids)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((2, 77, 32), dtype=np.float32)
    unet.bind({"encoder_hidden_states": emb})
    uploads, mallocs = fakes.cudart.uploads, fakes.cudart.mallocs
    for _ in range(3):
        x = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
        t = np.full((2,), 981.0, np.float32)
        out = unet.run({"sample": x, "timestep": t})["model_output"]
        want = 2 * x + 981.0 + emb.mean(axis=(1, 2))[:, None, None, None]
        np.testing.assert_allclose(out, want, rtol=1e-6)
    assert fakes.cudart.uploads - uploads == 3 * 2  # sample and timestep; the embeddings once
    assert fakes.cudart.mallocs - mallocs == 3  # sample, timestep, output: allocated once
    unet.run({"sample": x[:, :, :8, :8], "timestep": t})  # smaller: buffers reused
    assert fakes.cudart.mallocs - mallocs == 3
    with pytest.raises(UsageError, match="outside the engine's profile.*ldm-export engines"):
        unet.run({"sample": np.zeros((2, 4, 40, 40), np.float32), "timestep": t})
    unet.close()
    text.close()
    assert backend_tensorrt.SharedScratch._instance is None and not fakes.cudart.mem


def test_plan_that_does_not_deserialise_is_refused(fakes):
    from ldm_edge.runtime.backends.choose import open_backend
    from ldm_edge.runtime.fsutil import sha256_file

    build(fakes)
    data = json.loads((fakes.bundle / "manifest.json").read_text())
    rec = data["components"]["unet"]["engines"][0]
    path = fakes.bundle / rec["file"]
    path.write_bytes(b"JUNK" + path.read_bytes()[4:])
    rec["sha256"] = sha256_file(path)  # a whole file that is simply not an engine for here
    with pytest.raises(BundleError, match="TensorRT cannot load .*--precision fp32"):
        open_backend(Manifest(fakes.bundle, data), "unet", backend="tensorrt")


def test_pipeline_splits_guidance_batch_to_fit_a_small_engine(fakes):
    from ldm_edge.runtime.pipeline import Pipeline

    build_engines(fakes.bundle, precision="fp32", options=OPTS, components=("text_encoder",))
    build_engines(fakes.bundle, precision="fp32", components=("unet",),
                  options=ProfileOptions(min_size=64, max_size=256, max_batch=1))
    pipe = Pipeline(fakes.bundle, backend="auto")
    calls = []
    unet = pipe.backend("unet")
    run = unet._run
    unet._run = lambda feeds, bound: calls.append(feeds["sample"].shape[0]) or run(feeds, bound)
    r = pipe("a red cat", num_images_per_prompt=2, num_inference_steps=1, guidance_scale=7.5,
             height=128, width=128, seed=0)
    assert r.images.shape == (2, 128, 128, 3)
    assert type(pipe.backend("vae_decoder")).__name__ == "OnnxRuntimeBackend"  # no engine: auto
    assert calls == [2, 2]  # 2 images x guidance = 4 rows; the engine takes 2 per call
    pipe.close()
    assert backend_tensorrt.SharedScratch._instance is None


# -- the fakes are as strict as the real thing ------------------------------------------------
def test_polygraphy_fakes_refuse_what_polygraphy_refuses():
    pytest.importorskip("polygraphy.backend.trt", reason="Polygraphy is not installed: nothing "
                        "to bind the fakes to (pip install 'polygraphy>=0.49.24')")
    poly, logger = fake_polygraphy([])
    net = poly.NetworkFromOnnxPath("m.onnx", strongly_typed=True)
    config = poly.CreateConfig(profiles=[poly.Profile().add("x", min=[1], opt=[1], max=[2])],
                               memory_pool_limits={"WORKSPACE": 1}, builder_optimization_level=3)
    poly.EngineBytesFromNetwork(net, config=config, save_timing_cache=None)
    misspelt = [
        lambda: poly.NetworkFromOnnxPath("m.onnx", strongly_type=True),
        lambda: poly.CreateConfig(profile=[]),  # through **kwargs to the base class
        lambda: poly.CreateConfig(builder_optimisation_level=3),
        lambda: poly.EngineBytesFromNetwork(net, configs=config),
        lambda: poly.Profile().add("x", min=[1], opt=[1], maximum=[2]),
        lambda: poly.SaveBytes(net, file="e.plan"),
        lambda: logger.verbosity(level=40),
    ]
    for call in misspelt:
        with pytest.raises(TypeError):
            call()


def test_engine_that_refuses_the_shape_is_named(fakes):
    """The record says the engine takes 32x32 latents, the plan itself only 16x16: TensorRT's
    set_input_shape says no, and the backend turns that into one line naming the rebuild."""
    from ldm_edge.runtime.backends.choose import open_backend
    from ldm_edge.runtime.fsutil import sha256_file

    build(fakes)
    data = json.loads((fakes.bundle / "manifest.json").read_text())
    rec = data["components"]["unet"]["engines"][0]
    narrow = {k: [v["min"], v["max"]] for k, v in rec["profile"].items()}
    narrow["sample"][1] = narrow["sample"][1][:2] + [16, 16]
    path = fakes.bundle / rec["file"]
    path.write_bytes(plan_bytes("unet", narrow))
    rec["size"], rec["sha256"] = path.stat().st_size, sha256_file(path)
    unet = open_backend(Manifest(fakes.bundle, data), "unet", backend="tensorrt")
    t = np.full((2,), 1.0, np.float32)
    unet.bind({"encoder_hidden_states": np.zeros((2, 77, 32), np.float32)})
    unet.run({"sample": np.zeros((2, 4, 16, 16), np.float32), "timestep": t})  # inside both
    with pytest.raises(UsageError) as e:  # inside the record's profile, outside the plan's
        unet.run({"sample": np.zeros((2, 4, 32, 32), np.float32), "timestep": t})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (f"unet: TensorRT refuses shape [2, 4, 32, 32] for 'sample'; rebuild the "
                   f"engine with `ldm-export engines {fakes.bundle} --precision fp32`")
    unet.close()


def test_one_environment_reaches_every_importer(fakes):
    from ldm_edge.runtime.backends import choose as backends

    facts = facts_for(fakes.version)
    assert captured_device_facts() == facts  # imported before the fake was installed
    assert captured_import_tensorrt() is fakes.trt
    assert trt_engines.import_cudart() is fakes.cudart
    assert engines.import_polygraphy()[0].CreateConfig.__qualname__.startswith("fake_polygraphy")
    assert backend_tensorrt.device_facts() == facts and engines.device_facts() == facts
    assert backends.__name__  # runtime/backends/choose.py asks trt_engines at call time too
    fakes.env.parts["facts"] = None  # a part a test did not give is missing, never the real one
    with pytest.raises(trt_engines.TensorRTUnavailable, match="fake TensorRT environment"):
        captured_device_facts()


@pytest.mark.parametrize("family,channels", [("ldm-uncond", 3), ("ldm-sr", 6), ("inpaint", 9),
                                             ("upscale", 7)])
def test_engines_for_the_ldm_layouts(family, channels, ldm_bundles, tmp_path, fake_trt,
                                     monkeypatch):
    """`ldm-export engines` on the paper's layouts' bundles (fake TensorRT): an engine per component,
    the U-Net's profile with its own input channels, its batch doubled only where guidance
    can run (a model that takes a prompt)."""
    b = tmp_path / family
    shutil.copytree(ldm_bundles[family], b)
    cudart = FakeCudart()
    fake_trt(facts=FACTS, tensorrt=fake_tensorrt(cudart), cudart=cudart,
             polygraphy=fake_polygraphy([]))
    monkeypatch.setattr(backend_tensorrt.SharedScratch, "_instance", None)
    recs = build_engines(b, precision="fp32", options=OPTS)
    m = json.loads((b / "manifest.json").read_text())
    assert sorted(r["component"] for r in recs) == sorted(m["components"])
    sample = m["components"]["unet"]["engines"][0]["profile"]["sample"]
    guided = 2 if family in ("inpaint", "upscale") else 1
    assert sample["max"][:2] == [2 * guided, channels]
    assert all(len(c["engines"]) == 1 for c in m["components"].values())
    assert open_bundle(b).schema.task == {"inpaint": "inpaint", "ldm-sr": "super-resolution",
                                          "ldm-uncond": "unconditional",
                                          "upscale": "upscale"}[family]


def test_tensorrt_that_cannot_start_is_one_line_and_auto_falls_back(fakes, caplog):
    """The real ``trt.Runtime`` raises TypeError ("returned nullptr") where TensorRT cannot
    start: one line when TensorRT was asked for, onnxruntime with a note under auto."""
    from ldm_edge.runtime.backends.choose import open_backend

    build(fakes)
    fakes.env.parts["tensorrt"] = fake_tensorrt(fakes.cudart, runtime_fails=True,
                                                version=fakes.version)
    m = open_bundle(fakes.bundle)
    with pytest.raises(backend_tensorrt.GpuError) as e:
        open_backend(m, "unet", backend="tensorrt")
    assert "\n" not in str(e.value) and "TensorRT could not start here (" in str(e.value)
    assert "--backend onnxruntime" in str(e.value)
    with caplog.at_level("WARNING"):
        auto = open_backend(m, "unet", backend="auto")
    assert auto.name == "onnxruntime"
    assert "TensorRT could not start here" in caplog.text and "using onnxruntime" in caplog.text
    auto.close()


def test_an_io_dtype_without_a_numpy_type_is_named(fakes, monkeypatch):
    """Each DataType the release has and ``trt.nptype`` refuses (BF16, FP8, INT4; FP4 and E8M0
    in releases after 10.3) is named, not a TypeError."""
    from ldm_edge.runtime.backends.choose import open_backend

    build(fakes)
    real = FakeEngine.get_tensor_dtype
    dtypes = [t for t in NO_NUMPY_TYPE if t in fakes.trt.DataType.__members__]
    assert {"BF16", "FP8", "INT4"} <= set(dtypes)
    for t in dtypes:
        dtype = getattr(fakes.trt.DataType, t)
        monkeypatch.setattr(FakeEngine, "get_tensor_dtype",
                            lambda self, n: dtype if n == "model_output" else real(self, n))
        with pytest.raises(BundleError, match=f"'model_output' is DataType.{t}, which has no "
                                              f"numpy type; rebuild the engine with `ldm-export"):
            open_backend(open_bundle(fakes.bundle), "unet", backend="tensorrt")


def test_an_execution_context_tensorrt_cannot_make_is_one_line(fakes, monkeypatch, caplog):
    """``create_execution_context`` returns None (no memory for it): one line under
    --backend tensorrt, onnxruntime with the reason under auto."""
    from ldm_edge.runtime.backends.choose import open_backend

    build(fakes)
    monkeypatch.setattr(FakeEngine, "create_execution_context", lambda self, strategy: None)
    m = open_bundle(fakes.bundle)
    with pytest.raises(backend_tensorrt.GpuError, match="^unet: TensorRT could not create an "
                                                        "execution context"):
        open_backend(m, "unet", backend="tensorrt")
    with caplog.at_level("WARNING"):
        auto = open_backend(m, "unet", backend="auto")
    assert auto.name == "onnxruntime" and "could not create an execution context" in caplog.text
    auto.close()


def test_a_refused_tensor_address_is_named(fakes, monkeypatch):
    from ldm_edge.runtime.backends.choose import open_backend

    build(fakes)
    real = FakeContext.set_tensor_address
    monkeypatch.setattr(FakeContext, "set_tensor_address",
                        lambda self, n, p: n != "timestep" and real(self, n, p))
    unet = open_backend(open_bundle(fakes.bundle), "unet", backend="tensorrt")
    feeds = {"sample": np.zeros((2, 4, 16, 16), np.float32),
             "timestep": np.zeros((2,), np.float32),
             "encoder_hidden_states": np.zeros((2, 77, 32), np.float32)}
    with pytest.raises(backend_tensorrt.GpuError, match="refused the device address for "
                                                        "tensor 'timestep'"):
        unet.run(feeds)
    unet.close()


def test_the_loaders_a_build_uses_are_polygraphys():
    """The real environment hands the build these names; each is Polygraphy's own."""
    pytest.importorskip("polygraphy.backend.trt", reason="Polygraphy is not installed: nothing "
                        "to check the names against (pip install 'polygraphy>=0.49.24')")
    from ldm_edge.runtime.backends.trt_engines import POLYGRAPHY_LOADERS

    assert [n for n in POLYGRAPHY_LOADERS if not hasattr(REAL_POLY, n)] == []
    assert callable(REAL_COMMON.SaveBytes)


@pytest.mark.parametrize("version, ok", [("10.2.1", False), ("8.6.2", False), ("10.3.0", True),
                                         ("11.4.0", True)])
def test_tensorrt_older_than_the_floor_is_refused_up_front(monkeypatch, version, ok):
    """10.0-10.2 lack the refit a LoRA needs (mark_weights_refittable, REFIT_INDIVIDUAL):
    refused when TensorRT is imported, not half-way through a build."""
    from ldm_edge.runtime.backends.trt_engines import TensorRTEnvironment, TensorRTUnavailable

    monkeypatch.setitem(sys.modules, "tensorrt",
                        types.SimpleNamespace(__version__=version, Runtime=object))
    if ok:
        assert TensorRTEnvironment().tensorrt().__version__ == version
    else:
        with pytest.raises(TensorRTUnavailable, match=f"TensorRT {version} is too old; ldm-edge "
                                                      f"needs TensorRT 10.3 or newer"):
            TensorRTEnvironment().tensorrt()


def test_tf32_is_given_to_polygraphy_both_ways_and_recorded(fakes):
    """Polygraphy's CreateConfig clears TensorRT's default-on TF32 unless told: the build says
    which, off unless --tf32 (FP32 as the ONNX graph computes it), and the record keeps it."""
    from ldm_edge.runtime.bundle.schema import EngineRecord

    for tf32 in (False, True):
        fakes.calls.clear()
        build(fakes, tf32=tf32)
        configs = [c[2] for c in fakes.calls if c[0] == "config"]
        assert len(configs) == 2 and all(c["tf32"] is tf32 for c in configs)
        rec = json.loads((fakes.bundle / "manifest.json").read_text())["components"]["unet"]
        assert [e["tf32"] for e in rec["engines"]] == [tf32]
        assert EngineRecord.from_json(rec["engines"][0], "e").to_json() == rec["engines"][0]
    older = {k: v for k, v in rec["engines"][0].items() if k != "tf32"}  # before it was recorded
    assert EngineRecord.from_json(older, "e").to_json() == older


class DriverCudart:
    """cuda-python's runtime as a machine whose driver is the problem answers it: device count
    fails with ``err``, the driver and runtime report their encoded CUDA versions (0: no
    driver loaded, as cuda-bindings 12.9 answered on this GPU-less machine: error 35, 0)."""

    class cudaError_t:
        cudaSuccess = 0

    def __init__(self, err, driver, runtime):
        self.err, self.driver, self.runtime = err, driver, runtime

    def cudaGetDeviceCount(self):
        return self.err, None

    def cudaDriverGetVersion(self):
        return 0, self.driver

    def cudaRuntimeGetVersion(self):
        return 0, self.runtime

    def cudaGetErrorString(self, err):
        return 0, b"fake error %d" % err


@pytest.mark.parametrize("err, driver, runtime, says", [
    (35, 12060, 13000, r"the CUDA runtime of cuda-python\S* \S*\(CUDA 13\.0\) needs a newer "
                       r"driver than this one \(CUDA 12\.6\): install 'ldm-edge\[trt-cu12\]' in "
                       r"a fresh venv \(or upgrade the driver\)"),
    (35, 12020, 12090, r"\(CUDA 12\.9\) needs a newer driver than this one \(CUDA 12\.2\): "
                       r"pip install 'cuda-python<12\.3' \(or upgrade the driver\)"),
    (35, 11080, 12090, r"\(CUDA 11\.8\): upgrade the driver \(ldm-edge's TensorRT needs CUDA 12"),
    (35, 0, 12090, r"^no CUDA GPU is visible here \(no NVIDIA driver is loaded\)"),
    (100, 12060, 12060, r"^no CUDA GPU is visible here \(fake error 100\)"),
], ids=["cu13-on-cu12-driver", "newer-minor", "cuda11-driver", "no-driver", "no-device"])
def test_a_driver_older_than_cuda_pythons_runtime_is_named(monkeypatch, err, driver, runtime,
                                                           says):
    """A CUDA 13 cuda-python on a CUDA 12 driver (what unpinned installs got) is one line
    naming both CUDA versions and the extra that fits the driver, not "no CUDA GPU"."""
    import re

    env = trt_engines.TensorRTEnvironment()
    monkeypatch.setattr(env, "tensorrt", lambda: types.SimpleNamespace(__version__=FLOOR))
    monkeypatch.setattr(env, "cudart", lambda: DriverCudart(err, driver, runtime))
    with pytest.raises(trt_engines.TensorRTUnavailable) as e:
        env.facts()
    msg = str(e.value)
    assert re.search(says, msg) and "\n" not in msg, msg
    assert msg.endswith("onnxruntime runs this bundle on the CPU meanwhile") or \
        msg.endswith("onnxruntime runs this bundle meanwhile")
