"""benchmarks/bench_few_step.py ("time to a 512² picture", docs/benchmarks.md) kept from
rotting: its plan names flags the CLIs declare, and its smallest real run — the tiny
SD-Turbo-shaped model (export/tiny.py) with the tiny VAE, FP32 — goes through every stage
(build, ldm-export with --tiny-vae, a worker process per side, the report). No timing is
asserted; that both sides did the same work is (the pictures match). The LCM model shares
every stage but its diffusers pipeline class; a second tiny model would double the test's
~30 s, so it runs in the plan only."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from helpers import need_export_extra
from ldm_edge.export.cli import main as export_main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_few_step.py"
# the Turbo pictures of both sides at one deterministic Euler step are ~89 dB apart on the
# tiny model (float noise); a run where the two sides drew different pictures is far below
MIN_TURBO_PSNR_DB = 40.0
RUN_TIMEOUT_S = 240  # a hang fails the test instead of the suite


@pytest.fixture(scope="module")
def bfs():
    spec = importlib.util.spec_from_file_location("bench_few_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _undeclared(args: list[str]) -> list[str]:
    """What ``ldm-export ARGS`` uses that the click command does not declare."""
    ctx = click.Context(export_main, info_name="ldm-export")
    command = export_main.get_command(ctx, args[0])
    if command is None:
        return [f"no subcommand {args[0]!r}"]
    sub = click.Context(command, info_name=args[0], parent=ctx)
    try:
        _, extra, _ = command.make_parser(sub).parse_args(list(args[1:]))
    except click.UsageError as e:
        return [e.format_message()]
    return [f"unexpected arguments {extra}"] if extra else []


def test_the_planned_exports_use_flags_ldm_export_declares(bfs, tmp_path):
    for name in bfs.MODELS:
        folder, bundle, tae = bfs.paths(name, tmp_path)
        assert _undeclared(bfs.export_cmd(name, folder, bundle, tae)) == [], name
        assert _undeclared(bfs.int8_cmd(name, bundle)) == [], name
    turbo = bfs.export_cmd("turbo-sd21", *bfs.paths("turbo-sd21", tmp_path))
    assert turbo[turbo.index("--default-steps") + 1] == "1"
    assert float(turbo[turbo.index("--default-guidance-scale") + 1]) == 0.0


def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path):
    out = tmp_path / "fs"
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not out.exists()
    for model in ("lcm-sd15", "turbo-sd21"):
        assert f"ldm-export onnx {out / (model + '-diffusers')}" in r.stdout
        assert f"ldm-export int8 {out / (model + '-bundle')}" in r.stdout
    for cand in ("diffusers-full", "ours-fp32-full", "ours-int8-full", "diffusers-tiny",
                 "ours-fp32-tiny", "ours-int8-tiny"):
        assert f"candidate {cand}:" in r.stdout


def test_bad_arguments_are_refused(tmp_path):
    for bad in (["--models", "sdxl"], ["--precisions", "fp16"], ["--vaes", "half"],
                ["--repeats", "0"]):
        r = subprocess.run([sys.executable, str(SCRIPT), *bad, "--out", str(tmp_path)],
                           check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert r.returncode == 2, (bad, r.stderr)


def test_the_smallest_run_on_the_tiny_models(tmp_path):
    need_export_extra()
    out = tmp_path / "fs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny-turbo",
                        "--repeats", "1", "--warmup", "0", "--precisions", "fp32",
                        "--vaes", "tiny", "--threads", "1", "--out", str(out)],
                       check=False, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [res["model"] for res in results] == ["tiny-turbo"]
    med = results[0]["medians"]
    assert set(med) == {"diffusers-tiny", "ours-fp32-tiny"}
    for cand in med.values():
        assert cand["unet_calls"] == 1  # one step, guidance 0: no guidance batch
        assert all(cand[k] > 0 for k in ("e2e_s", "unet_step_s", "vae_decoder_s", "peak_rss_mb"))
    assert results[0]["psnr_vs_diffusers"]["ours-fp32-tiny"] >= MIN_TURBO_PSNR_DB
    md = (out / "results.md").read_text()
    assert "### tiny-turbo (128², 1 step, guidance 0, 1 threads, median of 1)" in md
