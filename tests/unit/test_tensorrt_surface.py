"""The recorded TensorRT API surface (tests/data/tensorrt_api.json) and the guard that holds the
fakes to it (tests/trt_surface.py).

Three things are checked here: that the record holds the releases it should and the facts
the project relies on (what 10.3 has, what 11 removed); that the guard refuses, as the
bindings do, what a release does not have, including a refusal the code under test swallows;
and that every TensorRT name the production code uses, read from its source with ``ast``,
exists with the arity and keywords used in every recorded release.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import shutil
import textwrap
import types
from pathlib import Path

import pytest
import trt_surface
from trt_surface import FLOOR, FakeGap, surface

from ldm_edge.export.engines import ProfileOptions, build_engines
from ldm_edge.runtime.backends import tensorrt as backend_tensorrt
from ldm_edge.runtime.backends.choose import open_backend
from ldm_edge.runtime.bundle.opener import open_bundle

_spec = importlib.util.spec_from_file_location(
    "_trt_fakes_s", Path(__file__).with_name("test_tensorrt_fakes.py"))
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)

ROOT = Path(__file__).resolve().parents[2]
NEWEST_11 = trt_surface.newest(11)


@pytest.fixture(autouse=True)
def no_refusals():
    F.MADE.clear()
    yield
    assert F.take_refusals() == []


# -- the record ---------------------------------------------------------------------------------
def test_the_record_holds_the_floor_and_the_newest_releases():
    versions = trt_surface.versions()
    assert versions[0] == FLOOR == "10.3.0"
    assert [v.split(".")[0] for v in versions] == ["10", "10", "11"]
    assert trt_surface.newest(10) != FLOOR  # the newest 10.x, not only the floor
    assert trt_surface.DATA.stat().st_size < 400_000


@pytest.mark.parametrize("version", trt_surface.versions())
def test_the_record_says_what_the_project_relies_on(version):
    """PITFALLS' "TensorRT, checked against the real modules", read back from the record."""
    s = surface(version)
    eleven = version.startswith("11.")
    assert s.has("INetworkDefinition", "mark_weights_refittable")  # from 10.2
    assert s.has("BuilderFlag", "REFIT_INDIVIDUAL")
    assert s.has("IExecutionContext", "set_device_memory") and \
        s.has("ICudaEngine", "device_memory_size_v2")  # from 10.1
    assert s.has("ICudaEngine", "device_memory_size") != eleven  # gone in 11
    assert s.has("BuilderFlag", "FP16") != eleven and s.has("BuilderFlag", "INT8") != eleven
    assert s.has("IBuilderConfig", "int8_calibrator") != eleven
    assert s.has("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH") != eleven
    assert s.lookup("IExecutionContext", "set_tensor_address")[1]["returns"] == "bool"
    assert s.lookup("Refitter", "__init__")[1]["sigs"] == [["engine:ICudaEngine",
                                                           "logger:ILogger"]]
    assert s.lookup("ICudaEngine", "num_io_tensors")[1] == ["ro", "int"]
    assert s.is_subclass("Logger", "ILogger")
    assert s.module_kind("nptype") == "function" and s.module_kind("Runtime") == "class"


# -- the guard ----------------------------------------------------------------------------------
class _Engine:
    num_io_tensors = 1
    device_memory_size_v2 = 8

    def get_tensor_name(self, index):
        return "x"

    def get_tensor_mode(self, name):
        return "INPUT"  # a str where TensorRT returns a TensorIOMode


class _Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, serialized_engine):
        return _Engine()


def _module(version=FLOOR):
    return surface(version).module(Runtime=_Runtime, Logger=lambda *a, **k: object())


