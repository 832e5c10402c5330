"""Numpy schedulers, one per module, each reproducing the diffusers scheduler of the same name.

    sched = make_scheduler("dpm++2m", scheduler_config)   # config: diffusers JSON dict
    sched.set_timesteps(25)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = unet(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, generator=rng)

A scheduler's sampling options (diffusers' step() arguments; tcd's eta) are given when it is
made: ``make_scheduler("tcd", scheduler_config, eta=0.5)``.

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
from .tcd import TCDScheduler


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
        TCDScheduler,
    )
}


def scheduler_names() -> list[str]:
    """The CLI names, in registry order."""
    return list(SCHEDULERS)


def make_scheduler(name: str, config: dict, **options) -> Scheduler:
    """Build scheduler `name` from a diffusers scheduler config (unknown keys are ignored).

    ``options``: sampling options that diffusers passes to step() and this runtime gives the
    scheduler once (tcd: eta); None means not given (the scheduler's default). One the
    scheduler does not take is refused, not ignored."""
    try:
        cls = SCHEDULERS[name]
    except KeyError:
        raise SchedulerConfigError(
            f"unknown scheduler {name!r}; valid names: {', '.join(scheduler_names())}"
        ) from None
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in getattr(cls, "OPTIONS", {}):
            takers = [n for n, c in SCHEDULERS.items() if key in getattr(c, "OPTIONS", {})]
            raise SchedulerConfigError(
                f"scheduler {name!r} takes no {key} "
                f"(it is an option of {', '.join(takers) or 'no scheduler'})"
            )
    return cls.from_config(config, **given)


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
    "TCDScheduler",
]
