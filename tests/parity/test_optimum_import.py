"""Folders exported by Hugging Face Optimum: imported into a bundle, and run as they are.

The folders are made here from the tiny diffusers models, laid out and named as Optimum
writes them (each component traced with torch.onnx.export under Optimum's I/O names and
dtypes), in two generations:

* "v1" (Optimum <= 1.23, diffusers' legacy script): int32 input_ids, int64 timestep of
  shape [steps], U-Net weights in model.onnx_data, VAE encoder -> a sampled latent_sample,
  only the slow tokenizer's vocab.json + merges.txt;
* "v2" (Optimum >= 1.24): int64 input_ids, float32 *scalar* timestep, VAE encoder ->
  latent_parameters, tokenizer.json present.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, run_cli, to_uint8
from PIL import Image

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.errors import BundleError
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.bundle.optimum import is_optimum_folder, manifest_from_optimum

MIN_PSNR_DB = 50.0
STEPS = "6"
PROMPT = "a photo of a cat"
RUN = ("-m", "ldm_edge.runtime")
EXPORT = ("-m", "ldm_edge.export.cli")
STYLES = {"v1": "sd1", "v2": "sd2"}  # folder style -> tiny model family


# -- building Optimum-style folders ---------------------------------------------------------
def _export(module, args, path, inputs, outputs, axes):
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=17, dynamo=False)


class _Call(torch.nn.Module):
    def __init__(self, fn, *mods):
        super().__init__()
        self.mods = torch.nn.ModuleList(mods)
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def make_optimum_folder(src, dest, style: str):
    import onnx
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(src / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(src / "unet").eval()
    vae = AutoencoderKL.from_pretrained(src / "vae").eval()
    v1 = style == "v1"

    ids = torch.randint(0, 100, (2, 77), dtype=torch.int32 if v1 else torch.int64)
    _export(_Call(lambda i: tuple(te(input_ids=i, return_dict=False)[:2]), te), (ids,),
            dest / "text_encoder/model.onnx", ["input_ids"], ["last_hidden_state", "pooler_output"],
            {"input_ids": {0: "batch_size", 1: "sequence_length"}})

    t = torch.tensor([3, 5], dtype=torch.int64) if v1 else torch.tensor(500.0)
    unet_args = (torch.randn(2, 4, 16, 16), t, torch.randn(2, 77, 32))
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    if v1:
        axes["timestep"] = {0: "steps"}
    _export(_Call(lambda x, ts, e: unet(x, ts, e, return_dict=False)[0], unet), unet_args,
            dest / "unet/model.onnx", ["sample", "timestep", "encoder_hidden_states"],
            ["out_sample"], axes)
    if v1:  # big U-Nets keep their weights next to the graph
        proto = onnx.load(str(dest / "unet/model.onnx"))
        onnx.save_model(proto, str(dest / "unet/model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)

    _export(_Call(lambda z: vae.decode(z, return_dict=False)[0], vae), (torch.randn(1, 4, 16, 16),),
            dest / "vae_decoder/model.onnx", ["latent_sample"], ["sample"],
            {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
             "sample": {0: "batch_size", 2: "height", 3: "width"}})
    if v1:
        enc, out = (lambda x: vae.encode(x).latent_dist.sample()), "latent_sample"
    else:
        enc, out = (lambda x: vae.encode(x).latent_dist.parameters), "latent_parameters"
    _export(_Call(enc, vae), (torch.randn(1, 3, 128, 128),), dest / "vae_encoder/model.onnx",
            ["sample"], [out], {"sample": {0: "batch_size", 2: "height", 3: "width"},
                                out: {0: "batch_size", 2: "h", 3: "w"}})

    for sub in ("text_encoder", "unet"):
        shutil.copy(src / sub / "config.json", dest / sub / "config.json")
    for sub in ("vae_decoder", "vae_encoder"):
        shutil.copy(src / "vae" / "config.json", dest / sub / "config.json")
    shutil.copytree(src / "scheduler", dest / "scheduler")
    tok = dest / "tokenizer"
    tok.mkdir()
    shutil.copy(src / "tokenizer/tokenizer_config.json", tok)
    if v1:  # what transformers' slow CLIPTokenizer.save_pretrained writes
        model = json.loads((src / "tokenizer/tokenizer.json").read_text())["model"]
        (tok / "vocab.json").write_text(json.dumps(model["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    else:
        shutil.copy(src / "tokenizer/tokenizer.json", tok)
    index = {"_class_name": "ORTStableDiffusionPipeline", "_diffusers_version": "0.30.0",
             **{c: ["optimum", "ORTModel"] for c in ("text_encoder", "unet", "vae_decoder",
                                                      "vae_encoder")},
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"]}
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimum")
    return {s: make_optimum_folder(tiny_models[fam], root / f"optimum_{s}", s)
            for s, fam in STYLES.items()}


@pytest.fixture(scope="module")
def bundles(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for style, folder in folders.items():
        out[style] = root / f"bundle_{style}"
        r = run_cli(*EXPORT, "import-optimum", str(folder), "-o", str(out[style]))
        assert r.returncode == 0, r.stderr
        assert "wrote" in r.stdout
    return out


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("lat") / "latents.npy"
    np.save(p, np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32))
    return p


def _ldm_run(target, scheduler, latents_file, out):
    r = run_cli(*RUN, str(target), "-p", PROMPT, "--steps", STEPS, "--guidance-scale", "7.5",
                "--scheduler", scheduler, "--latents", str(latents_file), "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    return np.asarray(Image.open(out))[None]


def _reference(tiny_models, family, scheduler, latents_file):
    pipe = diffusers_pipeline(tiny_models[family], scheduler)
    return to_uint8(pipe(PROMPT, num_inference_steps=int(STEPS), guidance_scale=7.5,
                         latents=torch.from_numpy(np.load(latents_file)), output_type="np").images)


# -- tests ------------------------------------------------------------------------------------
def test_manifest_records_optimum_conventions(folders):
    assert all(is_optimum_folder(f) for f in folders.values())
    m1 = manifest_from_optimum(folders["v1"], for_import=True).to_json()
    c = m1["components"]
    assert c["text_encoder"]["spec"]["inputs"][0] == {"name": "input_ids", "dtype": "int32",
                                                      "shape": ["batch", 77]}
    assert c["unet"]["spec"]["inputs"][1]["dtype"] == "int64"
    assert c["unet"]["io_map"]["model_output"] == "out_sample"
    assert c["vae_decoder"]["io_map"] == {"latent": "latent_sample", "image": "sample"}
    assert c["vae_encoder"]["output_kind"] == "sample"
    assert [f["path"] for f in c["unet"]["variants"]["fp32"]["files"]] == \
        ["unet/model.onnx", "unet/model.onnx_data"]
    assert (m1["prediction_type"], m1["model"]["family"], m1["defaults"]["height"]) == \
        ("epsilon", "sd1", 128)
    assert len(m1["model"]["sha256"]) == 64 and m1["tokenizer"]["pad_token"] == "<|endoftext|>"

    m2 = manifest_from_optimum(folders["v2"], for_import=True).to_json()
    c = m2["components"]
    assert c["text_encoder"]["spec"]["inputs"][0]["dtype"] == "int64"
    assert c["unet"]["spec"]["inputs"][1] == {"name": "timestep", "dtype": "float32",
                                              "shape": ["batch"]}
    assert c["unet"]["timestep_input"] == "scalar"
    assert c["vae_encoder"]["output_kind"] == "parameters"
    assert (m2["model"]["family"], m2["tokenizer"]["pad_token"]) == ("sd2", "!")


def test_missing_vae_config_falls_back_with_warning(folders, tmp_path, caplog):
    f = tmp_path / "legacy"
    shutil.copytree(folders["v1"], f)
    for sub in ("vae_decoder", "vae_encoder"):
        (f / sub / "config.json").unlink()
    with caplog.at_level(logging.WARNING):
        m = manifest_from_optimum(f, hashes=False, for_import=True).to_json()
    assert (m["latent_channels"], m["vae_scale_factor"], m["scaling_factor"]) == (4, 8, 0.18215)
    assert "no VAE config" in caplog.text


@pytest.mark.parametrize("style,scheduler", [("v1", "ddim"), ("v1", "euler"), ("v2", "euler")])
def test_imported_bundle_matches_diffusers(style, scheduler, bundles, tiny_models, latents_file,
                                           tmp_path):
    m = open_bundle(bundles[style])  # hashes of the copies check out
    assert m.schema.tokenizer.file == "tokenizer.json"
    img = _ldm_run(bundles[style], scheduler, latents_file, tmp_path / "img.png")
    ref = _reference(tiny_models, STYLES[style], scheduler, latents_file)
    assert psnr(img, ref) >= MIN_PSNR_DB, psnr(img, ref)


def test_direct_run_needs_tokenizer_json(folders, bundles, tiny_models, latents_file, tmp_path):
    r = run_cli(*RUN, str(folders["v1"]), "-p", PROMPT, "--steps", "2", "-q",
                "-o", str(tmp_path / "x.png"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    assert "tokenizer.json" in lines[0] and "ldm-export import-optimum DIR -o BUNDLE" in lines[0]

    # with a tokenizer.json (as newer transformers save) the folder runs as it is
    f = tmp_path / "with_tok"
    shutil.copytree(folders["v1"], f)
    shutil.copy(tiny_models["sd1"] / "tokenizer/tokenizer.json", f / "tokenizer")
    direct = _ldm_run(f, "ddim", latents_file, tmp_path / "direct.png")
    imported = _ldm_run(bundles["v1"], "ddim", latents_file, tmp_path / "imported.png")
    assert np.array_equal(direct, imported)
    ref = _reference(tiny_models, "sd1", "ddim", latents_file)
    assert psnr(direct, ref) >= MIN_PSNR_DB


def test_scalar_timestep_needs_import(folders):
    with pytest.raises(BundleError, match="scalar timestep.*ldm-export import-optimum"):
        open_bundle(folders["v2"])


def test_linked_folder_runs_only_imported(folders, tiny_models, tmp_path):
    """A Hugging Face cache snapshot links its files into blobs/: refused as it is, copied
    (links followed) by the importer."""
    from ldm_edge.export.optimum_import import import_optimum

    snap, blobs = tmp_path / "snapshot", tmp_path / "blobs"
    shutil.copytree(folders["v1"], snap)
    shutil.copy(tiny_models["sd1"] / "tokenizer/tokenizer.json", snap / "tokenizer")
    blobs.mkdir()
    data = snap / "unet/model.onnx_data"
    shutil.move(data, blobs / "0123abcd")
    data.symlink_to(blobs / "0123abcd")
    with pytest.raises(BundleError, match="links outside.*ldm-export import-optimum"):
        open_bundle(snap)
    import_optimum(snap, tmp_path / "bundle")
    assert not (tmp_path / "bundle/unet/model.onnx_data").is_symlink()
    open_bundle(tmp_path / "bundle")


def test_img2img_with_sampling_encoder(bundles):
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundles["v1"])
    init = np.random.default_rng(0).integers(0, 255, (1, 128, 128, 3), dtype=np.uint8)
    lat = pipe.encode_image(init, np.random.default_rng(0))
    assert lat.shape == (1, 4, 16, 16) and np.isfinite(lat).all()
    out = pipe(PROMPT, num_inference_steps=2, init_image=init, strength=0.5, seed=0)
    assert out.images.shape == (1, 128, 128, 3)


def test_bad_folder_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    r = run_cli(*EXPORT, "import-optimum", str(tmp_path), "-o", str(tmp_path / "b"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "not an Optimum" in lines[0], r.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("damage", ["truncated_graph", "missing_weights"])
def test_damaged_folder_runs_to_one_line(damage, folders, tiny_models, tmp_path):
    """The folder's I/O is read from the graph's header fields (not by opening it), so
    damage is found either there or when the backend opens the graph: one line either way."""
    f = tmp_path / "folder"
    shutil.copytree(folders["v1"], f)
    shutil.copy(tiny_models["sd1"] / "tokenizer/tokenizer.json", f / "tokenizer")
    if damage == "truncated_graph":
        g = f / "unet/model.onnx"
        g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
    else:
        (f / "unet/model.onnx_data").unlink()
    out = tmp_path / "x.png"
    r = run_cli(*RUN, str(f), "-p", PROMPT, "--steps", "2", "-q", "-o", str(out))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "unet" in lines[0] and not out.exists()
    if damage == "missing_weights":
        assert "model.onnx_data', which is missing" in lines[0]
