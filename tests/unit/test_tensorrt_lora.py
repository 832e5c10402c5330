"""LoRA on TensorRT, against fakes: ``ldm-export engines --refittable`` marks exactly the weights
map's weights refittable (REFIT_INDIVIDUAL), and a LoRA refits a freshly deserialised engine
with base + the whole active set (plus the base value of any weight TensorRT asks for too).

The fakes reuse test_tensorrt_fakes.py's (cuda-python, engines, Polygraphy bound to the real
signatures) and add only the calls LoRA makes, each present in TensorRT 10.3 and 11.x:
``INetworkDefinition.mark_weights_refittable``, ``BuilderFlag.REFIT_INDIVIDUAL``,
``Refitter(engine, logger)``, ``set_named_weights``, ``get_missing_weights``,
``refit_cuda_engine``, ``Weights``; and Polygraphy's ``PostprocessNetwork`` /
``PostprocessConfig``. Real engines are refitted by tests/gpu/test_tensorrt_lora_gpu.py,
where a GPU with TensorRT is present (it has not run yet: see docs/tensorrt.md).
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
    """A fake engine with weights: ``refittable`` names, and the refits it went through. Its
    "tied" rule: refitting a to_q weight needs the to_k weight beside it (TensorRT reports such
    partners through get_missing_weights)."""

    # name -> (dtype, count) the engine holds, where a test says so (else the graph's own)
    prototypes: dict = {}

    def __init__(self, kind, cudart, profile, refittable, tied):
        super().__init__(kind, cudart, profile)
        self.refittable, self.tied, self.refits = set(refittable), dict(tied), []


class FakeRefitter:
    """As the real one: no refitter for an engine without refittable weights (the factory's
    nullptr, raised as TypeError); False from set_named_weights for a name the engine cannot
    refit or weights whose dtype or count differ from its prototype (count -1: no such
    weight)."""

    def __init__(self, engine, logger):
        if not engine.refittable:
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.engine, self.values = engine, {}

    def get_weights_prototype(self, name):
        if name not in self.engine.refittable:
            return types.SimpleNamespace(dtype=np.float32, size=-1)
        dtype, size = self.engine.prototypes.get(name, (None, None))
        return types.SimpleNamespace(dtype=dtype, size=size) if dtype is not None else None

    def set_named_weights(self, name, weights):
        if name not in self.engine.refittable:
            return False
        dtype, size = self.engine.prototypes.get(name, (None, None))
        if dtype is not None and (weights.array.dtype != dtype or weights.array.size != size):
            return False
        self.values[name] = np.array(weights.array, copy=True)
        return True

    def get_missing_weights(self):
        return sorted({self.engine.tied[n] for n in self.values if n in self.engine.tied}
                      - set(self.values))

    def refit_cuda_engine(self):
        if self.get_missing_weights():
            return False
        self.engine.refits.append(dict(self.values))
        return True


def fake_tensorrt(cudart, engines: list, tied: dict):
    trt = F.fake_tensorrt(cudart)

    def deserialize(buf):
        data = bytes(buf)
        if not data.startswith(b"FAKE:"):
            return None
        plan = json.loads(data[5:])
        e = RefitEngine(plan["kind"], cudart, plan["profile"], plan.get("refittable", []), tied)
        engines.append(e)
        return e
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=deserialize)
    trt.Refitter = FakeRefitter
    trt.Weights = lambda a: types.SimpleNamespace(array=a)
    trt.BuilderFlag = types.SimpleNamespace(REFIT_INDIVIDUAL="REFIT_INDIVIDUAL")
    return trt


def fake_polygraphy(record: dict):
    """test_tensorrt_fakes' Polygraphy plus PostprocessNetwork/Config, run at save time on a
    fake network (whose weights are the ONNX graph's initializers) and a fake config."""
    poly, logger = F.fake_polygraphy([])

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
                fake_net = types.SimpleNamespace(
                    mark_weights_refittable=lambda n: marks.append(n) or n in have)
                net[2]["func"](network=fake_net)
                net = net[1][0]
            while conf[0] == "post-config":
                conf[2]["func"](None, None, types.SimpleNamespace(set_flag=flags.append))
                conf = conf[1][0]
            onnx = net[1][0]
            kind = onnx.rsplit("/", 1)[-1].split(".")[0]
            record[kind] = {"marks": marks, "flags": flags}
            plan = {"kind": kind, "profile": conf[2]["profiles"][0],
                    "refittable": marks if "REFIT_INDIVIDUAL" in flags else []}
            Path(path).write_bytes(b"FAKE:" + json.dumps(plan).encode())
            return "engine"
        return run

    poly.PostprocessNetwork = post("post-network", "PostprocessNetwork")
    poly.PostprocessConfig = post("post-config", "PostprocessConfig")
    poly.SaveBytes = save_bytes
    return poly, logger


@pytest.fixture
def rig(monkeypatch, tiny_bundles, tmp_path, fake_trt):
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], b)
    wmap = json.loads((b / "unet.weights-map.json").read_text())["params"]
    q, k = wmap[f"{Q}.weight"]["initializer"], wmap[f"{K}.weight"]["initializer"]
    cudart, engines, built = F.FakeCudart(), [], {}
    trt = fake_tensorrt(cudart, engines, tied={q: k})
    fake_trt(facts=F.FACTS, tensorrt=trt, cudart=cudart, polygraphy=fake_polygraphy(built))
    monkeypatch.setattr(backend_tensorrt.SharedScratch, "_instance", None)
    rng = np.random.default_rng(0)
    loras = {}
    for name, module in (("a", Q), ("b", K)):
        stem = "lora_unet_" + module.replace(".", "_")
        loras[name] = tmp_path / f"{name}.safetensors"
        write_safetensors(loras[name], {
            f"{stem}.lora_down.weight": rng.standard_normal((4, 32), dtype=np.float32),
            f"{stem}.lora_up.weight": rng.standard_normal((32, 4), dtype=np.float32)})
    return types.SimpleNamespace(bundle=b, engines=engines, built=built, q=q, k=k, loras=loras)


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
    monkeypatch.setattr(RefitEngine, "prototypes", {rig.q: (np.dtype(np.float16), n)})
    with pytest.raises(RefitError, match=f"weight '{rig.q}' is float16 x {n} in the engine but "
                                         f"float32 x {n} from the graph"):
        _open(rig, [(rig.loras["a"], 1.0)])
