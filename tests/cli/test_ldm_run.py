"""ldm-run as a user calls it: a subprocess, its PNG, its exit codes, its imports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, imported_modules, run_cli, to_uint8
from PIL import Image

from ldm_edge.runtime.compare import psnr

# FP32 on both sides: only single-level rounding flips differ; 50 dB is an RMS error of
# 0.8 levels of 255, while a wrong scheduler step or guidance gives < 30 dB.
MIN_PSNR_DB = 50.0
STEPS = "10"
RUN = ("-m", "ldm_edge.runtime")


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("lat") / "latents.npy"
    np.save(p, np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32))
    return p


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_image_matches_diffusers(family, scheduler, tiny_models, tiny_bundles, latents_file,
                                 tmp_path):
    out = tmp_path / "img.png"
    r = run_cli(*RUN, str(tiny_bundles[family]), "--prompt", "a photo of a cat", "--steps", STEPS,
                "--guidance-scale", "7.5", "--scheduler", scheduler, "--latents", str(latents_file),
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "unet per step" in r.stderr and "denoising" in r.stderr
    img = np.asarray(Image.open(out))[None]
    pipe = diffusers_pipeline(tiny_models[family], scheduler)
    ref = to_uint8(pipe("a photo of a cat", num_inference_steps=int(STEPS), guidance_scale=7.5,
                        latents=torch.from_numpy(np.load(latents_file)), output_type="np").images)
    assert psnr(img, ref) >= MIN_PSNR_DB


def test_png_metadata_and_several_images(tiny_bundles, tmp_path):
    out = tmp_path / "x.png"
    r = run_cli(*RUN, str(tiny_bundles["sd1"]), "-p", "a red cat", "-p", "a blue dog",
                "--num-images", "2", "--steps", "2", "--seed", "3", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("x-*.png"))
    assert [f.name for f in files] == ["x-0.png", "x-1.png", "x-2.png", "x-3.png"]
    from ldm_edge.runtime.fsutil import default_mode

    assert files[0].stat().st_mode & 0o777 == default_mode()  # not mkstemp's 0600
    meta = json.loads(Image.open(files[2]).text["ldm-edge"])
    assert meta["prompt"] == "a blue dog" and meta["seed"] == 3 and meta["num_inference_steps"] == 2


def test_seed_is_reproducible(tiny_bundles, tmp_path):
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"{i}.png")
        r = run_cli(*RUN, str(tiny_bundles["sd1"]), "-p", "a cat", "--steps", "3", "--seed", "5",
                    "-q", "-o", str(outs[-1]))
        assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(p)) for p in outs)
    assert np.array_equal(a, b)


def test_runtime_loads_no_torch(tiny_bundles, tmp_path):
    r = run_cli("-X", "importtime", *RUN, str(tiny_bundles["sd2"]), "-p", "a cat", "--steps", "2",
                "--init-image", str(_png(tmp_path)), "-q", "-o", str(tmp_path / "o.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    mods = imported_modules(r.stderr)
    assert "onnxruntime" in mods  # the check sees real imports
    assert not mods & {"torch", "diffusers", "transformers"}


def _png(tmp_path, size=(128, 128)):
    p = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
    return p


def test_long_prompt_warns_how_many_tokens_dropped(tiny_bundles, tmp_path):
    r = run_cli(*RUN, str(tiny_bundles["sd1"]), "-p", " ".join(["cat"] * 90), "--steps", "1",
                "-q", "-o", str(tmp_path / "o.png"))
    assert r.returncode == 0
    assert "15 tokens dropped" in r.stderr  # 90 words + BOS + EOS = 92 tokens, 77 kept


@pytest.mark.parametrize("args,needle", [
    (["--scheduler", "nope"], "unknown scheduler 'nope'"),
    (["--height", "100"], "multiple of 8"),
    (["--width", "2048"], "outside the bundle's exported range"),
    (["--steps", "0"], "--steps 0 must be between"),
    (["--guidance-scale", "nan"], "--guidance-scale nan"),
    (["--num-images", "0"], "--num-images must be at least 1"),
    (["--latents", "WRONG"], "--latents has shape"),
    (["--latents", "MISSING"], "not found"),
    (["--init-image", "NOTIMAGE"], "not a readable image"),
    (["--init-image", "INIT", "--strength", "0"], "--strength 0.0 must be in (0, 1]"),
    (["-o", "out.jpg"], "must end in .png"),
    (["-o", "/nonexistent-dir/x.png"], "does not exist"),
    (["--backend", "tensorrt"], "TensorRT is not installed"),
    (["--precision", "fp16"], "no fp16 variant"),
])
def test_bad_arguments_one_line_no_traceback(args, needle, tiny_bundles, tmp_path):
    subs = {"WRONG": tmp_path / "wrong.npy", "MISSING": tmp_path / "missing.npy",
            "NOTIMAGE": tmp_path / "x.png", "INIT": _png(tmp_path)}
    np.save(subs["WRONG"], np.zeros((1, 4, 8, 8), np.float32))
    subs["NOTIMAGE"].write_text("hello")
    args = [str(subs.get(a, a)) for a in args]
    r = run_cli(*RUN, str(tiny_bundles["sd1"]), "-p", "a cat", "--steps", "2", "-q",
                *(args if "-o" in args else args + ["-o", str(tmp_path / "o.png")]))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_missing_bundle(tmp_path):
    r = run_cli(*RUN, str(tmp_path / "nope"), "-p", "a cat")
    assert r.returncode == 3 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_png_records_the_request_as_resolved(tiny_bundles, tmp_path):
    from ldm_edge.runtime.pipeline import Pipeline

    init, out = _png(tmp_path, size=(100, 90)), tmp_path / "o.png"
    r = run_cli(*RUN, str(tiny_bundles["sd1"]), "-p", "a cat", "-n", "blur", "--steps", "2",
                "--seed", "3", "--init-image", str(init), "--strength", "0.5", "-q",
                "-o", str(out))
    assert r.returncode == 0, r.stderr
    meta = json.loads(Image.open(out).text["ldm-edge"])
    pipe = Pipeline(tiny_bundles["sd1"])
    want = pipe.request(prompt=["a cat"], negative_prompt="blur", num_inference_steps=2, seed=3,
                        init_image=str(init), strength=0.5).to_dict()
    assert {k: meta[k] for k in want} == want
    assert meta["init_image"]["source"] == "init.png" and meta["strength"] == 0.5
    model = pipe.manifest.schema.model
    assert (meta["backend"], meta["precision"], meta["model"], meta["model_sha256"]) == \
        ("onnxruntime", "fp32", model.source, model.sha256)
    assert (meta["index"], meta["prompt"], meta["negative_prompt"]) == (0, "a cat", "blur")


def test_list_schedulers_needs_no_bundle():
    from ldm_edge.runtime.schedulers import scheduler_names

    r = run_cli(*RUN, "--list-schedulers")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == list(scheduler_names()) and r.stderr == ""
    assert "--list-schedulers" in run_cli(*RUN, "--help").stdout
