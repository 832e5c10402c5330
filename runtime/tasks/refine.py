"""The second half of SDXL's ensemble of experts (diffusers' ``denoising_start`` on
StableDiffusionXLImg2ImgPipeline): the refiner takes the base model's latents as they are,
part-way through the schedule (no VAE, no noise added), and runs the steps after the
fraction ``denoising_start``. The base's half stops at ``denoising_end`` (``cut_at_end``).
Reached from text-to-image when the request has ``denoising_start``; not a --task."""

from __future__ import annotations

import numpy as np

from .. import validate
from ..errors import UsageError
from .base import TaskPlan, TaskStart

NAME = "refine"


def cutoff(sched, fraction: float) -> int:
    """The training timestep at ``fraction`` of the schedule, as diffusers rounds it."""
    n = int(sched.config["num_train_timesteps"])
    return int(round(n - fraction * n))


def cut_at_end(sched, timesteps: np.ndarray, denoising_end: float | None) -> np.ndarray:
    """The timesteps at or above ``denoising_end``'s cutoff (all where it is None)."""
    if denoising_end is None:
        return timesteps
    keep = int((np.asarray(timesteps) >= cutoff(sched, denoising_end)).sum())
    if keep == 0:
        raise UsageError(f"--denoising-end {denoising_end} leaves no step to run; raise it")
    return timesteps[:keep]


def check_fractions(denoising_start, denoising_end, latents) -> tuple:
    """(start, end), each None or in (0, 1), checked: a start needs the base's latents."""
    start = None if denoising_start is None else validate.fraction("--denoising-start",
                                                                   denoising_start)
    end = None if denoising_end is None else validate.fraction("--denoising-end", denoising_end)
    if start is not None and latents is None:
        raise UsageError("--denoising-start continues another model's latents: give them "
                         "(ldm-run BASE --refiner REFINER does)")
    if start is not None and end is not None and start >= end:
        raise UsageError(f"--denoising-start {start} must be below --denoising-end {end}")
    return start, end


class Refine(TaskPlan):
    name = NAME

    def timesteps(self, sched, req):
        sched.set_timesteps(req.num_inference_steps)
        all_ts = np.asarray(sched.timesteps)
        n = int((all_ts < cutoff(sched, req.denoising_start)).sum())
        if sched.order == 2 and n % 2 == 0:  # never cut between a 2nd-order step's halves
            n += 1
        if n == 0:
            raise UsageError(f"--denoising-start {req.denoising_start} leaves no step to run; "
                             f"lower it")
        start = len(all_ts) - n
        sched.set_begin_index(start)
        return sched.timesteps[start:]

    def start(self, pipe, sched, timesteps, req, gen) -> TaskStart:
        return TaskStart(np.array(req.latents, dtype=np.float32))


PLAN = Refine()
