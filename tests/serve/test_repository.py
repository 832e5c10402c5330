"""``ldm-export triton``: the repository's configs as Triton's own ModelConfig protobuf reads
them (the onnxruntime and tensorrt_plan backends are not on this machine, so their configs
are checked by parsing, not loading), graphs linked unchanged, atomic writing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import run_cli
from serve_helpers import venv_run

from ldm_edge.runtime.fsutil import sha256_file
from ldm_edge.runtime.bundle.schema import read_manifest_json

EXPORT = ("-m", "ldm_edge.export.cli")
# Parses every config.pbtxt under the repository with Triton's ModelConfig message (shipped
# in tritonclient) and prints them as JSON; an unknown field or a wrong type fails here.
PARSE = """
import json, pathlib, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
out = {}
for p in sorted(pathlib.Path(sys.argv[1]).glob('*/config.pbtxt')):
    msg = text_format.Parse(p.read_text(), model_config_pb2.ModelConfig())
    out[p.parent.name] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
print(json.dumps(out))
"""
TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def parse_configs(venv, repo) -> dict:
    r = venv_run(venv, PARSE, repo)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def written_configs(venv, bundle, kind: str, tmp_path) -> tuple:
    """(the repository `ldm-export triton` writes for ``bundle`` with ``kind`` components,
    its configs parsed as Triton's ModelConfig); fake engine records for tensorrt."""
    if kind == "tensorrt":
        with_fake_engines(bundle)
    repo = tmp_path / "repo"
    r = run_cli(*EXPORT, "triton", str(bundle), "-o", str(repo), "--components", kind)
    assert r.returncode == 0, r.stderr
    return repo, parse_configs(venv, repo)


def with_fake_engines(bundle):
    """Engine records (and files) as `ldm-export engines` writes them, for the config only."""
    m = json.loads((bundle / "manifest.json").read_text())
    for name, comp in m["components"].items():
        (bundle / f"{name}.fp32.plan").write_bytes(b"not a real engine")
        comp["engines"] = [{"backend": "tensorrt", "precision": "fp32", "device_name": "fake",
                            "file": f"{name}.fp32.plan"}]
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("kind", ["onnxruntime", "tensorrt", "python"])
def test_configs_parse_as_triton_model_config(kind, serve_venv, bundle, tmp_path):
    repo, configs = written_configs(serve_venv, bundle, kind, tmp_path)
    manifest = read_manifest_json(bundle)
    assert set(configs) == {"ldm_pipeline", *manifest.components}
    for name, comp in manifest.components.items():
        cfg = configs[name]
        if kind == "tensorrt":
            assert cfg["platform"] == "tensorrt_plan"
        else:
            assert cfg["backend"] == kind
        assert cfg["max_batch_size"] == comp.spec.ranges["batch"][1]
        assert [(i["name"], i["data_type"]) for i in cfg["input"]] == \
            [(t.name, TRITON_TYPES[t.dtype]) for t in comp.spec.inputs]
        assert ("dynamic_batching" in cfg) == (name == "unet")
        version = repo / name / "1"
        if kind == "onnxruntime":  # the bundle's graph, linked: same file, same bytes
            graph = version / cfg["default_model_filename"]
            variant = comp.variants["fp32"]
            assert sha256_file(graph) == variant.sha256
            assert os.stat(graph).st_ino == os.stat(bundle / variant.file).st_ino
        elif kind == "tensorrt":
            assert (version / "model.plan").read_bytes() == b"not a real engine"
        else:
            assert (version / "model.py").is_file()
    pipe = configs["ldm_pipeline"]
    assert pipe["backend"] == "python" and pipe["parameters"]["components"]["string_value"] == kind


def test_parser_refuses_what_triton_would(serve_venv, tmp_path):
    """Negative control: the parse above does fail on a field ModelConfig does not have."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\nbatching: 3\n')
    r = venv_run(serve_venv, PARSE, tmp_path)
    assert r.returncode != 0 and "batching" in r.stderr


def test_refused_repository_leaves_nothing(bundle, tmp_path):
    repo = tmp_path / "repo"
    r = run_cli(*EXPORT, "triton", str(bundle), "-o", str(repo), "--components", "tensorrt")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "ldm-export: error: text_encoder has no fp32 TensorRT engine in this bundle; build one "
        "with `ldm-export engines BUNDLE --precision fp32` on the serving GPU, or use "
        "--components onnxruntime"]
    assert not repo.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]
    shutil.rmtree(bundle)  # a missing bundle: the runtime's one-line bundle error
    r = run_cli(*EXPORT, "triton", str(bundle), "-o", str(repo))
    assert r.returncode == 3 and r.stderr.startswith("ldm-export: error: bundle ") and not repo.exists()


@pytest.mark.parametrize("kind", ["onnxruntime", "tensorrt"])
def test_controlnets_are_models_of_the_repository(kind, serve_venv, controlnet_bundle,
                                                  tmp_path):
    """Each ControlNet is a model (controlnet/NAME as controlnet_NAME: a model is one folder),
    unbatched (its conditioning_scale has no batch dim), and the pipeline takes the control
    inputs; every config parses as Triton's ModelConfig."""
    bundle = tmp_path / "bundle"
    shutil.copytree(controlnet_bundle, bundle)
    _, configs = written_configs(serve_venv, bundle, kind, tmp_path)
    assert {"controlnet_edges", "controlnet_depth"} <= set(configs)
    spec = read_manifest_json(bundle).components["controlnet/edges"].spec
    cfg = configs["controlnet_edges"]
    assert cfg["name"] == "controlnet_edges" and cfg.get("max_batch_size", 0) == 0
    assert "dynamic_batching" not in cfg
    assert [i["name"] for i in cfg["input"]] == spec.input_names
    inputs = {i["name"]: i["data_type"] for i in configs["ldm_pipeline"]["input"]}
    assert (inputs["control"], inputs["control_image"], inputs["guess_mode"]) == \
        ("TYPE_STRING", "TYPE_STRING", "TYPE_BOOL")
