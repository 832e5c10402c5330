"""Euler ancestral: Euler step down to a lower noise level, then fresh noise back up.

The ancestral split of each step (sigma_down, sigma_up) is the one of k-diffusion's
`sample_euler_ancestral` (Crowson), applied to the EDM sigma parameterisation of
Karras et al. (2022), arXiv:2206.00364. Reproduces diffusers.EulerAncestralDiscreteScheduler.
Stochastic: every step draws one normal sample from `generator` (the last one too,
where it is multiplied by zero, exactly like diffusers, so the draws stay aligned).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import BETA_DEFAULTS, SPACINGS, spaced_timesteps
from .euler import SigmaScheduler, sigma_table, zero_snr_alphas_cumprod


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    name = "euler-a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    order = 1
    DEFAULTS = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    CHOICES = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": SPACINGS,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.alphas_cumprod = zero_snr_alphas_cumprod(self)
        n_train = self.config["num_train_timesteps"]
        self.sigmas = np.concatenate([sigma_table(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.timesteps = np.linspace(0, n_train - 1, n_train)[::-1].copy()

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max * sigma_max + np.float32(1.0)))

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = self.num_inference_steps = int(num_inference_steps)
        if cfg["timestep_spacing"] == "linspace":  # fractional timesteps, not rounded
            timesteps = np.linspace(0, cfg["num_train_timesteps"] - 1, n, dtype=np.float32)[::-1].copy()
        else:
            ts = spaced_timesteps(n, cfg["timestep_spacing"], cfg["num_train_timesteps"], cfg["steps_offset"])
            timesteps = ts.astype(np.float32)
        table = sigma_table(self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        self.sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.timesteps = timesteps
        self._reset_index()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        # 1. denoised estimate D(x; sigma) from the model output
        sigma, sigma_next, x, denoised = self._begin_step(model_output, timestep, sample)
        # 2. split the move sigma -> sigma_next into a deterministic descent to sigma_down and
        #    fresh noise of scale sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = max(sigma_next ** 2 - sigma_up ** 2, 0.0) ** 0.5
        # 3. Euler step along d = (x - D) / sigma down to sigma_down (EDM Algorithm 2, line 8)
        prev_sample = x + (x - denoised) / sigma * (sigma_down - sigma)
        # 4. ancestral noise back up to sigma_next
        noise = self._noise(generator, np.shape(model_output))
        prev_sample = prev_sample + noise * sigma_up
        self._step_index += 1
        return prev_sample.astype(np.float32)
