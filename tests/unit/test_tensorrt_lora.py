"""LoRA on TensorRT, against fakes: ``ldm-export engines --refittable`` marks exactly the weights
map's weights refittable (REFIT_INDIVIDUAL), and a LoRA refits a freshly deserialised engine
with base + the whole active set (plus the base value of any weight TensorRT asks for too).

The fakes reuse test_tensorrt_fakes.py's (cuda-python, engines, Polygraphy bound to the real
signatures) and add only the calls LoRA makes, each present in TensorRT 10.3 and 11.x:
``INetworkDefinition.mark_weights_refittable``, ``BuilderFlag.REFIT_INDIVIDUAL``,
``Refitter(engine, logger)``, ``set_named_weights``, ``get_missing_weights``,
``refit_cuda_engine``, ``Weights``; and Polygraphy's ``PostprocessNetwork`` /
``PostprocessConfig``. Like those fakes, these are held to the recorded API surface of the
release they claim (tests/trt_surface.py), and each test runs on the floor (10.3) and the
newest 11.x; the network and config the build's Postprocess functions get are guarded as
``INetworkDefinition`` / ``IBuilderConfig`` too. Real engines are refitted by
tests/gpu/test_tensorrt_lora_gpu.py, where a GPU with TensorRT is present (it has not run yet:
see docs/tensorrt.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from ldm_edge.export.engines import ProfileOptions, build_engines
from ldm_edge.runtime.backends import tensorrt as backend_tensorrt
from ldm_edge.runtime.backends.choose import open_backend
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.backends.trt_refit import RefitError
from ldm_edge.runtime.lora.files import LoraError
from ldm_edge.runtime.lora.apply import LoraWeights
from ldm_edge.runtime.bundle.onnx_scan import initializer_dtypes, read_initializers
from ldm_edge.runtime.lora.safetensors_read import write_safetensors

_spec = importlib.util.spec_from_file_location(
    "_trt_fakes", Path(__file__).with_name("test_tensorrt_fakes.py"))
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
OPTS = ProfileOptions(min_size=64, max_size=256, max_batch=2)


class RefitEngine(F.FakeEngine):
    """A fake engine with weights: ``refittable`` {name: (DataType, count)} as built, and the
    refits it went through. Its "tied" rule: refitting a to_q weight needs the to_k weight
    beside it (TensorRT reports such partners through get_missing_weights)."""

    # name -> (DataType, count) the engine holds instead, where a test says so
    prototypes: dict = {}

    def __init__(self, kind, cudart, profile, refittable, tied):
        super().__init__(kind, cudart, profile)
        self.refittable = {n: (F.member(f"DataType.{t}"), c) for n, (t, c) in refittable.items()}
        self.tied, self.refits = dict(tied), []

    def prototype(self, name):
        return self.prototypes.get(name) or self.refittable.get(name)


class FakeRefitter:
    """As the real one: no refitter for an engine without refittable weights (the factory's
    nullptr, raised as TypeError); ``get_weights_prototype`` the dtype and count the engine
    holds (count -1: no such refittable weight); False from set_named_weights for a name the
    engine cannot refit or weights whose dtype or count differ from that prototype. It reads
    the weights it is given through their real API (dtype, size, numpy())."""

    def __init__(self, engine, logger):
        engine = F.trt_surface.unwrap(engine)
        if not engine.refittable:
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.engine, self.values = engine, {}

    def get_weights_prototype(self, weights_name):
        proto = self.engine.prototype(weights_name)
        dtype, size = proto or (F.member("DataType.FLOAT"), -1)
        return types.SimpleNamespace(dtype=dtype, size=size)

    def set_named_weights(self, name, weights):
        if name not in self.engine.refittable or \
                (weights.dtype, weights.size) != self.engine.prototype(name):
            return False
        self.values[name] = np.array(weights.numpy(), copy=True)
        return True

    def get_missing_weights(self):
        return sorted({self.engine.tied[n] for n in self.values if n in self.engine.tied}
                      - set(self.values))

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            return False
        self.engine.refits.append(dict(self.values))
        return True


def fake_tensorrt(cudart, engines: list, tied: dict, version: str = F.FLOOR):
    def make_engine(plan, rt):
        e = RefitEngine(plan["kind"], rt, plan["profile"], plan.get("refittable", {}), tied)
        engines.append(e)
        return e
    return F.fake_tensorrt(cudart, version=version, make_engine=make_engine,
                           Refitter=FakeRefitter)


def fake_polygraphy(record: dict, trt):
    """test_tensorrt_fakes' Polygraphy plus PostprocessNetwork/Config, run at save time on a
    fake network (whose weights are the ONNX graph's initializers) and a fake config, each
    held to the TensorRT release of ``trt`` (INetworkDefinition, IBuilderConfig)."""
    poly, logger = F.fake_polygraphy([])
    s = F.trt_surface.surface(trt.__version__)
    refused = F.trt_surface.refusals(trt)

    def post(kind, name):
        def make(*args, **kw):
            F.bind_real(F.real(name), args, kw)
            return (kind, args, kw)
        return make

    def save_bytes(engine, path):
        F.bind_real(F.real("SaveBytes"), (engine, path), {})

        def run():
            net, conf = engine[1][0], engine[2]["config"]
            marks, flags = [], []
            while net[0] == "post-network":
                onnx = net[1][0][1][0]
                have = initializer_dtypes(onnx)
                fake_net = s.wrap("INetworkDefinition", types.SimpleNamespace(
                    mark_weights_refittable=lambda n: marks.append(n) or n in have), refused)
                net[2]["func"](network=fake_net)
                net = net[1][0]
            while conf[0] == "post-config":
                config = s.wrap("IBuilderConfig", types.SimpleNamespace(set_flag=flags.append),
                                refused)
                conf[2]["func"](None, None, config)
                conf = conf[1][0]
            onnx = net[1][0]
            kind = onnx.rsplit("/", 1)[-1].split(".")[0]
            record[kind] = {"marks": marks, "flags": [f.name for f in flags]}
            held = read_initializers(onnx, marks) if trt.BuilderFlag.REFIT_INDIVIDUAL in flags \
                else {}
            plan = {"kind": kind, "profile": conf[2]["profiles"][0],
                    "refittable": {n: [F.TRT_TYPE[a.dtype].name, int(a.size)]
                                   for n, a in held.items()}}
            Path(path).write_bytes(b"FAKE:" + json.dumps(plan).encode())
            return "engine"
        return run

    poly.PostprocessNetwork = post("post-network", "PostprocessNetwork")
    poly.PostprocessConfig = post("post-config", "PostprocessConfig")
    poly.SaveBytes = save_bytes
    return poly, logger


@pytest.fixture(autouse=True)
def no_refusals():
    """As in test_tensorrt_fakes: a refusal the code under test swallowed fails the test."""
    F.MADE.clear()
    yield
    assert F.take_refusals() == []


@pytest.fixture(params=F.VERSIONS, ids=lambda v: f"trt{v}")
def rig(request, monkeypatch, tiny_bundles, tmp_path, fake_trt):
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], b)
    wmap = json.loads((b / "unet.weights-map.json").read_text())["params"]
    q, k = wmap[f"{Q}.weight"]["initializer"], wmap[f"{K}.weight"]["initializer"]
    cudart, engines, built = F.FakeCudart(), [], {}
    trt = fake_tensorrt(cudart, engines, tied={q: k}, version=request.param)
    fake_trt(facts=F.facts_for(request.param), tensorrt=trt, cudart=cudart,
             polygraphy=fake_polygraphy(built, trt))
    monkeypatch.setattr(backend_tensorrt.SharedScratch, "_instance", None)
    rng = np.random.default_rng(0)
    loras = {}
    for name, module in (("a", Q), ("b", K)):
        stem = "lora_unet_" + module.replace(".", "_")
        loras[name] = tmp_path / f"{name}.safetensors"
        write_safetensors(loras[name], {
            f"{stem}.lora_down.weight": rng.standard_normal((4, 32), dtype=np.float32),
            f"{stem}.lora_up.weight": rng.standard_normal((32, 4), dtype=np.float32)})
    return types.SimpleNamespace(bundle=b, engines=engines, built=built, q=q, k=k, loras=loras,
                                 trt=trt)


def _build(rig, **kw):
    return build_engines(rig.bundle, precision="fp32", options=OPTS,
                         components=("text_encoder", "unet"), **kw)


def test_refittable_build_marks_only_the_weights_map(rig):
    recs = _build(rig, refittable=True)
    assert {r["component"]: r["refittable"] for r in recs} == {"text_encoder": "lora-weights",
                                                               "unet": "lora-weights"}
    for comp in ("unet", "text_encoder"):
        params = json.loads((rig.bundle / f"{comp}.weights-map.json").read_text())["params"]
        assert sorted(rig.built[comp]["marks"]) == sorted({p["initializer"] for p in params.values()})
        assert rig.built[comp]["flags"] == ["REFIT_INDIVIDUAL"]
    _build(rig)  # without --refittable: nothing marked, no flag, no record key
    assert rig.built["unet"] == {"marks": [], "flags": []}
    m = json.loads((rig.bundle / "manifest.json").read_text())
    assert "refittable" not in m["components"]["unet"]["engines"][0]


def _open(rig, loras, backend="tensorrt"):
    m = open_bundle(rig.bundle)
    w = LoraWeights(m)
    return open_backend(m, "unet", backend=backend, lora=w.graph_weights(w.load(loras), "unet"))


def test_lora_refits_from_base_plus_the_whole_set(rig):
    _build(rig, refittable=True)
    graph = rig.bundle / "unet.onnx"
    base = read_initializers(graph, [rig.q, rig.k])
    a = _open(rig, [(rig.loras["a"], 0.5)])
    got = rig.engines[-1].refits[-1]
    m = open_bundle(rig.bundle)
    w = LoraWeights(m)
    want = w.graph_weights(w.load([(rig.loras["a"], 0.5)]), "unet").for_graph(graph)[0]
    assert set(got) == {rig.q, rig.k}  # to_q's merge, and to_k's base value TensorRT asked for
    assert np.array_equal(got[rig.q], want[rig.q]) and not np.array_equal(got[rig.q], base[rig.q])
    assert np.array_equal(got[rig.k], base[rig.k])
    a.close()
    _open(rig, [(rig.loras["b"], 1.0)]).close()  # B: to_k changed
    assert not np.array_equal(rig.engines[-1].refits[-1][rig.k], base[rig.k])
    _open(rig, [(rig.loras["a"], 0.5)]).close()  # A again: from the plan, not on top of B
    again = rig.engines[-1].refits[-1]
    assert again.keys() == got.keys() and all(np.array_equal(again[n], got[n]) for n in got)
    assert len(rig.engines[-1].refits) == 1  # one refit of a freshly deserialised engine
    blend = _open(rig, [(rig.loras["a"], 0.5), (rig.loras["b"], 1.0)])
    both = rig.engines[-1].refits[-1]
    assert np.array_equal(both[rig.q], got[rig.q]) and not np.array_equal(both[rig.k], base[rig.k])
    blend.close()


def test_engine_not_built_refittable(rig):
    _build(rig)
    with pytest.raises(LoraError, match="not built refittable; rebuild it with .*--refittable"):
        _open(rig, [(rig.loras["a"], 1.0)])
    auto = _open(rig, [(rig.loras["a"], 1.0)], backend="auto")  # onnxruntime applies it
    assert auto.name == "onnxruntime"
    auto.close()
    plain = open_backend(open_bundle(rig.bundle), "unet", backend="auto")  # no LoRA: TensorRT
    assert plain.name == "tensorrt" and rig.engines[-1].refits == []
    plain.close()


def test_an_engine_tensorrt_cannot_refit_is_one_line(rig):
    """The manifest says refittable, the plan is not (rebuilt, or copied from elsewhere): the
    real Refitter's nullptr is one line saying to rebuild, not a traceback."""
    _build(rig)
    m = json.loads((rig.bundle / "manifest.json").read_text())
    m["components"]["unet"]["engines"][0]["refittable"] = "lora-weights"
    (rig.bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LoraError, match="TensorRT cannot refit this engine .*--refittable"):
        _open(rig, [(rig.loras["a"], 1.0)])


def test_a_weight_the_engine_holds_otherwise_is_named(rig, monkeypatch):
    """TensorRT answers a dtype or count mismatch with a bare False; the refit says what
    differs instead of "not refittable"."""
    _build(rig, refittable=True)
    n = read_initializers(rig.bundle / "unet.onnx", [rig.q])[rig.q].size
    monkeypatch.setattr(RefitEngine, "prototypes", {rig.q: (rig.trt.DataType.HALF, n)})
    with pytest.raises(RefitError, match=f"weight '{rig.q}' is float16 x {n} in the engine but "
                                         f"float32 x {n} from the graph"):
        _open(rig, [(rig.loras["a"], 1.0)])


def _fresh_engine(rig):
    """The unet plan deserialised through the fake TensorRT, as the backend does it."""
    trt = rig.trt
    plan = next((rig.bundle / "engines").rglob("unet.*.plan"))
    logger = trt.Logger(trt.Logger.ERROR)
    return trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes()), logger


