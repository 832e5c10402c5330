"""The TensorRT-RTX tier: every graph ``ldm-export engines`` would hand TensorRT, for every
bundle kind the suite builds (FP32, FP16, the INT8 U-Net's TensorRT form), parsed and built
with the profile ``engines`` would give it, by a real TensorRT-RTX 1.7.1 ONNX parser and
builder, ahead of time for sm89, on the CPU (rtx_build.py). It runs nothing: what it proves
and what it does not is in docs/tensorrt.md ("A real parser and builder in the tests").

Skipped, with the reason, where the plugin, its pinned build, onnxruntime >= 1.24 or gcc is
missing, or off linux x86_64.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rtx_build
from helpers import need_export_extra
from rtx_build import Job, compile_graph, compile_graphs

pytestmark = pytest.mark.rtx

# every bundle kind the suite exports (conftest.py's tiny_bundles and ldm_bundles, and the
# demo model of parity/test_demo_model.py)
KINDS = ("sd1", "sd2", "demo", "ldm-bert", "ldm-uncond", "ldm-sr", "inpaint", "upscale", "sdxl",
         "sd1-controlnet")
# the kinds the suite makes an INT8 variant of (parity/test_int8.py: sd1;
# parity/test_ldm_precision.py: the paper's layouts, inpainting, the upscaler)
INT8_KINDS = ("sd1", "ldm-bert", "ldm-uncond", "ldm-sr", "inpaint", "upscale", "sdxl",
              "sd1-controlnet")
# session fixtures that are one bundle (conftest.py's controlnet_bundle: the tiny SD1 model with
# two ControlNets, its U-Net taking their residuals), and the kind each is
ONE_BUNDLE = {"controlnet_bundle": "sd1-controlnet"}
# `ldm-export fp16` / `int8` at their cheapest: the graphs' structure is what TensorRT builds
# here, their quality is the parity tier's; INT8 skips onnxruntime's fused-attention form,
# which TensorRT never sees, and keeps the TensorRT form (on by default)
FP16_ARGS = ("--num-prompts", "2", "--steps", "2")
INT8_ARGS = ("--num-prompts", "2", "--calib-steps", "2", "--schedulers", "ddim",
             "--no-fused-form")
CLI_TIMEOUT_S = 600  # one variant of a tiny model takes 2-8 s here


class Missing(str):
    """Why a bundle of a kind is absent on this checkout (a skip, not a failure)."""


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rtx(tmp_path_factory):
    try:
        return rtx_build.toolchain(tmp_path_factory.mktemp("rtx-lib"))
    except rtx_build.Unavailable as e:
        pytest.skip(f"TensorRT-RTX tier: {e}")


@pytest.fixture(scope="module")
def cases(rtx, request, tmp_path_factory) -> dict:
    """(kind, precision) -> Case: the bundle and what `ldm-export engines --precision P`
    would build from it, built. The suite's session bundles are reused as they are; FP16 and
    INT8 are added to copies by the CLI. The work goes to the workers as soon as it can start
    (a kind's FP32 graphs while the next kinds export, its FP16 graphs once made)."""
    need_export_extra()
    root = tmp_path_factory.mktemp("rtx-cases")
    futures = {}
    with ThreadPoolExecutor(rtx_build.WORKERS) as pool:
        made = {}
        for source in ("tiny_bundles", "ldm_bundles", "demo", "sdxl", *ONE_BUNDLE):
            if source in OWN_BUNDLES:
                base = {source: OWN_BUNDLES[source](tmp_path_factory.mktemp(f"rtx-{source}"))}
            elif source in ONE_BUNDLE:
                base = {ONE_BUNDLE[source]: request.getfixturevalue(source)}
            else:
                base = request.getfixturevalue(source)
            for kind, bundle in ((k, b) for k, b in base.items() if k in KINDS):
                futures[(kind, "fp32")] = pool.submit(_build_case, rtx, kind, "fp32", bundle,
                                                      root)
                for prec, args in (("fp16", FP16_ARGS), ("int8", INT8_ARGS)):
                    if prec == "fp16" or kind in INT8_KINDS:
                        made[pool.submit(_variant, bundle, root / f"{kind}-{prec}", prec,
                                         args)] = (kind, prec)
        for done in as_completed(made):
            kind, prec = made[done]
            futures[(kind, prec)] = pool.submit(_build_case, rtx, kind, prec, done.result(),
                                                root)
    return {case: f.result() for case, f in futures.items()}


@dataclass
class Case:
    bundle: Path | None
    built: list = field(default_factory=list)  # (component, precision, graph, BuildResult)
    problem: str | None = None  # why there is nothing to build: a Missing skips, a str fails


def _build_case(rtx, kind: str, precision: str, bundle, root: Path) -> Case:
    if isinstance(bundle, str):
        return Case(None, problem=bundle)
    try:
        plans = _engine_plans(bundle, precision)
    except Exception as e:  # noqa: BLE001 - the case's test says it
        return Case(bundle, problem=f"plan_builds refused it: {type(e).__name__}: {e}")
    jobs = [Job(graph, profile, f"{kind} {name} ({prec})")
            for name, prec, graph, profile in plans]
    results = compile_graphs(rtx, jobs, root / f"plans-{kind}-{precision}", workers=1)
    return Case(bundle, [(name, prec, graph, r) for (name, prec, graph, _), r
                         in zip(plans, results)])


def _demo_bundle(folder: Path):
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import default_source, load_model

    if default_source() is None:
        return Missing("the demo weights are not in this checkout (make train-demo)")
    export_bundle(load_model(default_source()), folder / "bundle", ExportOptions())
    return folder / "bundle"


def _sdxl_bundle(folder: Path):
    """The tiny SDXL base (tests/parity/test_sdxl.py's): two text encoders, the second with
    two outputs, a U-Net with text_embeds and time_ids."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

    export_bundle(load_model(save_tiny_sdxl(folder / "model", "base")), folder / "bundle",
                  ExportOptions())
    return folder / "bundle"


# the kinds this module exports itself (not a session fixture of conftest.py)
OWN_BUNDLES = {"demo": _demo_bundle, "sdxl": _sdxl_bundle}


def _variant(src, dst: Path, precision: str, args: tuple[str, ...]):
    """A copy of ``src`` with `ldm-export PRECISION` run on it; a str saying why not."""
    from helpers import run_cli

    if isinstance(src, str):
        return src
    shutil.copytree(src, dst)
    r = run_cli("-m", "ldm_edge.export.cli", precision, str(dst), *args, timeout=CLI_TIMEOUT_S)
    if r.returncode:
        return f"`ldm-export {precision}` failed: {r.stderr.strip()[-1500:]}"
    return dst


def _engine_plans(bundle: Path, precision: str) -> list[tuple]:
    """What `ldm-export engines BUNDLE --precision P` builds, by its own planning:
    (component, precision, graph, profile), the profile of its default options."""
    from ldm_edge.export.engines import ProfileOptions, plan_builds
    from ldm_edge.runtime.bundle.opener import open_bundle

    plans = [(name, prec, Path(source.path), profile) for name, prec, source, profile
             in plan_builds(open_bundle(bundle), precision, ProfileOptions())]
    return [p for p in plans if precision != "int8" or p[1] == "int8"]


def _case(cases: dict, kind: str, precision: str) -> Case:
    case = cases[(kind, precision)]
    if isinstance(case.problem, Missing):
        pytest.skip(case.problem)
    if case.problem:
        pytest.fail(case.problem)
    assert case.built, f"{kind}: no graph to build at {precision}"
    return case


# -- the bundles' graphs -----------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_engine_graph_parses_and_builds(kind, precision, cases):
    built = _case(cases, kind, precision).built
    failed = [f"{name} ({prec}, {graph.name}): {r.error}"
              for name, prec, graph, r in built if not r.ok]
    assert not failed, "\n".join(failed)
    assert all(r.plan_bytes > 0 for *_, r in built)
    if precision == "fp16":  # FP16 graphs really went in (a component may stay FP32)
        assert "fp16" in {prec for _, prec, _, _ in built}
    if kind in ONE_BUNDLE.values():  # the ControlNets' graphs too, at this precision (the
        # cheap FP16_ARGS' two prompts run one ControlNet: the other stays FP32)
        nets = {prec for name, prec, _, _ in built if name.startswith("controlnet/")}
        assert precision in nets, nets


@pytest.mark.parametrize("kind", INT8_KINDS)
def test_int8_unet_tensorrt_form_keeps_its_qdq_and_builds(kind, cases):
    """The graph handed over is checked, not only the build: through the plugin a graph with
    INT32 bias DequantizeLinear still builds (with the Conv's weights quietly back in float),
    see test_an_int32_bias_dequantize_builds_through_the_plugin."""
    from ldm_edge.export.engines import tensorrt_graph
    from ldm_edge.runtime.bundle.onnx_scan import int32_dequantize
    from ldm_edge.runtime.bundle.opener import open_bundle

    case = _case(cases, kind, "int8")
    built, bundle = case.built, case.bundle
    manifest = open_bundle(bundle)
    graph = tensorrt_graph(manifest, "unet", "int8")
    record = json.loads((bundle / "manifest.json").read_text())
    form = record["components"]["unet"]["variants"]["int8"]["forms"]["tensorrt"]
    assert graph.name == form["file"]
    assert [g for name, _, g, _ in built if name == "unet"] == [graph]
    assert int32_dequantize(graph) == []
    weights = _int8_weight_dequantize(graph)
    assert weights, "the TensorRT form has no INT8 weight DequantizeLinear"
    assert len(weights) == len(_int8_weight_dequantize(manifest.variant("unet", "int8").path))
    # a ControlNet's INT8 graph is its own TensorRT form (calibration/int8_controlnet.py)
    assert all(name == "unet" or name.startswith("controlnet/") for name, *_ in built)
    assert all(int32_dequantize(g) == [] and _int8_weight_dequantize(g) for *_, g, _ in built)
    for name, _, _, result in built:
        assert result.ok, (name, result.error)


def _int8_weight_dequantize(path: Path) -> list[str]:
    """DequantizeLinear nodes reading an INT8 initializer (quantised weights)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    return [n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]


# -- the harness can fail ----------------------------------------------------------------------
def _conv_graph(path: Path, *, extra_unique=False, weight_axis=0, int32_bias=False) -> Path:
    """x [batch, 4, h, w] -> Q/DQ -> Conv(8, 3x3) with int8 per-channel weights -> y; the
    weight scales on ``weight_axis``; the bias float, or INT32 behind a DequantizeLinear (what
    onnxruntime's integer kernels want); ``extra_unique``: a Unique after it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    consts = {"w_q": rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8),
              "w_scale": np.full(8, 0.01, np.float32), "x_scale": np.array(0.02, np.float32),
              "zero": np.array(0, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=weight_axis,
                              name="weight_dq")]
    if int32_bias:
        consts.update(b_q=rng.integers(-99, 99, 8).astype(np.int32),
                      b_scale=np.array(2e-4, np.float32))
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b"],
                                      name="bias_dq"))
    else:
        consts["b"] = rng.standard_normal(8).astype(np.float32)
    nodes.append(helper.make_node("Conv", ["x_dq", "w", "b"], ["y"], pads=[1, 1, 1, 1]))
    if extra_unique:
        nodes[-1].output[0] = "c"
        nodes.append(helper.make_node("Unique", ["c"], ["y"], sorted=1))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


PROFILE = {"x": {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [4, 4, 32, 32]}}


@pytest.fixture
def onnx_module():
    return pytest.importorskip("onnx", reason="needs onnx (pip install .[export]) to write the "
                                              "hand-made graphs")


def test_a_plain_qdq_conv_builds(rtx, onnx_module, tmp_path):
    r = compile_graph(rtx, _conv_graph(tmp_path / "conv.onnx"), PROFILE, tmp_path / "out")
    assert r.ok, r.error
    assert r.plan_bytes > 0


def test_an_unsupported_op_is_refused_by_the_parser(rtx, onnx_module, tmp_path):
    r = compile_graph(rtx, _conv_graph(tmp_path / "u.onnx", extra_unique=True), PROFILE,
                      tmp_path / "out")
    assert not r.ok
    assert "Unique" in r.error and "checkUnique" in r.error, r.error


def test_weight_scales_on_the_wrong_axis_are_refused_by_the_parser(rtx, onnx_module, tmp_path):
    r = compile_graph(rtx, _conv_graph(tmp_path / "axis.onnx", weight_axis=1), PROFILE,
                      tmp_path / "out")
    assert not r.ok
    assert "DequantizeLinear" in r.error and "number of scales" in r.error, r.error


def test_the_profile_reaches_the_builder(rtx, onnx_module, tmp_path):
    upside_down = {"x": {"min": [4, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [1, 4, 32, 32]}}
    r = compile_graph(rtx, _conv_graph(tmp_path / "conv.onnx"), upside_down, tmp_path / "out")
    assert not r.ok
    assert "MIN<=OPT<=MAX" in r.error, r.error


def test_an_int32_bias_dequantize_builds_through_the_plugin(rtx, onnx_module, tmp_path):
    """The plugin rewrites an INT32 DequantizeLinear before its parser sees it (the parser
    alone refuses it) and builds: so the tier checks the graphs it hands over, and
    `ldm-export engines` refuses such a graph before TensorRT (check_for_tensorrt)."""
    from ldm_edge.export.engines import check_for_tensorrt
    from ldm_edge.runtime.bundle.onnx_scan import int32_dequantize
    from ldm_edge.runtime.errors import UsageError

    graph = _conv_graph(tmp_path / "int32.onnx", int32_bias=True)
    assert compile_graph(rtx, graph, PROFILE, tmp_path / "out").ok
    assert int32_dequantize(graph) == ["bias_dq"]
    with pytest.raises(UsageError, match="INT32"):
        check_for_tensorrt("unet", "int8", graph)


def test_a_child_that_dies_fails_its_own_graph_only(rtx, onnx_module, tmp_path, monkeypatch):
    graphs = [_conv_graph(tmp_path / f"{n}.onnx") for n in "abc"]
    monkeypatch.setenv("RTX_CHILD_ABORT_ON", "b.onnx")
    results = compile_graphs(rtx, [Job(g, PROFILE) for g in graphs], tmp_path / "out", workers=1)
    assert [r.ok for r in results] == [True, False, True], results
    assert "the child died compiling b.onnx" in results[1].error


# -- what skips the tier -----------------------------------------------------------------------
@pytest.mark.parametrize("missing, reason", [
    ("platform", "linux x86_64 only"), ("plugin", "is not installed"),
    ("build", "is not the pinned"), ("gcc", "no C compiler")])
def test_a_missing_part_is_a_skip_reason(missing, reason, tmp_path, monkeypatch):
    if missing in ("build", "gcc"):  # these are checked once the plugin is found
        try:
            rtx_build.find_plugin()
        except rtx_build.Unavailable as e:
            pytest.skip(f"needs the plugin installed: {e}")
    patch = {"platform": (rtx_build.platform, "machine", lambda: "aarch64"),
             "plugin": (rtx_build.importlib.util, "find_spec", lambda name: None),
             "build": (rtx_build, "PLUGIN_SHA256", "0" * 64),
             "gcc": (rtx_build.shutil, "which", lambda name: None)}[missing]
    monkeypatch.setattr(*patch)
    with pytest.raises(rtx_build.Unavailable, match=reason):
        rtx_build.toolchain(tmp_path / "lib")
    assert not (tmp_path / "lib").exists()  # nothing laid out for a tier that skips
