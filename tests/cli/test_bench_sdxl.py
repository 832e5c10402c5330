"""benchmarks/bench_sdxl.py (docs/benchmarks.md, "SDXL") kept from rotting: its plan names flags
the CLIs declare, and its smallest real run on the tiny SDXL (export/tiny_sdxl.py) goes through
every stage it runs at full size — build, ldm-export onnx, a worker process per side for the
base row (guidance: batch-2 U-Net calls) and the Turbo row (trailing timesteps, 1 step, no
guidance), two ldm-run memory modes in-process, the report. No timing is asserted; that both
sides did the same work is (the FP32 pictures match). INT8 shares every stage but the
``ldm-export int8`` call, which the plan test checks; making it would double the run."""

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
from ldm_edge.runtime.cli.run import main as run_main

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_sdxl.py"
# both sides' FP32 pictures of the tiny SDXL are ~88 dB apart (Turbo's bit-identical): float
# noise; a run where the two sides drew different pictures (other timesteps, other guidance,
# other latents) lands far below
MIN_FP32_PSNR_DB = 40.0
RUN_TIMEOUT_S = 300  # a hang fails the test instead of the suite


@pytest.fixture(scope="module")
def bsx():
    spec = importlib.util.spec_from_file_location("bench_sdxl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _undeclared(command: click.Command, args: list[str], name: str) -> list[str]:
    """What ``ARGS`` uses that the click command does not declare."""
    ctx = click.Context(command, info_name=name)
    try:
        _, extra, _ = command.make_parser(ctx).parse_args(list(args))
    except click.UsageError as e:
        return [e.format_message()]
    return [f"unexpected arguments {extra}"] if extra else []


def _export_undeclared(args: list[str]) -> list[str]:
    ctx = click.Context(export_main, info_name="ldm-export")
    command = export_main.get_command(ctx, args[0])
    if command is None:
        return [f"no subcommand {args[0]!r}"]
    return _undeclared(command, args[1:], args[0])


@pytest.mark.parametrize("tiny", [False, True])
def test_the_planned_commands_use_flags_the_clis_declare(bsx, tmp_path, tiny):
    a = bsx.parse(["--out", str(tmp_path), *(["--tiny"] if tiny else [])])
    assert _export_undeclared(bsx.export_cmd(a)) == []
    assert _export_undeclared(bsx.int8_cmd(a)) == []
    for mode in bsx.MODES:
        argv = bsx.mode_argv(mode, a, tmp_path / "x.png")
        assert _undeclared(run_main, argv, "ldm-run") == [], mode
        if "--vae-tiling" in argv and not tiny:
            assert argv[argv.index("--vae-tile-size") + 1] == str(bsx.BASE_VAE_TILE)


def test_dry_run_prints_the_plan_and_builds_nothing(tmp_path):
    out = tmp_path / "sx"
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--make-int8", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not out.exists()
    assert f"ldm-export onnx {out / 'sdxl-arch'} -o {out / 'sdxl-bundle'}" in r.stdout
    assert f"ldm-export int8 {out / 'sdxl-bundle'}" in r.stdout
    assert "row base-1024: 1024², 2 steps, guidance 5, euler" in r.stdout
    assert "row turbo-512: 512², 1 steps, guidance 0, euler (trailing timesteps)" in r.stdout
    for cand in ("diffusers", "ours-fp32", "ours-int8"):
        assert f"candidate {cand}:" in r.stdout
    assert "--low-memory --vae-tiling --vae-tile-size 512" in r.stdout


def test_bad_arguments_are_refused(tmp_path):
    for bad in (["--rows", "refiner"], ["--modes", "tiny-vae"], ["--precisions", "fp16"],
                ["--repeats", "0"]):
        r = subprocess.run([sys.executable, str(SCRIPT), *bad, "--out", str(tmp_path)],
                           check=False, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert r.returncode == 2, (bad, r.stderr)


def test_the_smallest_run_on_the_tiny_sdxl(tmp_path):
    need_export_extra()
    out = tmp_path / "sx"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--precisions", "fp32",
                        "--modes", "default,low-memory-tiling", "--threads", "1",
                        "--out", str(out)],
                       check=False, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert [row["row"] for row in report["rows"]] == ["base-1024", "turbo-512"]
    for row, calls in zip(report["rows"], (2, 1)):
        assert set(row["medians"]) == {"diffusers", "ours-fp32"}
        for cand in row["medians"].values():
            assert cand["unet_calls"] == calls  # one U-Net call a step on both sides
            assert all(cand[k] > 0 for k in ("load_s", "cold_start_s", "unet_step_s", "e2e_s",
                                              "vae_decoder_s", "peak_rss_mb"))
        assert row["psnr_vs_diffusers"]["ours-fp32"] >= MIN_FP32_PSNR_DB, row["row"]
    modes = report["modes"]["medians"]
    assert set(modes) == {"default", "low-memory-tiling"}
    assert all(m["peak_rss_mb"] > 0 and m["unet_calls"] == 2 for m in modes.values())
    assert "--low-memory --vae-tiling" in report["modes"]["commands"]["low-memory-tiling"]
    md = (out / "results.md").read_text()
    assert "### base-1024 (128², 2 steps, guidance 5, 1 threads, median of 1)" in md
    assert "| ldm-run mode | peak RSS (MiB) |" in md