def test_weights_reach_tensorrt_as_it_takes_them(rig):
    """``trt.Weights`` refuses a non-contiguous array and float64 (ValueError, as the bindings
    raise): the refit hands it contiguous arrays, names a dtype the engine does not hold, and
    reads no base weight when ``get_missing_weights`` is an empty list."""
    from ldm_edge.runtime.backends.trt_refit import refit_engine

    _build(rig, refittable=True)
    graph = rig.bundle / "unet.onnx"
    k = read_initializers(graph, [rig.k])[rig.k]
    transposed = (k + 1).T  # a strided view
    assert k.ndim == 2 and not transposed.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match="non-contiguous"):
        rig.trt.Weights(transposed)
    with pytest.raises(ValueError, match="Could not implicitly convert NumPy data type: f64"):
        rig.trt.Weights(k.astype(np.float64))
    engine, logger = _fresh_engine(rig)
    refit_engine(rig.trt, engine, logger, {rig.k: transposed}, graph, "unet", "HINT")
    assert list(rig.engines[-1].refits[-1]) == [rig.k]  # to_k alone: nothing missing
    np.testing.assert_array_equal(rig.engines[-1].refits[-1][rig.k], transposed)
    engine, logger = _fresh_engine(rig)
    with pytest.raises(RefitError, match=f"weight '{rig.k}' is float32 x {k.size} in the engine "
                                         f"but float64 x {k.size} from the graph"):
        refit_engine(rig.trt, engine, logger, {rig.k: k.astype(np.float64)}, graph, "unet", "H")


def test_a_weight_the_engine_cannot_refit_is_named(rig, monkeypatch):
    """The engine holds the weight but not refittable (built from another weights map):
    ``get_weights_prototype`` says count -1 and ``set_named_weights`` a bare False, which the
    refit turns into one line naming the weight."""
    _build(rig, refittable=True)
    real = RefitEngine.__init__

    def without_q(self, *args):
        real(self, *args)
        self.refittable.pop(rig.q, None)
    monkeypatch.setattr(RefitEngine, "__init__", without_q)
    with pytest.raises(LoraError, match=f"unet: the TensorRT engine cannot refit weight "
                                        f"'{rig.q}'; rebuild it with .*--refittable"):
        _open(rig, [(rig.loras["a"], 1.0)])
