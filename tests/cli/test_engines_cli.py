"""TensorRT engines where there is no TensorRT or GPU (this machine, CI): one-line refusals that
write nothing, and the engine-matching rule as a pure function of fake device facts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import run_cli

from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.export.engines import ProfileOptions, _put_record, shape_profile
from ldm_edge.runtime.bundle.schema import ComponentRecord, EngineRecord, read_manifest_json
from ldm_edge.runtime.errors import BundleError, UsageError
from ldm_edge.runtime.backends.trt_engines import (DeviceFacts, TensorRTUnavailable, device_facts,
                                                   engine_dir_name, engine_path, profile_hash,
                                                   profile_violation, select_engine)

# Run a console script as on a machine without TensorRT, whatever this one has.
NO_TRT = "import sys; sys.modules['tensorrt'] = None; from {mod} import main; main()"
H100 = DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", "10.3.0")
ORIN = DeviceFacts("Orin", "8.7", "10.3.0")
SHA = "ab" * 32
PROFILE = {"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [2, 4, 32, 32]}}


def _machine_builds() -> bool:
    try:
        device_facts()
        import polygraphy  # noqa: F401
    except (TensorRTUnavailable, ImportError):
        return False
    return True


def record(facts=H100, precision="fp16", profile=PROFILE, onnx=SHA, file="engines/x/unet.plan"):
    return {"backend": "tensorrt", "precision": precision, "trt_version": facts.trt_version,
            "device_name": facts.device_name, "compute_capability": facts.compute_capability,
            "profile": profile, "onnx_sha256": onnx, "file": file, "size": 1, "sha256": SHA}


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


# -- one line, nothing written -----------------------------------------------------------------
def test_engines_without_tensorrt_is_one_line_and_writes_nothing(bundle):
    before = snapshot(bundle)
    r = run_cli("-c", NO_TRT.format(mod="ldm_edge.export.cli"), "engines", str(bundle),
                "--precision", "fp32")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("ldm-export: error: TensorRT is not installed (pip install "
                               "'ldm-edge[trt-cu12]' or 'ldm-edge[trt-cu13]'")
    assert "onnxruntime" in lines[0] and "Traceback" not in r.stderr
    assert snapshot(bundle) == before and not (bundle / "engines").exists()


@pytest.mark.skipif(_machine_builds(), reason="TensorRT, Polygraphy and a GPU are present here: "
                    "tests/gpu/test_tensorrt.py builds engines instead")
def test_engines_here_is_one_line_and_writes_nothing(bundle):
    before = snapshot(bundle)
    r = run_cli("-m", "ldm_edge.export.cli", "engines", str(bundle))
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert lines[0].startswith("ldm-export: error: ") and "Traceback" not in r.stderr
    assert snapshot(bundle) == before


def test_run_backend_tensorrt_without_tensorrt_is_one_line(bundle, tmp_path):
    out = tmp_path / "x.png"
    r = run_cli("-c", NO_TRT.format(mod="ldm_edge.runtime.cli.run"), str(bundle), "-p", "a red cat",
                "--steps", "1", "--backend", "tensorrt", "-q", "-o", str(out))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("ldm-run: error: TensorRT is not installed")
    assert not out.exists()


def test_tf32_flag_reaches_the_build(monkeypatch, tmp_path):
    """`--tf32` is passed on as tf32=True, and its absence as tf32=False (never left unsaid:
    Polygraphy and TensorRT disagree on the default)."""
    from click.testing import CliRunner

    from ldm_edge.export import cli, engines

    seen = {}
    monkeypatch.setattr(engines, "build_engines", lambda bundle, **kw: seen.update(kw) or [])
    for args, want in (([], False), (["--tf32"], True)):
        r = CliRunner().invoke(cli.main, ["engines", str(tmp_path), *args])
        assert r.exit_code == 0, r.output
        assert seen.pop("tf32") is want


def test_help_lists_engines_command():
    r = run_cli("-m", "ldm_edge.export.cli", "--help")
    assert r.returncode == 0 and "engines" in r.stdout


def test_plain_imports_pull_in_no_tensorrt_polygraphy_cuda_or_torch():
    code = ("import sys, ldm_edge.runtime.backends.choose, ldm_edge.runtime.backends.tensorrt, "
            "ldm_edge.runtime.backends.trt_engines, ldm_edge.export.engines, ldm_edge.export.cli; "
            "bad = [m for m in ('tensorrt', 'polygraphy', 'cuda', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# -- choosing an engine: pure, fake device facts ----------------------------------------------
def test_matching_engine_is_chosen():
    recs = [record(ORIN), record(H100)]
    assert select_engine(recs, H100, component="unet", precision="fp16", onnx_sha256=SHA) is recs[1]


@pytest.mark.parametrize("other", [
    DeviceFacts("NVIDIA H100 80GB HBM3", "8.6", "10.3.0"),  # compute capability
    DeviceFacts("NVIDIA H100 80GB HBM3", "9.0", "11.1.0"),  # TensorRT version
    DeviceFacts("NVIDIA A100-SXM4-80GB", "9.0", "10.3.0"),  # GPU model
])
def test_engine_for_another_machine_is_refused_with_rebuild_hint(other):
    with pytest.raises(BundleError) as e:
        select_engine([record(H100)], other, component="unet", precision="fp16",
                      onnx_sha256=SHA, bundle="/b")
    msg = str(e.value)
    assert "\n" not in msg and "`ldm-export engines /b --precision fp16`" in msg
    assert "NVIDIA H100 80GB HBM3 (sm90, TensorRT 10.3.0)" in msg and str(other) in msg


def test_engine_from_an_older_onnx_is_refused():
    with pytest.raises(BundleError, match="older ONNX graph.*ldm-export engines"):
        select_engine([record(H100)], H100, component="unet", precision="fp16",
                      onnx_sha256="cd" * 32)


def test_no_engine_says_how_to_build_one():
    with pytest.raises(BundleError, match="no int8 TensorRT engine.*--precision int8"):
        select_engine([], H100, component="unet", precision="int8", onnx_sha256=SHA)


def test_widest_profile_wins_among_matching_engines():
    small = {"sample": {"min": [2, 4, 16, 16], "opt": [2, 4, 16, 16], "max": [2, 4, 16, 16]}}
    recs = [record(profile=small), record(profile=PROFILE), record(profile=small)]
    assert select_engine(recs, H100, component="unet", precision="fp16", onnx_sha256=SHA) is recs[1]


def test_open_backend_refuses_doctored_record_and_auto_falls_back(bundle, fake_trt):
    from ldm_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from ldm_edge.runtime.backends.choose import open_backend

    fake_trt(facts=ORIN)
    m = open_bundle(bundle)
    unet = m.component("unet")
    unet.engines = [EngineRecord.from_json(record(H100, precision="fp32"), "unet engine")]
    with pytest.raises(BundleError) as e:
        open_backend(m, "unet", backend="tensorrt")
    assert f"`ldm-export engines {bundle} --precision fp32`" in str(e.value)
    assert "not this Orin (sm87, TensorRT 10.3.0)" in str(e.value)
    assert isinstance(open_backend(m, "unet", backend="auto"), OnnxRuntimeBackend)
    # a record for this machine whose file is gone: refused before TensorRT is asked to load it
    sha = unet.variants["fp32"].files[0].sha256
    unet.engines = [EngineRecord.from_json(record(ORIN, precision="fp32", onnx=sha), "unet engine")]
    with pytest.raises(BundleError, match="missing from the bundle; rebuild"):
        open_backend(m, "unet", backend="tensorrt")


def test_auto_without_engines_never_asks_for_tensorrt(bundle, fake_trt):
    from ldm_edge.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from ldm_edge.runtime.backends.choose import open_backend

    def boom():
        raise AssertionError("device_facts called")
    fake_trt(facts=boom, tensorrt=boom, cudart=boom)
    assert isinstance(open_backend(open_bundle(bundle), "unet"), OnnxRuntimeBackend)


# -- naming and profiles --------------------------------------------------------------------------
def test_engine_path_names_machine_precision_and_profile():
    rtx = DeviceFacts("NVIDIA GeForce RTX 4090", "8.9", "10.3.0")
    p = engine_path(rtx, "unet", "fp16", PROFILE)
    assert p == ("engines/nvidia-geforce-rtx-4090-sm89-trt10.3.0/"
                 f"unet.fp16.{profile_hash(PROFILE)}.plan")
    assert engine_dir_name(ORIN) == "orin-sm87-trt10.3.0"
    reordered = {"sample": {"max": [2, 4, 32, 32], "min": [1, 4, 8, 8], "opt": [2, 4, 16, 16]}}
    assert profile_hash(reordered) == profile_hash(PROFILE) and len(profile_hash(PROFILE)) == 12


def test_profile_from_manifest_ranges_doubles_guided_batch(bundle):
    m = read_manifest_json(bundle)
    opts = ProfileOptions(min_size=64, max_size=256, max_batch=2)
    unet = shape_profile(m, "unet", opts)
    assert unet["sample"] == {"min": [1, 4, 8, 8], "opt": [2, 4, 16, 16], "max": [4, 4, 32, 32]}
    assert unet["encoder_hidden_states"]["max"] == [4, 77, 32]
    assert shape_profile(m, "text_encoder", opts)["input_ids"]["max"] == [4, 77]
    assert shape_profile(m, "vae_decoder", opts)["latent"]["max"] == [2, 4, 32, 32]
    assert shape_profile(m, "vae_encoder", opts)["image"]["max"] == [2, 3, 256, 256]
    static = shape_profile(m, "unet", ProfileOptions(static=True, opt_size=256))["sample"]
    assert static["min"] == static["opt"] == static["max"] == [2, 4, 32, 32]
    full = shape_profile(m, "unet", ProfileOptions())["sample"]  # as exported: 32-1024 px, 4 images
    assert full["min"] == [1, 4, 4, 4] and full["max"] == [8, 4, 128, 128]


@pytest.mark.parametrize("opts,needle", [
    (ProfileOptions(max_size=2048), "outside the range the ONNX graphs were exported for"),
    (ProfileOptions(max_batch=9), "larger --max-batch"),
    (ProfileOptions(min_size=36), "--min-size 36 must be a positive multiple of 8"),
    (ProfileOptions(min_size=256, opt_size=128), "does not hold"),
    (ProfileOptions(static=True, max_size=512), "--static builds one shape"),
])
def test_bad_profile_options_are_refused(bundle, opts, needle):
    m = read_manifest_json(bundle)
    with pytest.raises(UsageError, match=needle):
        shape_profile(m, "unet", opts)


def test_shape_outside_engine_profile_is_named():
    assert profile_violation(PROFILE, "sample", (2, 4, 16, 16)) is None
    assert "outside the engine's profile" in profile_violation(PROFILE, "sample", (4, 4, 16, 16))
    assert profile_violation(PROFILE, "timestep", (7,)) is None  # not profiled: fixed shape
    assert profile_violation(PROFILE, "sample", (4, 4)) is None  # wrong rank: the spec check's


def test_backend_spec_takes_the_engine_ranges(bundle):
    from ldm_edge.runtime.backends.trt_engines import narrow_spec

    spec = open_bundle(bundle).spec("unet")
    narrow = narrow_spec(spec, {"sample": PROFILE["sample"]})
    assert narrow.ranges == {"batch": (1, 2), "latent_height": (8, 32), "latent_width": (8, 32)}
    assert spec.ranges["batch"] == (1, 8)


def test_rebuilding_replaces_the_record_for_the_same_file():
    unet = ComponentRecord("unet", engines=[EngineRecord.from_json(r, "e") for r in
                                            (record(file="a"), record(ORIN, file="b"))])
    _put_record(unet, EngineRecord.from_json({**record(file="a"), "sha256": "new"}, "e"))
    files = [(r.file, r.sha256) for r in unet.engines]
    assert files == [("b", SHA), ("a", "new")]


@pytest.mark.parametrize("zero_point,count", [(0, 0), (3, 1)])
def test_asymmetric_qdq_is_found_before_tensorrt_is_asked(tmp_path, zero_point, count):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import helper, numpy_helper

    from ldm_edge.export.engines import asymmetric_qdq

    inits = [numpy_helper.from_array(np.float32(0.1), "s"),
             numpy_helper.from_array(np.int8(zero_point), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", ""], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [4])],
                              [helper.make_tensor_value_info("y", 1, [4])], inits)
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    assert asymmetric_qdq(tmp_path / "m.onnx") == count
