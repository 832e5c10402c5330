"""INT8 U-Net: an explicit Q/DQ graph with per-channel int8 weights, sensitive layers left in
float, fused int8 kernels in onnxruntime, its quality recorded truthfully, a PSNR budget."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ldm_edge.calibration import int8, qdq
from ldm_edge.calibration.ranges import Histogram
from ldm_edge.runtime.errors import ExportError
from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.cpu import NO_VNNI, VNNI, cpu_summary, int8_kernels
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.pipeline import Pipeline

PROMPTS = ["a red cat", "a blue square on a white background", "a green dog"]
CALIB_STEPS = 4
# Plain INT8 of the tiny SD1 model measures ~45-47 dB end to end; a budget this far above
# it can only be met by keeping some layers in float (all-float is exact: inf dB).
BUDGET_ABOVE_PLAIN_DB = 2.5
# Floor for "the INT8 picture is still the same picture" on the tiny model under its own
# scheduler (PNDM), by the INT8 kernels onnxruntime runs on this CPU (runtime/cpu.py): the
# same Q/DQ graph draws a different picture with and without VNNI. Measured (tiny SD1, the
# checks below):
# - 8-bit weights, VNNI (Intel Sapphire Rapids): 46.0 / 46.8 dB recorded, 46.7 dB for the
#   horse prompt, 44.7 dB with --symmetric; no VNNI: 33.75 dB recorded on an AMD EPYC (AVX2),
#   33.9 / 35.1 dB under `qemu-x86_64 -cpu Haswell` (CPUID without AVX-512, which onnxruntime
#   then dispatches to its AVX2 kernels): VPMADDUBSW's saturating 16-bit pair sums cost ~10 dB;
# - 7-bit weights (the default), VNNI: 45.9-46.1 / 46.4 dB, 45.1 dB with --symmetric; no VNNI
#   (qemu Haswell): 45.7 / 46.2 dB, 46.4 dB for the horse.
# Each floor sits 6-10 dB under its kind's lowest 7-bit measurement, for calibration drift
# across onnxruntime and numpy versions; with 8-bit weights the no-VNNI figures fall under
# it. What they catch (VNNI machine, PNDM): activation ranges cut to a quarter (clipping)
# give 27.8 dB; ranges four times too wide (2 bits lost) give 35.2 dB, which only the VNNI
# floor catches (the cosine floor below catches it on both kinds).
MIN_SANE_PSNR_DB = {VNNI: 40.0, NO_VNNI: 36.0}.get(int8_kernels(), 36.0)
# Floor of the content-independent measure: the INT8 U-Net's output vs FP32's on the FP32
# trajectory's inputs, every step of every default scheduler (bundletools/quality.py).
# Measured, tiny SD1, 7-bit: 0.9988-0.9994 (VNNI), 0.9983 with --symmetric; ranges four
# times too wide give 0.9876-0.9911, clipped ones 0.62-0.71. 0.995 leaves 3x headroom on
# 1 - cosine above the measured and still catches the 2-bits-lost case.
MIN_UNET_COSINE = 0.995
# The TensorRT form is measured without integer kernels (DequantizeLinear, then float layers:
# exact sums on every CPU kind). Measured, tiny SD1, PNDM: 43.9 dB (44.5 dB with onnxruntime's
# optimisations on), the same prompts as the INT8 graph's 45.7 dB; 6 dB under it allows for
# calibration drift across onnxruntime and numpy versions, and a form with one bit lost to
# mis-scaled activations (~6 dB) sits at its edge.
MIN_TENSORRT_FORM_PSNR_DB = 38.0
OWN = "pndm"  # the tiny models' own scheduler (what diffusers' SD pipelines ship with)
DEFAULT_SCHEDULERS = [OWN, "ddim", "euler", "dpm++2m"]
# Rules every SD U-Net must hit (reason -> a substring of one of its node names).
REQUIRED_RULES = {"time embedding": "time_emb_proj", "conv_in": "conv_in",
                  "conv_out": "conv_out", "shortcut conv": "conv_shortcut",
                  "activation x activation matmul": "attn1", "softmax": "Softmax"}


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundles, tmp_path_factory):
    dst = tmp_path_factory.mktemp("int8") / "sd1"
    shutil.copytree(tiny_bundles["sd1"], dst)
    int8.make_int8(dst, PROMPTS, calib_steps=CALIB_STEPS, method="percentile", progress=_quiet)
    return dst


@pytest.fixture(scope="module")
def budget(tiny_bundles, tmp_path_factory):
    from ldm_edge.bundletools.quality import end_to_end_psnr
    from ldm_edge.runtime.bundle.manifest import Manifest

    # one scheduler: the sweep measures many candidate graphs, each under every scheduler;
    # calibration takes the same list, so the plain graph is made with it first
    dst = tmp_path_factory.mktemp("int8budget") / "sd1"
    shutil.copytree(tiny_bundles["sd1"], dst)
    int8.make_int8(dst, PROMPTS, calib_steps=CALIB_STEPS, schedulers=[OWN], progress=_quiet)
    # the plain INT8 graph's figure (the budget's sweep measures graphs without their form)
    m = open_bundle(dst).schema
    m.components["unet"].variants["int8"].forms.clear()
    plain = end_to_end_psnr(Manifest(dst, m), "int8", int8.EVAL_PROMPTS,
                            steps=CALIB_STEPS, seed=int8.EVAL_SEED, schedulers=[OWN])["psnr_db"]
    target = plain + BUDGET_ABOVE_PLAIN_DB
    int8.make_int8(dst, PROMPTS, calib_steps=CALIB_STEPS, min_psnr=target, schedulers=[OWN],
                   progress=_quiet)
    return dst, plain, target


def _graph(bundle):
    m = open_bundle(bundle)
    return m, onnx.load(str(m.variant("unet", "int8").path))


def _producers(g):
    return {o: n for n in g.graph.node for o in n.output}


def test_graph_is_qdq_with_per_channel_int8_weights(int8_bundle):
    m, g = _graph(int8_bundle)
    v = m.variant("unet", "int8").record
    assert v.format == "QDQ" and v.method == "percentile"
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("QuantizeLinear") > 20 and ops.count("DequantizeLinear") > 40
    inits = {t.name: t for t in g.graph.initializer}
    prod, nodes = _producers(g), {n.name: n for n in g.graph.node}
    assert len(v.quantized_nodes) > 50
    for name in v.quantized_nodes:
        node = nodes[name]
        wdq = prod[node.input[1]]
        assert wdq.op_type == "DequantizeLinear"
        w, scale, zp = (inits[i] for i in wdq.input)
        assert w.data_type == onnx.TensorProto.INT8
        axis = {a.name: a.i for a in wdq.attribute}.get("axis", 1)
        assert list(scale.dims) == [w.dims[axis]] and w.dims[axis] > 1  # one scale per channel
        assert not numpy_helper.to_array(zp).any()  # symmetric
        assert np.abs(numpy_helper.to_array(w)).max() <= qdq.WEIGHT_MAX
        xdq = prod[node.input[0]]
        assert xdq.op_type == "DequantizeLinear" and prod[xdq.input[0]].op_type == "QuantizeLinear"
        assert inits[xdq.input[2]].data_type == onnx.TensorProto.INT8  # int8 activations
    fp32 = onnx.load(str(m.variant("unet", "fp32").path))
    assert [o.name for o in g.graph.output] == [o.name for o in fp32.graph.output]
    assert m.variant("unet", "int8").path.stat().st_size < 0.6 * m.variant("unet", "fp32").path.stat().st_size
    cal = v.calibration
    assert cal.prompts == PROMPTS and cal.steps == CALIB_STEPS
    assert cal.timesteps[0] > 500 and cal.timesteps[-1] < 100  # the whole trajectory


def test_sensitive_and_excluded_nodes_stay_float(int8_bundle):
    m, g = _graph(int8_bundle)
    excluded = m.variant("unet", "int8").record.excluded_nodes
    for rule, sub in REQUIRED_RULES.items():
        assert any(sub in n for n in excluded.get(rule, [])), rule
    prod, nodes = _producers(g), {n.name: n for n in g.graph.node}
    names = [n for group in excluded.values() for n in group]
    names += [n.name for n in g.graph.node if any(s in n.name for s in
                                                  ("/time_proj/", "/time_embedding/", "time_emb_proj"))]
    for name in names:
        node = nodes[name]  # still there, under its own name
        assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in node.input), name
        assert all(prod.get(i) is None or prod[i].op_type != "QuantizeLinear" for i in node.input), name


def test_runs_in_onnxruntime_with_int8_kernels(int8_bundle, tmp_path):
    import onnxruntime as ort

    ref = Pipeline(int8_bundle)("a photo of a horse", num_inference_steps=5, seed=3).images
    pipe = Pipeline(int8_bundle, precision="int8")
    out = pipe("a photo of a horse", num_inference_steps=5, seed=3).images
    assert pipe.backend("unet").precision == "int8"
    # ldm-export int8 made the fused-attention form, checked, and the backend runs it
    form = open_bundle(int8_bundle).variant("unet", "int8").record.forms["ort-mha"]
    assert form.fused_attention > 0 and form.check["passed"]
    assert pipe.backend("unet").form == "ort-mha"
    assert not np.array_equal(out, ref)  # the INT8 graph really ran
    assert psnr(out, ref) > MIN_SANE_PSNR_DB
    # onnxruntime turns every quantised layer into an integer kernel, none left as DQ -> float op
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(open_bundle(int8_bundle).variant("unet", "int8").path), opts,
                         providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    ops = [n.op_type for n in opt.graph.node]
    n_q = len(open_bundle(int8_bundle).variant("unet", "int8").record.quantized_nodes)
    assert ops.count("QLinearConv") + ops.count("MatMulIntegerToFloat") == n_q
    assert ops.count("QLinearConv") > 10 and ops.count("MatMulIntegerToFloat") > 10


def test_recorded_psnr_equals_a_fresh_measurement(int8_bundle):
    q = open_bundle(int8_bundle).schema.quality["int8"]
    assert q.method == "percentile" and q.prompts == int8.EVAL_PROMPTS
    assert q.cpu == cpu_summary()  # the figure says which CPU (kind of INT8 kernels) it is for
    assert list(q.per_scheduler) == DEFAULT_SCHEDULERS  # the model's own, then what people run
    _check_recorded(int8_bundle, q)
    own = q.per_scheduler[OWN]["psnr_db"]
    assert own > MIN_SANE_PSNR_DB, f"{own:.2f} dB with {int8_kernels()} INT8 kernels"


def test_unet_cosine_holds_at_every_step_of_every_scheduler(int8_bundle):
    """The content-independent figure: recorded per step, its minimum the headline, and each
    equal to a fresh computation from the FP32 trajectory's captured U-Net inputs."""
    from ldm_edge.calibration.capture import capture

    q = open_bundle(int8_bundle).schema.quality["int8"]
    for name, rec in q.per_scheduler.items():
        per_step = rec["unet_cosine_per_step"]
        # one per U-Net call: PNDM's Runge-Kutta warm-up makes one more than the steps
        assert len(per_step) == q.steps + (name == "pndm") and rec["unet_cosine_min"] == min(per_step)
        assert rec["unet_cosine_min"] > MIN_UNET_COSINE, (name, per_step, int8_kernels())
        assert 0 <= rec["latent_rel_error"] < 1
    assert q.unet_cosine_min == min(r["unet_cosine_min"] for r in q.per_scheduler.values())
    # step 0 of the DDIM trajectory, recomputed here with plain numpy
    calls = [capture(int8_bundle, [p], steps=q.steps, seed=q.seed + i, scheduler="ddim")["unet"][0]
             for i, p in enumerate(q.prompts)]
    ref, var = Pipeline(int8_bundle), Pipeline(int8_bundle, precision="int8")
    fresh = []
    for feeds in calls:
        a, b = (np.ravel(p.call_component("unet", feeds)).astype(np.float64) for p in (var, ref))
        fresh.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert min(fresh) == pytest.approx(q.per_scheduler["ddim"]["unet_cosine_per_step"][0], abs=1e-6)


