"""Numpy schedulers, one per module, each reproducing the diffusers scheduler of the same name.

    sched = make_scheduler("dpm++2m", scheduler_config)   # config: diffusers JSON dict
    sched.set_timesteps(25)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, generator=rng)

Never imports torch or diffusers.
"""

from __future__ import annotations

from .base import Scheduler, SchedulerConfigError
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver_multistep import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler


class DPMSolverMultistepKarrasScheduler(DPMSolverMultistepScheduler):
    """DPM-Solver++(2M) on the Karras et al. (2022) noise levels."""

    name = "dpm++2m-karras"
    FORCED = {**DPMSolverMultistepScheduler.FORCED, "use_karras_sigmas": True}


SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        DDIMScheduler,
        DDPMScheduler,
        PNDMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverMultistepScheduler,
        DPMSolverMultistepKarrasScheduler,
        LCMScheduler,
    )
}


def scheduler_names() -> list[str]:
    """The CLI names, in registry order."""
    return list(SCHEDULERS)


def make_scheduler(name: str, config: dict) -> Scheduler:
    """Build scheduler `name` from a diffusers scheduler config (unknown keys are ignored)."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise SchedulerConfigError(
            f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}"
        ) from None
    return cls.from_config(config)


__all__ = [
    "SCHEDULERS",
    "Scheduler",
    "SchedulerConfigError",
    "make_scheduler",
    "scheduler_names",
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepKarrasScheduler",
    "LCMScheduler",
]
