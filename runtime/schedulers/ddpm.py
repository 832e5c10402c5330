"""DDPM: ancestral sampling of Ho, Jain & Abbeel (2020), arXiv:2006.11239.

Reproduces diffusers.DDPMScheduler for the fixed variance types. Stochastic: every
step except the last draws one normal sample from `generator`.
"""

from __future__ import annotations

import math

import numpy as np

from .base import (BETA_DEFAULTS, BOOL_OFF, PREDICTION_TYPES, SPACINGS, Scheduler,
                   SchedulerConfigError, predicted_x0)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


class DDPMScheduler(Scheduler):
    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    order = 1
    DEFAULTS = {
        **BETA_DEFAULTS,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    CHOICES = {
        "prediction_type": PREDICTION_TYPES,
        "variance_type": VARIANCE_TYPES,
        "thresholding": BOOL_OFF,
        "timestep_spacing": SPACINGS,
    }

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._set_spaced_timesteps(num_inference_steps)

    def previous_timestep(self, t: int) -> int:
        """The entry after t in the schedule (-1 after the last); t - 1 before set_timesteps."""
        if not self.num_inference_steps:
            return t - 1
        hits = np.flatnonzero(self.timesteps == t)
        if hits.size == 0:
            raise SchedulerConfigError(f"{self.name}: timestep {t} is not in the schedule")
        index = int(hits[0])
        return int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else -1

    def _noise_scale(self, alpha_prod_t: float, alpha_prod_prev: float) -> float:
        """Standard deviation of the added noise for the configured variance type."""
        beta_t = 1.0 - alpha_prod_t / alpha_prod_prev
        # posterior variance beta-tilde, eq. (7); floored like diffusers to keep log finite
        posterior = max((1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t) * beta_t, 1e-20)
        kind = self.config["variance_type"]
        if kind == "fixed_small":
            return posterior ** 0.5
        if kind == "fixed_small_log":
            return math.exp(0.5 * math.log(posterior))
        return beta_t ** 0.5  # fixed_large: sigma_t^2 = beta_t, section 3.2

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        cfg = self.config
        t = int(timestep)
        # 1. alpha-bar at t and at the previous scheduled timestep
        prev_t = self.previous_timestep(t)
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        alpha_t = alpha_prod_t / alpha_prod_prev  # alpha of the (possibly strided) step
        beta_t = 1.0 - alpha_t

        # 2. predicted x_0, eq. (15) of the DDPM paper
        #    3. optionally clipped
        x = np.asarray(sample, dtype=np.float64)
        pred_x0, _ = predicted_x0(model_output, x, alpha_prod_t, cfg)

        # 4. posterior mean mu-tilde(x_t, x_0), eq. (7)
        coef_x0 = alpha_prod_prev ** 0.5 * beta_t / (1.0 - alpha_prod_t)
        coef_xt = alpha_t ** 0.5 * (1.0 - alpha_prod_prev) / (1.0 - alpha_prod_t)
        prev_sample = coef_x0 * pred_x0 + coef_xt * x

        # 5. add sigma_t * z, z ~ N(0, I), except at t = 0 (Algorithm 2, line 3)
        if t > 0:
            noise = self._noise(generator, np.shape(model_output))
            prev_sample = prev_sample + self._noise_scale(alpha_prod_t, alpha_prod_prev) * noise
        return prev_sample.astype(np.float32)
