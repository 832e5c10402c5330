"""Test helpers shared by the parity and cli tiers."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "lcm": ("LCMScheduler", {}),
}


_PIPES: dict = {}


def diffusers_pipeline(folder, scheduler: str, img2img: bool = False):
    """diffusers' own pipeline for ``folder`` with the scheduler of the same name
    (loaded once per folder; the scheduler is rebuilt from the saved config each call)."""
    import diffusers

    key = (str(folder), img2img)
    if key not in _PIPES:
        cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
        pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        _PIPES[key] = (pipe, dict(pipe.scheduler.config))
    pipe, saved = _PIPES[key]
    sched_cls, extra = DIFFUSERS_SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, sched_cls).from_config(saved, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: np.ndarray) -> np.ndarray:
    """diffusers' output_type='np' [0, 1] floats -> 8-bit, as its PIL conversion rounds."""
    return (images * 255).round().astype(np.uint8)


def run_cli(*args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """Run a console script module (``ldm_edge.runtime`` / ``ldm_edge.export.cli``)."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level module names from ``python -X importtime`` output."""
    mods = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            mods.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return mods


# What building the tiny models and their bundles imports: the export extra, absent on the
# lean runtime install (`pip install .[test]`), where the tests that need them skip.
EXPORT_MODULES = ("torch", "diffusers", "transformers", "onnx")


def need_export_extra() -> None:
    for mod in EXPORT_MODULES:
        pytest.importorskip(mod, reason=f"needs {mod} (pip install .[export]) to build the "
                                        f"tiny models; the lean runtime install has none")


class TorchNoise:
    """A numpy-Generator-shaped noise source that draws from torch's CPU generator, so the
    runtime's stochastic schedulers and img2img draw exactly what diffusers draws."""

    def __init__(self, seed: int):
        import torch

        self._torch = torch
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32):
        t = self._torch.randn(tuple(size), generator=self.g, dtype=self._torch.float32)
        return t.numpy().astype(dtype)
