"""TCD: the strategic stochastic sampling of Zheng et al. (2024), "Trajectory Consistency
Distillation", arXiv:2402.19159, for models distilled with TCD (or LCM).

Reproduces diffusers.TCDScheduler. The timestep schedule is LCM's (a subset of the
`original_inference_steps` skipping schedule, see lcm.py); its config keys and defaults are
LCM's too. Each step from t towards the next timestep t' of the schedule (0 after the last):

1. predict x_0 and epsilon from the model output;
2. move deterministically (a DDIM jump along the predicted trajectory) to the earlier time
   s = floor((1 - eta) * t');
3. except on the last step, and only when eta > 0, add forward noise from s back up to t'
   with one normal draw from `generator`.

`eta` (gamma in the paper, in [0, 1]) is a sampling option, not a config key: diffusers takes
it as a step() argument (default 0.3), here it is given when the scheduler is made
(`make_scheduler("tcd", config, eta=0.5)`) and holds for every step. eta = 0 is
deterministic (s = t', no draws); eta = 1 jumps to s = 0 (nearly the predicted x_0) and
re-noises it all the way to t'.
As in diffusers, clip_sample, thresholding, set_alpha_to_one, timestep_spacing, steps_offset
and timestep_scaling are accepted and not used.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from .base import PREDICTION_TYPES, SchedulerConfigError, x0_and_eps
from .lcm import LCMScheduler

# diffusers' TCDScheduler.step default (and the paper's recommended gamma)
DEFAULT_ETA = 0.3


def checked_eta(eta: Any) -> float:
    """eta as a float in [0, 1], or a one-line error."""
    try:
        value = float(eta)
    except (TypeError, ValueError):
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise SchedulerConfigError(
            f"tcd: eta={eta!r} must be between 0 (deterministic) and 1 (fully stochastic)"
        )
    return value


def landing_timestep(next_t: int, eta: float) -> int:
    """s = floor((1 - eta) * t'), where the deterministic half of a step lands.

    A float32 product, as in diffusers (a python float times a torch int64 tensor is float32
    there): in float64 the floor comes out one lower for some pairs, e.g. t' = 90, eta = 0.3
    gives 63 in float32 and 62 in float64, and the step would use another alpha-bar."""
    return int(np.floor(np.float32(1.0 - eta) * np.float32(next_t)))


class TCDScheduler(LCMScheduler):
    name = "tcd"
    diffusers_class = "TCDScheduler"
    order = 1
    # diffusers' TCDScheduler.__init__ has LCMScheduler's keys and defaults
    DEFAULTS = dict(LCMScheduler.DEFAULTS)
    # thresholding is accepted: diffusers' TCD step never applies it
    CHOICES = {"prediction_type": PREDICTION_TYPES}
    # sampling options make_scheduler passes on (not config keys): name -> default
    OPTIONS: ClassVar[dict[str, Any]] = {"eta": DEFAULT_ETA}

    def __init__(self, *, eta: float = DEFAULT_ETA, **config: Any) -> None:
        super().__init__(**config)
        self.eta = checked_eta(eta)

    @classmethod
    def from_config(cls, config: dict, *, eta: float = DEFAULT_ETA,
                    **overrides: Any) -> "TCDScheduler":
        """Scheduler.from_config, plus the sampling option eta."""
        sched = super().from_config(config, **overrides)
        sched.eta = checked_eta(eta)
        return sched

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        self._require_timesteps()
        self._init_step_index(timestep)
        t = int(timestep)
        # 1. the next timestep t' of the schedule (0 after the last step) and the landing time s
        nxt = self._step_index + 1
        next_t = int(self.timesteps[nxt]) if nxt < len(self.timesteps) else 0
        s = landing_timestep(next_t, self.eta)
        alpha_t, alpha_next, alpha_s = (float(self.alphas_cumprod[i]) for i in (t, next_t, s))

        # 2. predicted x_0 and epsilon (epsilon, sample or v parameterisation; never clipped)
        x = np.asarray(sample, dtype=np.float64)
        out = np.asarray(model_output, dtype=np.float64)
        pred_x0, pred_eps = x0_and_eps(out, x, alpha_t, self.config["prediction_type"])

        # 3. deterministic jump to s: x_s = sqrt(a_s) x_0 + sqrt(1 - a_s) epsilon
        x_s = alpha_s ** 0.5 * pred_x0 + (1.0 - alpha_s) ** 0.5 * pred_eps

        # 4. forward noise from s up to t' (q(x_t' | x_s)); none on the last step or at eta = 0
        if self.eta > 0 and self._step_index != self.num_inference_steps - 1:
            noise = self._noise(generator, np.shape(model_output))
            keep = alpha_next / alpha_s
            prev_sample = keep ** 0.5 * x_s + (1.0 - keep) ** 0.5 * noise
        else:
            prev_sample = x_s
        self._step_index += 1
        return prev_sample.astype(np.float32)
