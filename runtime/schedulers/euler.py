"""Euler: first-order solver of the probability-flow ODE in the sigma parameterisation of
Karras et al. (2022), arXiv:2206.00364 (Algorithm 2 with S_churn = 0, i.e. no noise).

Reproduces diffusers.EulerDiscreteScheduler. Timesteps are float32 (fractional with Karras
sigmas), the model input is scaled by 1 / sqrt(sigma^2 + 1), and the initial noise is
scaled by init_noise_sigma. Deterministic: `generator` is accepted and unused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (BETA_DEFAULTS, BOOL_OFF, SPACINGS, IndexedScheduler, SchedulerConfigError,
                   karras_sigmas, per_sample, sigma_to_t, spaced_timesteps)


def sigma_table(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) per training step, float32 like diffusers."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def zero_snr_alphas_cumprod(scheduler: IndexedScheduler) -> np.ndarray:
    """alpha-bar with the last entry nudged off zero when zero-terminal-SNR rescaling is on
    (an infinite sigma could not be stepped through)."""
    alphas_cumprod = scheduler.alphas_cumprod.copy()
    if scheduler.config["rescale_betas_zero_snr"]:
        alphas_cumprod[-1] = 2.0 ** -24
    return alphas_cumprod


class SigmaScheduler(IndexedScheduler):
    """What the Euler family shares: the EDM sigma view of the discrete schedule
    (x_t = x_0 + sigma * noise), its input scaling, denoised estimate and noising."""

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        """The network expects unit-variance input: divide by sqrt(sigma^2 + 1)."""
        self._init_step_index(timestep)
        sigma = np.float64(self.sigmas[self._step_index])
        return (np.asarray(sample, dtype=np.float64) / (sigma * sigma + 1.0) ** 0.5).astype(np.float32)

    def _begin_step(self, model_output, timestep, sample):
        """(sigma, sigma_next, x, denoised D(x; sigma)) for this step, in float64."""
        self._init_step_index(timestep)
        i = self._step_index
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        x = np.asarray(sample, dtype=np.float64)
        out = np.asarray(model_output, dtype=np.float64)
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            denoised = x - sigma * out
        elif kind == "v_prediction":
            denoised = out * (-sigma / (sigma * sigma + 1.0) ** 0.5) + x / (sigma * sigma + 1.0)
        else:  # "sample" / "original_sample"
            denoised = out
        return sigma, sigma_next, x, denoised

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """x + sigma * noise (variance-exploding form), sigma at each timestep's schedule entry."""
        sigma = self.sigmas[self._noise_indices(timesteps)]
        out = original_samples + per_sample(sigma, np.ndim(original_samples)) * noise
        return out.astype(np.float32)


class EulerDiscreteScheduler(SigmaScheduler):
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    order = 1
    DEFAULTS = {
        **BETA_DEFAULTS,
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "timestep_type": "discrete",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "final_sigmas_type": "zero",
    }
    CHOICES = {
        "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": ("linear",),
        "use_exponential_sigmas": BOOL_OFF,
        "use_beta_sigmas": BOOL_OFF,
        "timestep_spacing": SPACINGS,
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        if self.config["timestep_type"] == "continuous" and self.config["prediction_type"] == "v_prediction":
            raise SchedulerConfigError(
                f"{self.name}: option timestep_type='continuous' with v_prediction is not supported"
            )
        self.alphas_cumprod = zero_snr_alphas_cumprod(self)
        n_train = self.config["num_train_timesteps"]
        self.sigmas = np.concatenate([sigma_table(self.alphas_cumprod)[::-1], [0.0]]).astype(np.float32)
        self.timesteps = np.linspace(0, n_train - 1, n_train)[::-1].astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max * sigma_max + np.float32(1.0)))

    def _inference_timesteps(self, n: int) -> np.ndarray:
        cfg = self.config
        if cfg["timestep_spacing"] == "linspace":  # not rounded: fractional timesteps
            return np.linspace(0, cfg["num_train_timesteps"] - 1, n, dtype=np.float32)[::-1].copy()
        ts = spaced_timesteps(n, cfg["timestep_spacing"], cfg["num_train_timesteps"], cfg["steps_offset"])
        return ts.astype(np.float32)

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = self.num_inference_steps = int(num_inference_steps)
        timesteps = self._inference_timesteps(n)
        table = sigma_table(self.alphas_cumprod)
        # 1. sigmas at the (possibly fractional) timesteps, linear interpolation in t
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        # 2. Karras noise levels between the end points of that range, EDM eq. (5),
        #    mapped back to fractional timesteps through log-sigma interpolation
        if cfg["use_karras_sigmas"]:
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sigmas[-1])
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sigmas[0])
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, np.log(table))
        # 3. the level after the last step: 0 (fully denoised) or the smallest training sigma
        last = float(table[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.float32)
        self._reset_index()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        # 1. denoised estimate D(x; sigma) from the model output
        sigma, sigma_next, x, denoised = self._begin_step(model_output, timestep, sample)
        # 2. ODE slope d = (x - D(x; sigma)) / sigma, Algorithm 2 line 7 of the EDM paper
        derivative = (x - denoised) / sigma
        # 3. explicit Euler step to the next noise level, Algorithm 2 line 8
        prev_sample = x + derivative * (sigma_next - sigma)
        self._step_index += 1
        return prev_sample.astype(np.float32)
