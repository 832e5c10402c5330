"""``--check-lora-int8``: an INT8 + LoRA run draws its request once; only with the flag is it
drawn a second time in FP32 for the PSNR line. ldm-run in-process with a stand-in pipeline
that counts the draws (the real INT8 + LoRA numbers: tests/parity/test_lora.py)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from ldm_edge.runtime import pipeline
from ldm_edge.runtime.cli import run as cli

PSNR_LINE = "LoRA on the INT8 U-Net (re-quantised, base activation ranges): 8-bit PSNR"


class CountingPipeline:
    """Draws a flat picture per precision (INT8 one level off FP32) and counts the draws."""

    draws: list = []
    lora_components = {"unet", "text_encoder"}

    def __init__(self, bundle, *, precision, loras, **_):
        self.manifest, self.options = bundle, {"precision": precision}
        self.loras = (type("Loras", (), {"components": lambda s: self.lora_components})()
                      if loras else None)

    def request(self, **keywords):
        return "the request"

    def __call__(self, *, request, progress=None, decode=True):
        assert request == "the request" and decode  # the very request, drawn again
        CountingPipeline.draws.append(self.options["precision"])
        level = 100 if self.options["precision"] == "fp32" else 101
        images = np.full((1, 8, 8, 3), level, np.uint8)
        return type("Result", (), {"images": images, "metadata": lambda s, i: {}})()

    def close(self):
        pass


@pytest.fixture
def run(monkeypatch, tmp_path):
    def go(*args):
        CountingPipeline.draws = []
        monkeypatch.setattr(pipeline, "Pipeline", CountingPipeline)
        r = CliRunner().invoke(cli.main, ["BUNDLE", "-p", "x", "-q", "-o", str(tmp_path / "o.png"),
                                          *args])
        return r, CountingPipeline.draws
    return go


def test_int8_lora_run_draws_once_without_the_flag(run):
    r, draws = run("--precision", "int8", "--lora", "style.safetensors:0.8")
    assert r.exit_code == 0, r.output
    assert draws == ["int8"] and PSNR_LINE not in r.output


def test_the_flag_draws_again_in_fp32_and_says_the_psnr(run):
    r, draws = run("--precision", "int8", "--lora", "style.safetensors:0.8", "--check-lora-int8")
    assert r.exit_code == 0, r.output
    assert draws == ["int8", "fp32"]
    assert f"{PSNR_LINE} 48.1 dB vs FP32 with the same LoRA, this request" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--lora", "style.safetensors"], "this run is fp32: add --precision int8"),
    (["--precision", "int8"], "no --lora here adapts the U-Net"),
])
def test_the_flag_is_refused_where_it_does_not_apply(args, needle, run):
    r, draws = run(*args, "--check-lora-int8")
    assert r.exit_code == 2 and draws == []  # refused before anything is drawn
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm-run: error: --check-lora-int8 ")
    assert needle in lines[0] and lines[0].endswith("or drop --check-lora-int8")


def test_the_flag_is_refused_when_the_lora_adapts_only_the_text_encoder(run, monkeypatch):
    monkeypatch.setattr(CountingPipeline, "lora_components", {"text_encoder"})
    r, draws = run("--precision", "int8", "--lora", "te.safetensors", "--check-lora-int8")
    assert r.exit_code == 2 and draws == [] and "no --lora here adapts the U-Net" in r.output
