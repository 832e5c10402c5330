"""Turbo-style few-step models (SD-Turbo: 1 step, no guidance, Euler on trailing timesteps):
the recommended defaults recorded at export (`ldm-export onnx --default-steps/
--default-guidance-scale/--default-scheduler`), so a plain `ldm-run B -p ...` samples as the
model's makers say; guidance 0 runs one U-Net call a step on the prompts alone; parity with
diffusers' StableDiffusionPipeline doing the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import run_cli, to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline

# only single-level rounding flips from ~1e-6 FP32 differences (test_pipeline_parity.py's bar)
MIN_PSNR_DB = 50.0
PROMPT = "a red cat"


@pytest.fixture(scope="module")
def turbo_model(tmp_path_factory):
    from ldm_edge.export.tiny import save_tiny_turbo

    return save_tiny_turbo(tmp_path_factory.mktemp("turbo") / "tiny_turbo")


@pytest.fixture(scope="module")
def turbo_bundle(turbo_model, tmp_path_factory):
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.model_facts import recommend_defaults

    model = load_model(turbo_model)
    model.defaults.update(recommend_defaults(steps=1, guidance_scale=0.0))
    out = tmp_path_factory.mktemp("turbo_bundle") / "b"
    export_bundle(model, out, ExportOptions(components=("text_encoder", "unet", "vae_decoder")))
    return out


def _latents():
    return np.random.default_rng(4).standard_normal((1, 4, 16, 16), dtype=np.float32)


def _diffusers(model, steps):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return to_uint8(pipe(PROMPT, num_inference_steps=steps, guidance_scale=0.0,
                         latents=torch.from_numpy(_latents()), output_type="np").images)


def test_the_recommended_defaults_are_what_a_plain_run_uses(turbo_model, turbo_bundle):
    pipe = Pipeline(turbo_bundle)
    batches = []
    pipe.add_call_hook(lambda c: batches.append(c.feeds["sample"].shape[0])
                       if c.name == "unet" else None)
    ours = pipe(PROMPT, latents=_latents())  # no steps, guidance or scheduler given
    assert batches == [1]  # one step, no guidance batch
    assert psnr(ours.images, _diffusers(turbo_model, 1)) >= MIN_PSNR_DB


def test_four_trailing_steps_match_diffusers(turbo_model, turbo_bundle):
    ours = Pipeline(turbo_bundle)(PROMPT, num_inference_steps=4, latents=_latents())
    ref = _diffusers(turbo_model, 4)
    assert psnr(ours.images, ref) >= MIN_PSNR_DB
    assert psnr(ours.images, _diffusers(turbo_model, 1)) < MIN_PSNR_DB  # 4 steps drew otherwise


def test_a_recorded_scheduler_is_the_default(turbo_bundle):
    import json

    from ldm_edge.runtime.bundle.opener import open_bundle
    from ldm_edge.runtime.request import BundleDefaults

    m = json.loads((turbo_bundle / "manifest.json").read_text())
    assert m["defaults"]["num_inference_steps"] == 1 and m["defaults"]["guidance_scale"] == 0.0
    assert "scheduler" not in m["defaults"]  # not asked for: the config's own (euler)
    assert BundleDefaults.from_manifest(open_bundle(turbo_bundle).schema).scheduler == "euler"
    m["defaults"]["scheduler"] = "euler-a"
    (turbo_bundle.parent / "m.json").write_text(json.dumps(m))
    from ldm_edge.runtime.bundle.schema import BundleManifest

    schema = BundleManifest.from_json(json.loads((turbo_bundle.parent / "m.json").read_text()))
    assert BundleDefaults.from_manifest(schema).scheduler == "euler-a"


@pytest.mark.parametrize("args,needle", [
    (["--default-steps", "0"], "--default-steps 0 must be between 1 and 1000"),
    (["--default-guidance-scale", "nan"], "--default-guidance-scale nan must be between 0"),
    (["--default-scheduler", "dpm++9"], "--default-scheduler 'dpm++9' is not one of"),
])
def test_bad_defaults_are_one_line_and_write_nothing(turbo_model, tmp_path, args, needle):
    out = tmp_path / "b"
    r = run_cli("-m", "ldm_edge.export.cli", "onnx", str(turbo_model), "-o", str(out), *args)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists()
