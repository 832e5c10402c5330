"""Capture what each component really sees: run the bundle's own FP32 sampling loop and
record every call's inputs, across the whole trajectory (every timestep).

Used to decide FP16 islands by running and to calibrate INT8 ranges. numpy + the lean
runtime only.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ldm_edge.bundletools.task_inputs import (CONTROL_EVERY, call_inputs, control_stand_in,
                                              labels, sized_by_image)
from ldm_edge.runtime.pipeline import ComponentCall, Pipeline

DEFAULT_PROMPTS_FILE = Path(__file__).with_name("prompts.txt")


def read_prompts(path=None, n: int | None = None) -> list[str]:
    """The first ``n`` prompts of a text file (one a line, ``#`` comments); the bundled
    list when ``path`` is None."""
    from ldm_edge.runtime.errors import UsageError

    path = Path(path) if path else DEFAULT_PROMPTS_FILE
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    prompts = prompts[:n] if n else prompts
    if not prompts:
        raise UsageError(f"{path} holds no prompts")
    return prompts


def default_prompts(n: int | None = None) -> list[str]:
    return read_prompts(None, n)


class _Recorder:
    """A call hook keeping a copy of every component call's inputs, one list per run."""

    def __init__(self):
        self.runs: list[dict[str, list[dict]]] = []

    def new_run(self) -> None:
        self.runs.append(defaultdict(list))

    def __call__(self, call: ComponentCall) -> None:
        self.runs[-1][call.name].append({k: np.array(v, copy=True) for k, v in call.feeds.items()})


def capture_runs(bundle, prompts: list[str], *, steps: int | None = None, seed: int = 0,
                 guidance_scale: float | None = None, scheduler: str | None = None,
                 schedulers: list[str] | None = None, height: int | None = None,
                 width: int | None = None, threads: int = 0) -> list[dict[str, list[dict]]]:
    """Per prompt (one image each, FP32, seed ``seed + i``): the inputs of every component
    call of its run. ``schedulers``: prompt i samples with ``schedulers[i % len]`` (each
    scheduler's trajectory visits latents of its own kind); else ``scheduler`` for all.
    A bundle with ControlNets runs every other prompt with one active on a stand-in control
    image (bundletools/task_inputs.py control_stand_in), so their calls are captured too;
    then the schedulers go in turn by pairs of runs (one plain, one controlled): each
    scheduler's trajectory with a ControlNet is calibrated on too."""
    pipe, rec = Pipeline(bundle, precision="fp32", threads=threads, ort_cache=False), _Recorder()
    pipe.add_call_hook(rec)
    schema = pipe.manifest.schema
    size = {} if sized_by_image(schema) else {"height": height, "width": width}
    hw = (height or schema.defaults.height, width or schema.defaults.width)
    pairs = CONTROL_EVERY if schema.controlnets else 1
    for i, label in enumerate(labels(schema, prompts)):  # a prompt, or what stands for one
        rec.new_run()
        control = control_stand_in(schema, i, *hw)
        pipe(**call_inputs(schema, label, i), **({"control": control} if control else {}),
             num_inference_steps=steps,
             guidance_scale=guidance_scale, seed=seed + i, **size,
             scheduler=schedulers[i // pairs % len(schedulers)] if schedulers else scheduler)
    pipe.close()
    return [dict(r) for r in rec.runs]


def capture(bundle, prompts: list[str], **kwargs) -> dict[str, list[dict]]:
    """Inputs of every component call while generating one image per prompt (FP32), run
    after run (``capture_runs``' arguments)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for run in capture_runs(bundle, prompts, **kwargs):
        for name, calls in run.items():
            out[name].extend(calls)
    return dict(out)
