"""The typed manifest: manifests written by earlier exporters read back and write out unchanged;
bad values are refused with the messages users see (tests/cli/bad_inputs.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ldm_edge.runtime.errors import BundleError
from ldm_edge.runtime.bundle.schema import (BundleManifest, ComponentRecord, DefaultsRecord,
                                            EngineRecord, Int8QualityRecord, VariantRecord)

DATA = Path(__file__).parent / "data"
# manifest.json files written by the exporter before the schema existed (commit 5a44f7d)
FIXTURES = ("manifest_v1_sd1.json", "manifest_v1_sd1_fp16_int8.json",
            "manifest_v1_optimum_sd1.json")


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", FIXTURES)
def test_old_manifests_round_trip_unchanged(name):
    raw = (DATA / name).read_text(encoding="utf-8")
    m = BundleManifest.from_json(json.loads(raw))
    assert m.to_json() == json.loads(raw)
    assert json.dumps(m.to_json(), indent=2) == raw.strip()  # key order kept too


def test_typed_reads_of_an_fp16_int8_manifest():
    m = BundleManifest.from_json(load("manifest_v1_sd1_fp16_int8.json"))
    unet = m.components["unet"]
    assert m.precisions("unet") == ["fp32", "fp16", "int8"]
    assert unet.spec.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.variants["fp16"].islands == "base"
    int8 = unet.variants["int8"]
    assert int8.format == "QDQ" and int8.method == "percentile" and int8.quantized_nodes
    assert int8.sha256 == int8.files[0].sha256 and len(int8.sha256) == 64
    assert isinstance(m.quality["int8"], Int8QualityRecord)
    assert m.quality["int8"].min_psnr is None and m.quality["fp16"].psnr_db > 30
    assert (m.tokenizer.max_length, m.tokenizer.pad_token) == (77, "<|endoftext|>")
    assert m.multiple == 8 and m.model.family == "sd1"


def test_optimum_manifest_keeps_its_quirks():
    m = BundleManifest.from_json(load("manifest_v1_optimum_sd1.json"))
    enc = m.components["vae_encoder"]
    assert enc.output_kind == "sample" and enc.graph_name("image") == "sample"
    assert m.components["unet"].graph_name("model_output") == "out_sample"
    assert m.model.format == "optimum-onnx"


def test_unknown_keys_survive_and_absent_ones_stay_absent():
    d = load("manifest_v1_sd1.json")
    d["future_key"] = {"a": 1}
    d["components"]["unet"]["variants"]["fp32"]["new_fact"] = [1, 2]
    d["tokenizer"]["lowercase"] = False
    del d["size_multiple"], d["shift_factor"]
    m = BundleManifest.from_json(copy.deepcopy(d))
    assert m.multiple == 8  # the default, supplied once
    assert m.to_json() == d


def test_defaults_and_dims_are_typed_and_absent_keys_read_as_the_one_fallback():
    d = load("manifest_v1_sd1.json")
    d["defaults"] = {"height": 64}
    d["dims"] = {"max_size": 256}
    m = BundleManifest.from_json(copy.deepcopy(d))
    assert (m.defaults.height, m.defaults.width, m.defaults.guidance_scale) == (64, 512, 7.5)
    assert (m.dims.max_size, m.dims.max_batch, m.min_size) == (256, 1 << 16, m.multiple)
    assert m.to_json() == d  # the fallbacks are read, never written
    del d["defaults"], d["dims"]
    m = BundleManifest.from_json(copy.deepcopy(d))
    assert m.defaults.num_inference_steps == 25 and m.to_json() == d
    m.defaults.num_inference_steps = 8  # set in code: written, although it was not read
    assert m.to_json()["defaults"] == {"num_inference_steps": 8}
    built = BundleManifest(defaults={"height": 96, "width": 64}, dims={"min_size": 32})
    assert built.to_json()["defaults"] == {"height": 96, "width": 64}
    assert built.to_json()["dims"] == {"min_size": 32} and built.min_size == 32
    assert BundleManifest(defaults=DefaultsRecord(height=768)).to_json()["defaults"] == \
        {"height": 768}


def test_records_built_in_code_write_what_the_exporters_wrote():
    v = VariantRecord(file="u.onnx", kept_float_units=[], excluded_nodes={})
    assert v.to_json() == {"file": "u.onnx", "files": [], "excluded_nodes": {},
                           "kept_float_units": []}
    e = EngineRecord(backend="tensorrt", file="e.plan")
    assert e.to_json() == {"backend": "tensorrt", "file": "e.plan", "workspace_mb": None,
                           "optimization_level": None}
    c = ComponentRecord("unet", variants={"fp32": v})
    assert "io_map" not in c.to_json() and "engines" not in c.to_json()
    m = BundleManifest.from_json(load("manifest_v1_sd1.json"))
    assert "quality" not in m.to_json()
    m.components["unet"].variants["int8"] = v
    assert m.to_json()["components"]["unet"]["variants"]["int8"] == v.to_json()


def unet_fp32(d):
    return d["components"]["unet"]["variants"]["fp32"]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(format_version=99), "bundle format 99 is newer than this ldm-edge reads (1); "
                                            "upgrade ldm-edge"),
    (lambda d: d.update(format_version=0), "bundle format 0 is no longer read; re-export the bundle"),
    (lambda d: d.update(format_version="1"), "manifest format_version '1' is not an integer"),
    (lambda d: d.pop("scheduler"), "manifest.json lacks scheduler; re-export the bundle"),
    (lambda d: d.update(prediction_type="x"), "unknown prediction_type 'x'"),
    (lambda d: d.update(latent_channels=0), "manifest latent_channels is 0; re-export the bundle"),
    (lambda d: d.update(vae_scale_factor=True), "manifest vae_scale_factor is True; re-export the bundle"),
    (lambda d: d.update(scaling_factor="0.18"), "manifest scaling_factor is '0.18'; re-export the bundle"),
    (lambda d: d.update(shift_factor="x"), "manifest shift_factor is 'x'; re-export the bundle"),
    (lambda d: d.update(scheduler=[]), "manifest scheduler is []; re-export the bundle"),
    (lambda d: d["tokenizer"].update(max_length=-1), "manifest tokenizer.max_length is -1; re-export the bundle"),
    (lambda d: d["tokenizer"].pop("pad_token"), "manifest tokenizer.pad_token is None; re-export the bundle"),
    (lambda d: d["dims"].update(max_batch=0), "manifest dims.max_batch is 0; re-export the bundle"),
    (lambda d: d["defaults"].update(height=2.5), "manifest defaults.height is 2.5; re-export the bundle"),
    (lambda d: d["defaults"].update(guidance_scale="7"), "manifest defaults.guidance_scale is '7'; re-export the bundle"),
    (lambda d: d.update(components=[]), "manifest components is not an object; re-export the bundle"),
    (lambda d: d["components"].pop("unet"), "bundle has no unet; re-export it"),
    (lambda d: d["components"].update(foo={}), "unknown component 'foo' in manifest"),
    (lambda d: d["components"]["unet"].update(spec={"inputs": 3}), "unet: malformed spec in manifest"),
    (lambda d: d["components"]["unet"]["variants"].update(int4={}), "unet: unknown precision 'int4'"),
    (lambda d: unet_fp32(d)["files"].append("x.onnx"), "unet (fp32): malformed file record in manifest"),
])
def test_bad_values_are_refused_with_the_users_message(mutate, message):
    d = load("manifest_v1_sd1.json")
    mutate(d)
    with pytest.raises(BundleError) as e:
        BundleManifest.from_json(d)
    assert str(e.value).startswith(message)


def test_not_an_object():
    with pytest.raises(BundleError, match="manifest.json is not a JSON object"):
        BundleManifest.from_json([])
