"""DPM-Solver++(2M): second-order multistep solver of the diffusion ODE in data-prediction
form, Lu et al. (2022), "DPM-Solver++", arXiv:2211.01095 (Algorithm 2).

Reproduces diffusers.DPMSolverMultistepScheduler with algorithm_type="dpmsolver++" and
solver_order=2 (both implied by the CLI name and forced); "dpm++2m-karras" additionally
forces use_karras_sigmas=True. Deterministic: `generator` is accepted and unused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import (BETA_DEFAULTS, BOOL_OFF, PREDICTION_TYPES, SPACINGS, IndexedScheduler,
                   karras_sigmas, per_sample, sigma_to_t)
from .euler import sigma_table, zero_snr_alphas_cumprod


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """VP coefficients (alpha_t, sigma_t) of a VE noise level sigma = sigma_t / alpha_t."""
    alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
    return alpha, sigma * alpha


def half_log_snr(sigma: float) -> float:
    """lambda_t = log(alpha_t / sigma_t), +inf at sigma = 0."""
    alpha, sig = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return float(np.log(alpha) - np.log(sig))


class DPMSolverMultistepScheduler(IndexedScheduler):
    name = "dpm++2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    order = 1
    DEFAULTS = {
        **BETA_DEFAULTS,
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "flow_shift": 1.0,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "variance_type": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False,
        "time_shift_type": "exponential",
    }
    CHOICES = {
        "prediction_type": PREDICTION_TYPES,
        "thresholding": BOOL_OFF,
        # diffusers maps the UniPC/DEIS solver types onto midpoint
        "solver_type": ("midpoint", "heun", "logrho", "bh1", "bh2"),
        "use_exponential_sigmas": BOOL_OFF,
        "use_beta_sigmas": BOOL_OFF,
        "use_lu_lambdas": BOOL_OFF,
        "use_flow_sigmas": BOOL_OFF,
        "use_dynamic_shifting": BOOL_OFF,
        "final_sigmas_type": ("zero", "sigma_min"),
        "variance_type": (None, "learned", "learned_range"),
        "timestep_spacing": SPACINGS,
    }
    FORCED = {"algorithm_type": "dpmsolver++", "solver_order": 2}

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.alphas_cumprod = zero_snr_alphas_cumprod(self)
        self.sigmas = sigma_table(self.alphas_cumprod)
        n_train = self.config["num_train_timesteps"]
        self.timesteps = np.linspace(0, n_train - 1, n_train, dtype=np.float32)[::-1].copy()
        self.model_outputs: list[np.ndarray | None] = [None, None]
        self.lower_order_nums = 0

    def _base_timesteps(self, n: int) -> np.ndarray:
        """Spacing over [0, last_timestep), last_timestep cut by lambda_min_clipped."""
        cfg = self.config
        ac = self.alphas_cumprod
        half_log_snr_table = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        clipped = int(np.searchsorted(half_log_snr_table[::-1], cfg["lambda_min_clipped"]))
        last = cfg["num_train_timesteps"] - clipped
        if cfg["timestep_spacing"] == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif cfg["timestep_spacing"] == "leading":
            ts = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1] + cfg["steps_offset"]
        else:  # trailing
            ts = np.arange(last, 0, -cfg["num_train_timesteps"] / n).round() - 1
        return np.ascontiguousarray(ts).astype(np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = int(num_inference_steps)
        timesteps = self._base_timesteps(n)
        table = sigma_table(self.alphas_cumprod)
        if cfg["use_karras_sigmas"]:
            # Karras levels over the whole training range (EDM eq. (5)), mapped back to
            # timesteps and rounded to integers (truncated for the cosine schedule)
            sigmas = karras_sigmas(float(table[0]), float(table[-1]), n)
            timesteps = sigma_to_t(sigmas, np.log(table))
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        last = float(table[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = np.asarray(timesteps).astype(np.int64)
        self.num_inference_steps = len(self.timesteps)
        self.model_outputs = [None, None]
        self.lower_order_nums = 0
        self._reset_index()

    def index_for_timestep(self, timestep) -> int:
        """As the base, but a timestep missing from the schedule maps to the last step."""
        if not np.any(self.timesteps == np.asarray(timestep).reshape(())):
            return len(self.timesteps) - 1
        return super().index_for_timestep(timestep)

    def _data_prediction(self, out: np.ndarray, x: np.ndarray) -> np.ndarray:
        """x_0 predicted by the model: DPM-Solver++ integrates in data-prediction form."""
        alpha, sig = alpha_sigma(float(self.sigmas[self._step_index]))
        kind = self.config["prediction_type"]
        if kind == "epsilon":
            if self.config["variance_type"] in ("learned", "learned_range"):
                out = out[:, :3]  # drop the predicted-variance channels
            return (x - sig * out) / alpha
        if kind == "v_prediction":
            return alpha * x - sig * out
        return out  # "sample"

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        self._require_timesteps()
        self._init_step_index(timestep)
        cfg, i, n = self.config, self._step_index, len(self.timesteps)
        # 1. the last step falls back to first order (always when the final sigma is 0)
        first_order_final = i == n - 1 and (
            cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15) or cfg["final_sigmas_type"] == "zero"
        )
        # 2. convert the output to a data prediction and push it onto the history
        x = np.asarray(sample, dtype=np.float64)
        x0 = self._data_prediction(np.asarray(model_output, dtype=np.float64), x)
        self.model_outputs = [self.model_outputs[-1], x0]
        # 3. first-order (DDIM) update to warm up, else the 2M multistep update
        if self.lower_order_nums < 1 or first_order_final:
            prev_sample = self._first_order(x0, x)
        else:
            prev_sample = self._second_order(x)
        self.lower_order_nums = min(self.lower_order_nums + 1, 2)
        self._step_index += 1
        return prev_sample.astype(np.float32)

    def _first_order(self, x0: np.ndarray, x: np.ndarray) -> np.ndarray:
        """DPM-Solver++(1), eq. (5) of the paper (equivalent to DDIM)."""
        s_next, s_now = float(self.sigmas[self._step_index + 1]), float(self.sigmas[self._step_index])
        alpha_t, sigma_t = alpha_sigma(s_next)
        _, sigma_s = alpha_sigma(s_now)
        h = half_log_snr(s_next) - half_log_snr(s_now)
        return sigma_t / sigma_s * x - alpha_t * np.expm1(-h) * x0

    def _second_order(self, x: np.ndarray) -> np.ndarray:
        """Multistep second-order update, Algorithm 2 of the paper (midpoint or Heun form)."""
        i = self._step_index
        s_next, s0, s1 = (float(self.sigmas[j]) for j in (i + 1, i, i - 1))
        alpha_t, sigma_t = alpha_sigma(s_next)
        _, sigma_s0 = alpha_sigma(s0)
        lam_t, lam_s0, lam_s1 = half_log_snr(s_next), half_log_snr(s0), half_log_snr(s1)
        h, h_prev = lam_t - lam_s0, lam_s0 - lam_s1
        m_now, m_prev = self.model_outputs[-1], self.model_outputs[-2]
        # 1. D0 = newest data prediction, D1 = backward difference scaled by r0 = h_prev / h
        d1 = (m_now - m_prev) * (h / h_prev)
        base = sigma_t / sigma_s0 * x - alpha_t * np.expm1(-h) * m_now
        # 2. the correction term of the chosen solver type
        if self.config["solver_type"] == "heun":
            return base + alpha_t * (np.expm1(-h) / h + 1.0) * d1
        return base - 0.5 * alpha_t * np.expm1(-h) * d1

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """alpha_t * x_0 + sigma_t * noise at the schedule's own sigma for each timestep
        (with Karras sigmas that is not the training table's value at the rounded t)."""
        sigma = self.sigmas[self._noise_indices(timesteps)].astype(np.float64)
        alpha = 1.0 / np.sqrt(sigma * sigma + 1.0)
        ndim = np.ndim(original_samples)
        out = per_sample(alpha, ndim) * original_samples + per_sample(sigma * alpha, ndim) * noise
        return out.astype(np.float32)