def _check_recorded(bundle, q, size=(None, None)):
    """Each scheduler's recorded figures equal a fresh measurement; the headline is the worst."""
    ref, var = Pipeline(bundle), Pipeline(bundle, precision="int8")
    kw = dict(num_inference_steps=q.steps, height=size[0], width=size[1])
    for name, rec in q.per_scheduler.items():
        values = [psnr(var(p, seed=q.seed + i, scheduler=name, **kw).images,
                       ref(p, seed=q.seed + i, scheduler=name, **kw).images)
                  for i, p in enumerate(q.prompts)]
        assert values == pytest.approx(rec["per_prompt_db"], abs=1e-9), name
        assert rec["psnr_db"] == min(values)
    assert q.psnr_db == min(r["psnr_db"] for r in q.per_scheduler.values())
    assert q.per_scheduler[q.worst_scheduler]["psnr_db"] == q.psnr_db
    assert q.per_prompt_db == q.per_scheduler[q.worst_scheduler]["per_prompt_db"]


def test_quality_per_scheduler(bundle):
    """--schedulers: a figure per sampler, the worst is the headline --min-psnr holds."""
    m = int8.make_int8(bundle, PROMPTS[:1], calib_steps=2, schedulers=["ddim", "pndm", "ddim"],
                       progress=_quiet)
    q = m.quality["int8"]
    assert list(q.per_scheduler) == ["ddim", "pndm"]
    _check_recorded(bundle, q)