def test_the_guard_refuses_what_the_release_lacks():
    trt = _module()
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(b"plan")
    assert engine.get_tensor_name(0) == engine.get_tensor_name(index=0) == "x"
    assert engine.num_io_tensors == 1 and str(trt.DataType.BF16) == "DataType.BF16"
    refused = [
        (AttributeError, lambda: trt.deserialize_engine),  # no such module name
        (AttributeError, lambda: trt.Runtime.deserialize_engine_v9),
        (AttributeError, lambda: engine.num_io_tensor),  # misspelt property
        (AttributeError, lambda: trt.DataType.FP4),  # from 10.8
        (AttributeError, lambda: setattr(engine, "num_io_tensors", 2)),  # read-only
        (AttributeError, lambda: setattr(engine, "anything", 2)),
        (TypeError, lambda: engine.get_tensor_name(idx=0)),  # a keyword it lacks
        (TypeError, lambda: engine.get_tensor_name(0, 1)),  # one argument too many
        (TypeError, lambda: trt.Runtime("logger")),  # not an ILogger
        (TypeError, lambda: trt.Logger("WARNING")),  # a str for an enum
        (TypeError, lambda: trt.ICudaEngine()),  # no constructor from Python
    ]
    for error, call in refused:
        with pytest.raises(error):
            call()
    assert len(trt_surface.refusals(trt)) == len(refused) - 1  # the constructor is not a name
    with pytest.raises(FakeGap, match="TensorRT 10.3.0 returns a member of TensorIOMode"):
        engine.get_tensor_mode("x")  # the fake must hand out what TensorRT does
    with pytest.raises(FakeGap, match="does not implement 'create_execution_context'"):
        engine.create_execution_context()  # TensorRT has it, this fake does not
    with pytest.raises(FakeGap, match="offers Runtime2"):
        surface(FLOOR).module(Runtime2=_Runtime)  # a fake may not invent names


def test_a_name_in_one_release_only_is_refused_in_the_other():
    floor, eleven = _module(FLOOR), _module(NEWEST_11)
    for trt, has in ((floor, True), (eleven, False)):
        engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"plan")
        assert hasattr(trt.BuilderFlag, "FP16") is has and hasattr(trt.BuilderFlag, "INT8") is has
        assert hasattr(trt.IBuilderConfig, "int8_calibrator") is has
        if not has:
            with pytest.raises(AttributeError, match=r"no attribute 'device_memory_size' "
                                                     r"\(TensorRT 11"):
                engine.device_memory_size
        assert hasattr(trt.DataType, "FP4") is not has
        trt_surface.refusals(trt).clear()


# -- planted in the production code path --------------------------------------------------------
@pytest.fixture(params=F.VERSIONS, ids=lambda v: f"trt{v}")
def built(request, monkeypatch, tiny_bundles, tmp_path, fake_trt):
    """A bundle with fp32 engines built through the fakes of one release."""
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], b)
    cudart = F.FakeCudart()
    trt = F.fake_tensorrt(cudart, version=request.param)
    fake_trt(facts=F.facts_for(request.param), tensorrt=trt, cudart=cudart,
             polygraphy=F.fake_polygraphy([]))
    monkeypatch.setattr(backend_tensorrt.SharedScratch, "_instance", None)
    build_engines(b, precision="fp32", components=("unet",),
                  options=ProfileOptions(min_size=64, max_size=256, max_batch=2))
    return types.SimpleNamespace(bundle=b, trt=trt, version=request.param)


def _plant(monkeypatch, cls, method: str, old: str, new: str) -> None:
    """Replace ``cls.method`` by its own source with ``old`` replaced by ``new``."""
    src = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    assert src.count(old) == 1, old
    scope = dict(vars(inspect.getmodule(cls)))
    exec(compile(src.replace(old, new), f"<planted {method}>", "exec"), scope)
    monkeypatch.setattr(cls, method, scope[method])


def test_a_planted_method_outside_the_surface_is_refused(built, monkeypatch):
    _plant(monkeypatch, backend_tensorrt.TensorRTBackend, "_deserialize",
           "self.runtime.deserialize_cuda_engine(buf)", "self.runtime.deserialize_engine_v9(buf)")
    with pytest.raises(AttributeError, match="'tensorrt.Runtime' object has no attribute "
                                             "'deserialize_engine_v9'"):
        open_backend(open_bundle(built.bundle), "unet", backend="tensorrt")
    assert [w for w, _ in F.take_refusals()] == ["Runtime.deserialize_engine_v9"]


def test_a_planted_keyword_is_refused_even_where_the_code_swallows_it(built, monkeypatch):
    """``_deserialize`` catches TypeError (a binding that takes bytes only) and tries again:
    the misspelt keyword's TypeError is swallowed there and the engine still opens, but the
    guard kept the refusal, which no_refusals would fail the test on."""
    _plant(monkeypatch, backend_tensorrt.TensorRTBackend, "_deserialize",
           "self.runtime.deserialize_cuda_engine(buf)",
           "self.runtime.deserialize_cuda_engine(serialized_plan=buf)")
    backend = open_backend(open_bundle(built.bundle), "unet", backend="tensorrt")
    backend.close()
    refused = F.take_refusals()
    assert [w for w, _ in refused] == ["Runtime.deserialize_cuda_engine"]
    assert "invoked with (serialized_plan=" in refused[0][1]


