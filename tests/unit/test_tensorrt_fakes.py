"""The TensorRT build and run code paths against fakes of Polygraphy, TensorRT and cuda-python.

Not a substitute for tests/gpu/test_tensorrt.py: the fakes implement only the calls this
project makes (with the signatures read from TensorRT 10.3 / 11 and Polygraphy's sources), so
these tests check our side — records, names, buffers, binding, the shared scratch area,
clean-up and one-line errors — on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import types

import numpy as np
import pytest

from ldm_edge.export import engines
from ldm_edge.export.engines import EngineBuildError, ProfileOptions, build_engines
from ldm_edge.runtime import backend_tensorrt, trt_engines
from ldm_edge.runtime.errors import BundleError, UsageError
from ldm_edge.runtime.manifest import Manifest
from ldm_edge.runtime.trt_engines import DeviceFacts

FACTS = DeviceFacts("Fake GPU", "8.7", "10.3.0")
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


class FakeEngine:
    def __init__(self, kind, cudart):
        self.kind, self.cudart = kind, cudart
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
        return "IN" if name in dict(self.inputs) else "OUT"

    def get_tensor_dtype(self, name):
        return self.names[name]

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        return FakeContext(self)


def fake_tensorrt(cudart):
    def deserialize(buf):
        data = bytes(buf)
        return FakeEngine(data[5:].decode(), cudart) if data.startswith(b"FAKE:") else None
    class Logger:
        WARNING, ERROR = 2, 1

        def __init__(self, severity):
            self.severity = severity
    return types.SimpleNamespace(
        __version__="10.3.0", Logger=Logger,
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=deserialize),
        TensorIOMode=types.SimpleNamespace(INPUT="IN", OUTPUT="OUT"),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"), nptype=lambda dt: dt)


def fake_polygraphy(calls, fail=False):
    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = (min, opt, max)
            return self

    def loader(kind):
        def make(*args, **kw):
            calls.append((kind, args, kw))
            return (kind, args, kw)
        return make

    def save_engine(engine, path):
        def run():
            if fail:
                raise RuntimeError("Invalid Engine. Please ensure the engine was built "
                                   "correctly\nmore")
            onnx = engine[1][0][1][0]  # EngineFromNetwork((NetworkFromOnnxPath, (path,), kw))
            with open(path, "wb") as f:
                f.write(b"FAKE:" + onnx.rsplit("/", 1)[-1].split(".")[0].encode())
            return "engine"
        return run
    verbosity = lambda sev: __import__("contextlib").nullcontext()  # noqa: E731
    poly = types.SimpleNamespace(Profile=Profile, NetworkFromOnnxPath=loader("network"),
                                 CreateConfig=loader("config"), EngineFromNetwork=loader("engine"),
                                 SaveEngine=save_engine)
    return poly, types.SimpleNamespace(verbosity=verbosity, INFO=20, ERROR=40)


@pytest.fixture
def fakes(monkeypatch, tiny_bundles, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], b)
    cudart = FakeCudart()
    trt = fake_tensorrt(cudart)
    calls = []
    for mod in (engines, backend_tensorrt):
        monkeypatch.setattr(mod, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(mod, "device_facts", lambda: FACTS)
    monkeypatch.setattr(trt_engines, "device_facts", lambda: FACTS)
    monkeypatch.setattr(backend_tensorrt, "import_cudart", lambda: cudart)
    monkeypatch.setattr(engines, "import_polygraphy", lambda: fake_polygraphy(calls))
    monkeypatch.setattr(backend_tensorrt.SharedScratch, "_instance", None)
    monkeypatch.setattr(backend_tensorrt, "_TRT_LOGGER", None)  # never hand a fake to real TensorRT
    return types.SimpleNamespace(bundle=b, cudart=cudart, calls=calls)


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
    assert unet[0]["file"].startswith("engines/fake-gpu-sm87-trt10.3.0/unet.fp32.")
    assert unet[0]["onnx_sha256"] == onnx["sha256"]
    assert unet[0]["profile"]["sample"]["max"] == [4, 4, 32, 32]
    assert (fakes.bundle / unet[0]["file"]).read_bytes() == b"FAKE:unet"
    network = [c for c in fakes.calls if c[0] == "network"]
    assert all(c[2] == {"strongly_typed": True} for c in network)
    config = [c[2] for c in fakes.calls if c[0] == "config"][0]
    assert config["memory_pool_limits"] == {"WORKSPACE": 512 << 20}
    assert config["builder_optimization_level"] == 2 and "fp16" not in config
    assert [r["component"] for r in recs] == ["text_encoder", "unet"]
    build(fakes)  # the same machine, precision and profile: replaced, not added
    m = json.loads((fakes.bundle / "manifest.json").read_text())
    assert len(m["components"]["unet"]["engines"]) == 1
    assert not list(fakes.bundle.rglob(".*partial*"))


def test_failed_build_is_one_line_and_leaves_nothing(fakes, monkeypatch):
    monkeypatch.setattr(engines, "import_polygraphy", lambda: fake_polygraphy([], fail=True))
    before = (fakes.bundle / "manifest.json").read_bytes()
    with pytest.raises(EngineBuildError) as e:
        build(fakes)
    assert "\n" not in str(e.value) and "text_encoder: TensorRT could not build" in str(e.value)
    assert (fakes.bundle / "manifest.json").read_bytes() == before
    assert not (fakes.bundle / "engines").exists()


def test_built_engines_run_bind_once_and_share_scratch(fakes):
    from ldm_edge.runtime.backends import open_backend

    build(fakes)
    m = Manifest.load(fakes.bundle)
    unet = open_backend(m, "unet", backend="tensorrt")
    text = open_backend(m, "text_encoder", backend="auto")
    assert {type(unet).__name__, type(text).__name__} == {"TensorRTBackend"}
    assert unet.spec.ranges["batch"] == (1, 4)  # the engine's, not the exported (1, 8)
    assert unet.spec.ranges["latent_height"] == (8, 32)
    shared = backend_tensorrt.SharedScratch._instance
    assert shared.size == max(MEMORY.values())
    assert unet.context.memory == text.context.memory == (shared.ptr, shared.size)
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
    from ldm_edge.runtime.backends import open_backend
    from ldm_edge.runtime.fsutil import sha256_file

    build(fakes)
    data = json.loads((fakes.bundle / "manifest.json").read_text())
    rec = data["components"]["unet"]["engines"][0]
    path = fakes.bundle / rec["file"]
    path.write_bytes(b"JUNK:unet")
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