def test_calibrated_and_checked_at_the_size_asked_for(bundle):
    """--size: capture and check at the deployed size, recorded; the default, the model's own."""
    from ldm_edge.calibration import capture as capture_mod

    seen = []
    real = capture_mod.capture_runs

    def spy(*args, **kw):
        seen.append((kw.get("height"), kw.get("width")))
        return real(*args, **kw)

    import unittest.mock as mock

    with mock.patch.object(capture_mod, "capture_runs", spy):  # imported by make_int8 when called
        m = int8.make_int8(bundle, PROMPTS[:1], calib_steps=2, schedulers=[OWN], size=48,
                           progress=_quiet)
    v, q = m.components["unet"].variants["int8"], m.quality["int8"]
    assert seen == [(48, 48)] and v.calibration.size == [48, 48] and q.size == [48, 48]
    _check_recorded(bundle, q, size=(48, 48))
    native = open_bundle(bundle).schema.defaults
    assert int8.make_int8(bundle, PROMPTS[:1], calib_steps=2, schedulers=[OWN], progress=_quiet) \
        .components["unet"].variants["int8"].calibration.size == [native.height, native.width]


def test_seven_bit_weights_keep_the_integer_kernels(int8_bundle, tmp_path):
    """7-bit weights, the default: every weight within -63..63 (the largest at 63), biases
    rescaled with them, so onnxruntime still runs every quantised layer as an integer kernel."""
    import onnxruntime as ort

    m, g = _graph(int8_bundle)
    v = m.variant("unet", "int8").record
    assert "7-bit" in v.weights
    inits = {t.name: t for t in g.graph.initializer}
    prod, nodes = _producers(g), {n.name: n for n in g.graph.node}
    for name in v.quantized_nodes:
        w = numpy_helper.to_array(inits[prod[nodes[name].input[1]].input[0]])
        assert np.abs(w).max() == 63, name
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(m.variant("unet", "int8").path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") + ops.count("MatMulIntegerToFloat") == len(v.quantized_nodes)


def test_eight_bit_weights_on_request(bundle):
    """--weight-bits 8: the full -127..127 range (for VNNI CPUs and GPUs)."""
    m = int8.make_int8(bundle, PROMPTS[:1], calib_steps=2, weight_bits=8, schedulers=[OWN],
                       fused_form=False, progress=_quiet)
    v = m.components["unet"].variants["int8"]
    assert "bit" not in v.weights
    assert "ort-mha" not in v.forms and not list(bundle.glob("*int8*ort-mha*"))  # --no-fused-form
    mm, g = _graph(bundle)
    inits = {t.name: t for t in g.graph.initializer}
    prod, nodes = _producers(g), {n.name: n for n in g.graph.node}
    top = max(np.abs(numpy_helper.to_array(inits[prod[nodes[n].input[1]].input[0]])).max()
              for n in v.quantized_nodes)
    assert top == qdq.WEIGHT_MAX == 127
    if int8_kernels() == VNNI:  # without VNNI 8-bit weights saturate: see the floors above
        assert m.quality["int8"].psnr_db > MIN_SANE_PSNR_DB


def test_unknown_scheduler_is_a_usage_error(bundle):
    from click.testing import CliRunner

    from ldm_edge.calibration.cli_int8 import int8_cmd

    res = CliRunner().invoke(int8_cmd, [str(bundle), "--schedulers", "ddim,dpm++3m"])
    assert res.exit_code == 2 and "unknown scheduler 'dpm++3m' in --schedulers" in res.output
    assert "int8" not in open_bundle(bundle).precisions("unet")


@pytest.mark.parametrize("size,message", [("50", "--size 50 must be a positive multiple of 8"),
                                          ("4096", "--size 4096 is outside the bundle's exported range")])
def test_bad_size_is_a_usage_error(bundle, size, message):
    from click.testing import CliRunner

    from ldm_edge.calibration.cli_int8 import int8_cmd

    res = CliRunner().invoke(int8_cmd, [str(bundle), "--size", size])
    assert res.exit_code == 2 and message in res.output
    assert "int8" not in open_bundle(bundle).precisions("unet")


def test_min_psnr_keeps_the_most_harmful_layers_in_float(budget):
    bundle, plain, target = budget
    m, g = _graph(bundle)
    v, q = m.variant("unet", "int8").record, m.schema.quality["int8"]
    assert v.min_psnr["plain_int8_psnr_db"] == pytest.approx(plain, abs=1e-9)
    assert plain < target
    kept = v.kept_float_units
    assert kept and q.kept_float_units == kept
    assert q.psnr_db >= target and q.min_psnr == target
    steps = v.min_psnr["greedy"]
    greedy = [s for s in steps if not s.get("pruning")]
    assert [s["unit"] for s in greedy if s["kept"]] == kept
    # the sweep reached the target on plain graphs; the recorded figure is the same graph's,
    # through its fused form when one was kept (else measured on the plain graph itself)
    assert steps[-1]["psnr_db_after"] >= target or any(s["psnr_db_after"] >= target for s in steps)
    if not v.forms:
        assert any(s["psnr_db_after"] == pytest.approx(q.psnr_db, abs=1e-9) for s in steps)
    sweep = v.min_psnr["sensitivity"]
    snr = [s["unet_snr_db_only_this_int8"] for s in sweep]
    assert snr == sorted(snr)  # worst first, and tried in that order
    assert [s["unit"] for s in greedy] == [s["unit"] for s in sweep[: len(greedy)]]
    prod, nodes = _producers(g), {n.name: n for n in g.graph.node}
    kept_nodes = v.excluded_nodes["kept by min_psnr"]
    assert kept_nodes and not set(kept_nodes) & set(v.quantized_nodes)
    for name in kept_nodes:
        assert all(prod.get(i) is None or prod[i].op_type != "DequantizeLinear" for i in nodes[name].input)


def test_min_psnr_out_of_reach_is_an_error(tiny_bundles, tmp_path, monkeypatch):
    from ldm_edge.calibration import sensitivity

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], dst)
    # every candidate, all-float included, measures 20 dB: no keep-list can reach 30
    monkeypatch.setattr(sensitivity.EndToEnd, "__call__", lambda self, proto: 20.0)
    with pytest.raises(ExportError, match="out of reach"):
        int8.make_int8(dst, PROMPTS[:1], calib_steps=2, min_psnr=30.0, progress=_quiet)
    assert "int8" not in open_bundle(dst).precisions("unet")


