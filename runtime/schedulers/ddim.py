"""DDIM: deterministic implicit sampler of Song, Meng & Ermon (2020), arXiv:2010.02502.

Reproduces diffusers.DDIMScheduler with eta = 0 (the pipeline default): every step is
deterministic, so `generator` is accepted and unused.
"""

from __future__ import annotations

import numpy as np

from .base import BETA_DEFAULTS, BOOL_OFF, PREDICTION_TYPES, SPACINGS, Scheduler, predicted_x0


class DDIMScheduler(Scheduler):
    name = "ddim"
    diffusers_class = "DDIMScheduler"
    order = 1
    DEFAULTS = {
        **BETA_DEFAULTS,
        "clip_sample": True,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    }
    CHOICES = {
        "prediction_type": PREDICTION_TYPES,
        "thresholding": BOOL_OFF,
        "timestep_spacing": SPACINGS,
    }

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._set_spaced_timesteps(num_inference_steps)

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        self._require_timesteps()
        cfg = self.config
        t = int(timestep)
        # 1. previous timestep: a fixed stride below t (diffusers uses the stride even for
        #    "trailing" and "linspace" spacing, so do we)
        prev_t = t - cfg["num_train_timesteps"] // self.num_inference_steps

        # 2. alpha-bar at both ends of the step
        alpha_prod_t, alpha_prod_prev = self._alpha_bar(t), self._alpha_bar(prev_t)

        # 3. predicted x_0 and epsilon, formula (12) of the DDIM paper ("predicted x_0")
        #    4. optionally clipped
        x = np.asarray(sample, dtype=np.float64)
        pred_x0, pred_eps = predicted_x0(model_output, x, alpha_prod_t, cfg)

        # 5. sigma_t of formula (16) is 0 for eta = 0, so the "direction pointing to x_t"
        #    of formula (12) is sqrt(1 - alpha_prev) * epsilon
        direction = (1.0 - alpha_prod_prev) ** 0.5 * pred_eps

        # 6. x_{t-1} without random noise, formula (12)
        prev_sample = alpha_prod_prev ** 0.5 * pred_x0 + direction
        return prev_sample.astype(np.float32)