def test_a_name_gone_in_11_is_refused_on_11_only(built, monkeypatch):
    """``ICudaEngine.device_memory_size`` (gone in 11) read without the hasattr guard."""
    monkeypatch.setattr(backend_tensorrt, "_device_memory_size",
                        lambda engine: int(engine.device_memory_size))
    monkeypatch.setattr(F.FakeEngine, "device_memory_size", 8, raising=False)
    m = open_bundle(built.bundle)
    if built.version.startswith("10."):
        open_backend(m, "unet", backend="tensorrt").close()
        return
    with pytest.raises(AttributeError, match="no attribute 'device_memory_size'"):
        open_backend(m, "unet", backend="tensorrt")
    assert [w for w, _ in F.take_refusals()] == ["ICudaEngine.device_memory_size"]


# -- what the production code calls ------------------------------------------------------------
# per file: the local names (or self.<name>) that hold TensorRT objects, and their class; the
# module itself is always ``trt``
RECEIVERS = {
    "runtime/backends/tensorrt.py": {"engine": "ICudaEngine", "e": "ICudaEngine",
                                     "context": "IExecutionContext", "ctx": "IExecutionContext",
                                     "runtime": "Runtime"},
    "runtime/backends/trt_refit.py": {"refitter": "Refitter", "engine": "ICudaEngine",
                                      "network": "INetworkDefinition", "config": "IBuilderConfig",
                                      "proto": "Weights"},
    "runtime/backends/trt_engines.py": {},
    "export/engines.py": {},
}
# fallbacks reached only when hasattr() says the newer name is missing: (file, function, class,
# name used) -> the name hasattr checks first. None left since the floor became 10.3 (every
# recorded release has device_memory_size_v2 and set_device_memory, both from 10.1).
FALLBACKS: dict = {}


def _receiver(node, receivers: dict) -> str | None:
    """"module" for ``trt``, a class for a mapped local or ``self.<name>``, else None."""
    if isinstance(node, ast.Name):
        return "module" if node.id == "trt" else receivers.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            node.value.id == "self":
        return receivers.get(node.attr)
    return None


def _call_shape(call: ast.Call):
    """(positional count, keywords), or None where a * or ** argument hides them."""
    if any(isinstance(a, ast.Starred) for a in call.args) or \
            any(k.arg is None for k in call.keywords):
        return None
    return len(call.args), {k.arg: None for k in call.keywords}


