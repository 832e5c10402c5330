"""benchmarks/bench_controlnet.py (the cost of a ControlNet per step, docs/benchmarks.md) kept
from rotting: its plan names flags the CLIs declare, and a small real run on the tiny SD1
model with its tiny ControlNet (export/tiny.py, export/tiny_controlnet.py) goes through every
stage: building both models, ldm-export onnx --controlnet, a worker process per candidate
(diffusers' StableDiffusionControlNetPipeline and ours, with and without control), the
report. No timing is asserted; that both sides did the same work is (the final latents
match). The plain bundle and the INT8 variant each add an export (~30 s) and share every
other stage, so they run in the plan only."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import need_export_extra
from test_bench_few_step import _undeclared

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_controlnet.py"
# ours and diffusers' final latents after 2 DDIM steps with the ControlNet on the tiny model:
# 1 - 1e-7 measured (float noise); a run where one side skipped the ControlNet is ~0.93
MIN_LATENT_COSINE = 0.9999
STEPS = 2
RUN_TIMEOUT_S = 240  # a hang fails the test instead of the suite


@pytest.fixture(scope="module")
def bcn():
    spec = importlib.util.spec_from_file_location("bench_controlnet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_planned_exports_use_flags_ldm_export_declares(bcn, tmp_path):
    for tiny in (False, True):
        p = bcn.paths(tmp_path, tiny)
        for which in ("cn", "plain"):
            assert _undeclared(bcn.export_cmd(p, which, tiny)) == [], (tiny, which)
        assert _undeclared(bcn.int8_cmd(p, tiny)) == [], tiny
        cn = bcn.export_cmd(p, "cn", tiny)
        assert cn[cn.index("--controlnet") + 1] == f"{bcn.CN_NAME}={p['controlnet']}"
        assert "--controlnet" not in bcn.export_cmd(p, "plain", tiny)


def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path):
    out = tmp_path / "cn"
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not out.exists()
    assert f"ldm-export onnx {out / 'sd15-diffusers'} -o {out / 'sd15-cn-bundle'}" in r.stdout
    assert f"ldm-export int8 {out / 'sd15-cn-bundle'}" in r.stdout
    for cand in ("diffusers-cn", "ours-fp32-cn", "ours-int8-cn", "ours-fp32-zeros",
                 "ours-fp32-plain"):
        assert f"candidate {cand}:" in r.stdout
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--no-int8", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert "ldm-export int8" not in r.stdout and "ours-int8-cn" not in r.stdout


def test_bad_arguments_are_refused(tmp_path):
    for bad in (["--candidates", "ours-fp16-cn"], ["--repeats", "0"], ["--steps", "0"]):
        r = subprocess.run([sys.executable, str(SCRIPT), *bad, "--out", str(tmp_path)],
                           check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert r.returncode == 2, (bad, r.stderr)


def test_a_small_run_on_the_tiny_models(tmp_path):
    need_export_extra()
    out = tmp_path / "cn"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--candidates",
                        "diffusers-cn,ours-fp32-cn,ours-fp32-zeros", "--repeats", "1",
                        "--warmup", "0", "--steps", str(STEPS), "--threads", "1",
                        "--out", str(out)],
                       check=False, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "tiny-plain-bundle").exists()  # no candidate needed it
    res = json.loads((out / "results.json").read_text())["result"]
    s = res["summary"]
    assert list(s) == ["diffusers-cn", "ours-fp32-cn", "ours-fp32-zeros"]
    for label, st in s.items():
        assert st["calls"] == STEPS, label  # one CFG-batch U-Net call a step
        assert st["unet"]["n"] == STEPS and st["unet"]["median"] > 0, label
        assert st["peak_rss_mb"]["median"] > 0
    for label in ("diffusers-cn", "ours-fp32-cn"):
        assert s[label]["controlnet"]["n"] == STEPS, label  # one ControlNet call a step
        assert s[label]["step"]["median"] > s[label]["unet"]["median"]
    assert s["ours-fp32-zeros"]["controlnet"]["n"] == 0
    assert s["ours-fp32-cn"]["precisions"] == {"unet": "fp32", "controlnet/canny": "fp32"}
    parity = res["latents_vs_diffusers"]
    assert parity["ours-fp32-cn"]["cosine"] >= MIN_LATENT_COSINE
    assert parity["ours-fp32-zeros"]["cosine"] < MIN_LATENT_COSINE  # the ControlNet acted
    md = (out / "results.md").read_text()
    assert "### 128², 2 steps × 1 rounds" in md
    assert "| ControlNet share of the step |" in md