def test_cli_writes_the_variant_and_summarises(tiny_bundles, tmp_path):
    from click.testing import CliRunner

    from ldm_edge.calibration.cli_int8 import int8_cmd

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], dst)
    res = CliRunner().invoke(int8_cmd, [str(dst), "--num-prompts", "1", "--calib-steps", "2",
                                        "--method", "minmax"])
    assert res.exit_code == 0, res.output
    assert "int8 end to end: PSNR" in res.output and "calibration pass" in res.output
    assert open_bundle(dst).variant("unet", "int8").record.method == "minmax"
    assert "TensorRT form" in res.output


def test_without_the_tensorrt_form_engines_refuse_int8_before_asking_tensorrt(tiny_bundles,
                                                                              tmp_path):
    """--no-tensorrt-form (and INT8 variants made before the form existed): the onnxruntime
    graph's INT32 biases are refused by `ldm-export engines` in one line, TensorRT or not."""
    from click.testing import CliRunner

    from ldm_edge.calibration.cli_int8 import int8_cmd
    from helpers import run_cli

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], dst)
    res = CliRunner().invoke(int8_cmd, [str(dst), "--num-prompts", "1", "--calib-steps", "2",
                                        "--no-tensorrt-form", "--schedulers", OWN])
    assert res.exit_code == 0, res.output
    assert "tensorrt" not in open_bundle(dst).variant("unet", "int8").record.forms
    r = run_cli("-m", "ldm_edge.export.cli", "engines", str(dst), "--precision", "int8",
                "--components", "unet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "DequantizeLinear" in lines[0] and "INT32" in lines[0] and "ldm-export int8" in lines[0]
    assert not (dst / "engines").exists()


def test_range_methods_on_outliers():
    rng = np.random.default_rng(0)
    h = Histogram()
    for i in range(4):  # later batches widen the range: counts are re-binned, none lost
        x = rng.standard_normal(200_000).astype(np.float32) * (1 + i)
        x[0] = 60.0 * (i + 1)  # rare large outliers (4 in all, under percentile's tail)
        h.update(x)
    assert h.counts.sum() == 800_000
    lo, hi = h.range("minmax")
    assert hi == pytest.approx(240.0)
    p_lo, p_hi = h.range("percentile")
    e_lo, e_hi = h.range("entropy")
    assert 8 < p_hi < 40 and -40 < p_lo < -8  # outliers clipped, the bulk (sd <= 4) kept
    assert 4 < e_hi < 100 and -100 < e_lo < -4


def test_calibration_samples_span_the_timesteps():
    # three runs as capture_runs() records them, one of 11 calls (PNDM's extra first call)
    runs = [[{"timestep": np.array([1000 - 100 * s], np.float32), "p": p}
             for s in range(10 + (p == 1))] for p in range(3)]
    picked = int8.evenly_over_timesteps(runs, 8)
    ts = sorted(float(r["timestep"][0]) for r in picked)
    assert len(picked) == 8 and ts[0] <= 100 and ts[-1] == 1000
    assert len({r["p"] for r in picked}) == 3
    assert len(int8.evenly_over_timesteps(runs, 100)) == 31  # fewer than n: all of them


def test_calibration_runs_take_the_checked_schedulers_in_turn(tiny_bundles):
    from ldm_edge.calibration.capture import capture_runs

    runs = capture_runs(tiny_bundles["sd1"], ["a", "b", "c"], steps=3,
                        schedulers=["pndm", "euler"])
    ts = [[float(np.ravel(c["timestep"])[0]) for c in r["unet"]] for r in runs]
    assert len(runs) == 3 and ts[0] == ts[2] and ts[0] != ts[1]  # pndm, euler, pndm


def test_calibration_passes_bounded_by_a_budget_give_the_same_histograms(tiny_bundles):
    from ldm_edge.calibration.ranges import collect

    m = open_bundle(tiny_bundles["sd1"])
    path = m.variant("unet", "fp32").path
    layers, _ = qdq.analyse(onnx.load(str(path), load_external_data=False).graph)
    names = list(dict.fromkeys([ly.act for ly in layers] + [ly.out for ly in layers if ly.out]))
    rng = np.random.default_rng(1)
    feeds = [{"sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
              "timestep": np.array([t, t], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
             for t in (900.0, 20.0)]
    before = sorted(p.name for p in path.parent.iterdir())
    one_msgs, many_msgs = [], []
    one = collect(path, names, feeds, progress=one_msgs.append)
    many = collect(path, names, feeds, budget=1 << 20, progress=many_msgs.append)  # 1 MiB
    assert len(one_msgs) == 1 and len(many_msgs) >= 4  # the tiny U-Net's ~5 MiB in passes
    for n in names:
        assert np.array_equal(one[n].counts, many[n].counts) and one[n].range("minmax") == many[n].range("minmax")
    assert sorted(p.name for p in path.parent.iterdir()) == before  # scratch graphs removed


def test_scope_names_of_dynamo_graphs_match_torchscript_names():
    from onnx import helper

    node = helper.make_node("Conv", ["silu_1", "unet.down_blocks.0.resnets.0.conv1.weight"], ["y"],
                            name="node_conv2d_1")
    scopes = ["", "unet", "unet.__dict__['_modules']['down_blocks'].0",
              "unet.__dict__['_modules']['down_blocks'].0.resnets.0",
              "unet.__dict__['_modules']['down_blocks'].0.resnets.0.conv1", "conv2d_1"]
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
    assert qdq.scope_name(node) == "/unet/down_blocks.0/resnets.0/conv1/Conv"
    bare = helper.make_node("Conv", ["x", "w"], ["z"], name="node_conv2d_2")
    assert qdq.scope_name(bare, "unet.up_blocks.1.attentions.0.proj_in.weight") == \
        "/unet/up_blocks.1/attentions.0/proj_in/Conv"
    assert qdq.module_of("/unet/up_blocks.1/attentions.0/transformer_blocks.0/attn1/to_q/MatMul") == \
        "/unet/up_blocks.1/attentions.0"


def test_symmetric_activations_for_tensorrt(tiny_bundles, tmp_path):
    """--symmetric: every zero point is 0 (TensorRT's only kind), and it still runs and draws
    close to FP32 in onnxruntime."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from ldm_edge.calibration.int8 import make_int8
    from ldm_edge.export.engines import asymmetric_qdq

    b = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], b)
    m = make_int8(b, num_prompts=2, calib_steps=4, symmetric=True, progress=lambda *_: None)
    path = b / m.components["unet"].variants["int8"].file
    g = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}
    zps = [inits[n.input[2]] for n in g.graph.node
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]
    assert zps and all(not np.any(z) for z in zps)
    assert asymmetric_qdq(path) == 0
    assert m.quality["int8"].per_scheduler[OWN]["psnr_db"] > MIN_SANE_PSNR_DB
    assert m.quality["int8"].unet_cosine_min > MIN_UNET_COSINE


# -- the TensorRT form (calibration/trt_form.py) ------------------------------------------------
def _inits(g):
    return {t.name: numpy_helper.to_array(t) for t in g.graph.initializer}


def test_tensorrt_form_is_a_graph_tensorrts_parser_reads(int8_bundle):
    """The form: the same quantised layers as the onnxruntime graph, int8 per-channel weights
    over the full 8-bit range, float biases (the FP32 graph's own), symmetric activations and
    no DequantizeLinear on INT32 anywhere; the onnxruntime graph keeps its INT32 biases."""
    from ldm_edge.export.engines import asymmetric_qdq
    from ldm_edge.runtime.bundle.onnx_scan import int32_dequantize

    m = open_bundle(int8_bundle)
    v = m.variant("unet", "int8")
    form = v.record.forms["tensorrt"]
    path = int8_bundle / form.file
    assert int32_dequantize(v.path), "onnxruntime's graph lost its int32 biases"
    assert int32_dequantize(path) == [] and asymmetric_qdq(path) == 0
    g, fp32 = onnx.load(str(path)), onnx.load(str(m.variant("unet", "fp32").path))
    inits, fp32_inits, prod = _inits(g), _inits(fp32), _producers(g)
    nodes = {n.name: n for n in g.graph.node}
    biased = 0
    for name in v.record.quantized_nodes:
        node = nodes[name]
        wdq = prod[node.input[1]]
        assert wdq.op_type == "DequantizeLinear" and inits[wdq.input[0]].dtype == np.int8
        assert np.abs(inits[wdq.input[0]]).max() == 127  # full range: per channel, the max
        assert prod[node.input[0]].op_type == "DequantizeLinear"
        if len(node.input) > 2 and node.input[2]:
            biased += 1
            bias = inits[node.input[2]]
            assert bias.dtype == np.float32
            np.testing.assert_array_equal(bias, fp32_inits[node.input[2]])
    assert biased > 10
    assert [o.name for o in g.graph.output] == [o.name for o in fp32.graph.output]


def test_tensorrt_form_is_measured_against_fp32_and_the_figure_holds(int8_bundle):
    """Recorded end to end under every scheduler of the INT8 check, and equal to a fresh
    measurement of a manifest whose INT8 U-Net is the form (onnxruntime without graph
    optimisations runs its DQ nodes, then float layers: no CPU-kind dependence)."""
    from ldm_edge.bundletools.quality import Reference, measure_precision
    from ldm_edge.calibration.trt_form import tensorrt_like
    from ldm_edge.runtime.bundle.manifest import Manifest
    from ldm_edge.runtime.bundle.schema import VariantRecord

    m = open_bundle(int8_bundle)
    q = m.schema.quality["int8"]
    form = m.variant("unet", "int8").record.forms["tensorrt"]
    check = form.check
    assert list(check["per_scheduler_db"]) == list(q.per_scheduler)
    assert check["psnr_db"] == min(check["per_scheduler_db"].values())
    assert check["unet_cosine_min"] > MIN_UNET_COSINE
    assert check["per_scheduler_db"][OWN] > MIN_TENSORRT_FORM_PSNR_DB
    schema = m.schema
    schema.components["unet"].variants["int8"] = VariantRecord(file=form.file, files=form.files)
    trial = Manifest(int8_bundle, schema)
    ref = Reference(trial, q.prompts, steps=q.steps, seed=q.seed, schedulers=list(q.per_scheduler))
    fresh = measure_precision(ref, trial, "int8", tensorrt_like)
    assert fresh["psnr_db"] == pytest.approx(check["psnr_db"], abs=1e-6)


def test_engines_build_int8_from_the_tensorrt_form(int8_bundle):
    """`ldm-export engines --precision int8` hands TensorRT the form and records its sha256,
    which the runtime matches the engine against."""
    from ldm_edge.export.engines import ProfileOptions, plan_builds, tensorrt_graph

    m = open_bundle(int8_bundle)
    form = m.variant("unet", "int8").record.forms["tensorrt"]
    assert tensorrt_graph(m, "unet", "int8") == int8_bundle / form.file
    (name, prec, source, _), = plan_builds(m, "int8", ProfileOptions(), ("unet",))
    assert (name, prec, source.path) == ("unet", "int8", int8_bundle / form.file)
    assert source.sha256 == form.files[0].sha256 != m.variant("unet", "int8").record.sha256


def test_int32_dequantize_is_refused_in_one_line_before_tensorrt(int8_bundle):
    """The pre-check: the onnxruntime INT8 graph (INT32 biases) is never handed to TensorRT."""
    from ldm_edge.export.engines import check_for_tensorrt
    from ldm_edge.runtime.errors import UsageError

    plain = open_bundle(int8_bundle).variant("unet", "int8").path
    with pytest.raises(UsageError) as e:
        check_for_tensorrt("unet", "int8", plain)
    msg = str(e.value)
    assert "\n" not in msg and "DequantizeLinear" in msg and "INT32" in msg
    assert "ldm-export int8 BUNDLE" in msg