def _functions(tree) -> dict:
    """id(node) -> the name of the innermost function holding it."""
    where = {}

    def visit(node, fn: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                else fn
            where[id(child)] = inner
            visit(child, inner)
    visit(tree, "")
    return where


def tensorrt_uses(source: str, receivers: dict) -> list[tuple]:
    """(line, function, owner, name, call shape or None, is a store) for every TensorRT name
    ``source`` uses: ``trt.X``, ``trt.X.Y``, ``<receiver>.name`` and ``hasattr``/``getattr``
    of them. ``owner`` is "module" or a class name."""
    tree = ast.parse(source)
    calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    fn = _functions(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("hasattr", "getattr") and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant):
            owner = _receiver(node.args[0], receivers)
            if owner:
                out.append((node.lineno, fn[id(node)], owner, node.args[1].value, None, False))
        if not isinstance(node, ast.Attribute):
            continue
        call = calls.get(id(node))
        shape = _call_shape(call) if call is not None else None
        store = isinstance(node.ctx, ast.Store)
        owner = _receiver(node.value, receivers)
        if owner:
            out.append((node.lineno, fn[id(node)], owner, node.attr, shape, store))
        elif isinstance(node.value, ast.Attribute) and \
                _receiver(node.value.value, receivers) == "module":  # trt.X.Y
            out.append((node.lineno, fn[id(node)], node.value.attr, node.attr, shape, store))
    return sorted(out, key=lambda u: (u[0], u[2], u[3]))


def _problem(s: trt_surface.Surface, owner: str, name: str, shape, store: bool) -> str | None:
    """Why ``owner.name`` (called with ``shape``, or stored to) fails on release ``s``."""
    if owner == "module":
        kind = s.module_kind(name)
        if kind is None:
            return "no such module name"
        if shape is None:
            return None
        rec = s.functions.get(name) or (s.lookup(s.values.get(name, "class " + name)[6:],
                                                 "__init__") or (None, None))[1]
    else:
        found = s.lookup(owner, name)
        if found is None:
            return "no such member"
        if store and (found[0] != "property" or found[1][0] != "rw"):
            return "cannot be set"
        if shape is None or found[0] != "method":
            return None
        rec = found[1]
    if rec is None:
        return "cannot be called"
    n, kw = shape
    if not any(trt_surface.bind(sig, (None,) * n, kw) is not None for sig in rec["sigs"]):
        return f"no overload takes {n} positional and keywords {sorted(kw)}"
    return None


def production_problems(files: dict = RECEIVERS, sources: dict | None = None) -> list[str]:
    out = []
    for rel, receivers in files.items():
        source = (sources or {}).get(rel) or (ROOT / rel).read_text(encoding="utf-8")
        for line, fn, owner, name, shape, store in tensorrt_uses(source, receivers):
            for v in trt_surface.versions():
                s = surface(v)
                why = _problem(s, owner, name, shape, store)
                checked = FALLBACKS.get((rel, fn, owner, name))
                if why == "no such member" and checked and s.has(owner, checked):
                    continue  # never reached on this release: see FALLBACKS
                if why:
                    out.append(f"{rel}:{line} {owner}.{name}: {why} in TensorRT {v}")
    return out


def test_every_tensorrt_name_the_code_uses_is_in_every_recorded_release():
    assert production_problems() == []


def test_the_source_check_sees_the_calls_and_a_planted_one():
    uses = {(rel, owner, name) for rel, r in RECEIVERS.items()
            for _, _, owner, name, _, _ in tensorrt_uses((ROOT / rel).read_text(), r)}
    for want in [("runtime/backends/tensorrt.py", "module", "Runtime"),
                 ("runtime/backends/tensorrt.py", "Logger", "WARNING"),
                 ("runtime/backends/tensorrt.py", "IExecutionContext", "execute_async_v3"),
                 ("runtime/backends/tensorrt.py", "IExecutionContext", "set_tensor_address"),
                 ("runtime/backends/tensorrt.py", "ICudaEngine", "create_execution_context"),
                 ("runtime/backends/tensorrt.py", "Runtime", "deserialize_cuda_engine"),
                 ("runtime/backends/trt_refit.py", "Refitter", "get_weights_prototype"),
                 ("runtime/backends/trt_refit.py", "Refitter", "set_named_weights"),
                 ("runtime/backends/trt_refit.py", "INetworkDefinition",
                  "mark_weights_refittable"),
                 ("runtime/backends/trt_refit.py", "BuilderFlag", "REFIT_INDIVIDUAL"),
                 ("export/engines.py", "MemoryPoolType", "WORKSPACE")]:
        assert want in uses
    rel = "runtime/backends/trt_refit.py"
    real = (ROOT / rel).read_text()
    planted = {
        "refitter.refit_cuda_engine_v9()": "Refitter.refit_cuda_engine_v9: no such member",
        "refitter.set_named_weights(name)": "Refitter.set_named_weights: no overload takes 1",
        "refitter.set_named_weights(name, w, where=1)": "no overload takes 2 positional and "
                                                        "keywords ['where']",
        "config.set_flag(trt.BuilderFlag.FP16)": "BuilderFlag.FP16: no such member in "
                                                 "TensorRT 11",
        "trt.Builder(logger).platform_has_fast_fp16": None,  # not a mapped receiver
        "engine.device_memory_size": "ICudaEngine.device_memory_size: no such member in "
                                     "TensorRT 11",
        "proto.size = 3": "Weights.size: cannot be set",
        "trt.Refitter(engine, logger, 1)": "Refitter: no overload takes 3",
    }
    for line, why in planted.items():
        found = production_problems({rel: RECEIVERS[rel]}, {rel: real + "\n" + line + "\n"})
        if why is None:
            assert found == []
        else:
            assert found and all(why in f for f in found[:1]), (line, found)


def test_no_fallback_for_a_release_before_the_floor_is_left():
    """TensorRT 10.3 is the floor (trt_engines.MIN_TRT_VERSION): a name only older releases
    need is dead code, and the source check allows none."""
    assert FALLBACKS == {}
    src = (ROOT / "runtime/backends/tensorrt.py").read_text()
    assert "device_memory_size)" not in src and "context.device_memory =" not in src
