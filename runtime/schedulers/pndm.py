"""PNDM: pseudo numerical methods of Liu, Ren, Lin & Zhao (2022), arXiv:2202.09778.

Reproduces diffusers.PNDMScheduler: with skip_prk_steps=True (Stable Diffusion configs)
the linear multistep (PLMS) method starts from a 2-stage warm-up; otherwise the first
three steps are pseudo Runge-Kutta (PRK) steps, each taking four model evaluations.
Deterministic; keeps the history of model outputs between steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import BETA_DEFAULTS, SPACINGS, Scheduler, SchedulerConfigError, spaced_timesteps

PNDM_ORDER = 4


class PNDMScheduler(Scheduler):
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    order = 1
    DEFAULTS = {
        **BETA_DEFAULTS,
        "skip_prk_steps": False,
        "set_alpha_to_one": False,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    CHOICES = {
        "prediction_type": ("epsilon", "v_prediction"),
        "timestep_spacing": SPACINGS,
    }

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self.prk_timesteps = np.zeros(0, dtype=np.int64)
        self._reset_history()

    def _reset_history(self) -> None:
        self.ets: list[np.ndarray] = []  # past model outputs (the e_t of the paper)
        self.counter = 0
        self.cur_model_output: Any = 0.0
        self.cur_sample: np.ndarray | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n = self.num_inference_steps = int(num_inference_steps)
        n_train = cfg["num_train_timesteps"]
        ascending = spaced_timesteps(n, cfg["timestep_spacing"], n_train, cfg["steps_offset"])[::-1]
        if cfg["skip_prk_steps"]:
            # the second-to-last entry is repeated: the warm-up evaluates the model twice there
            self.prk_timesteps = np.zeros(0, dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            # PRK visits t, t - stride/2 (twice) and t - stride for the three first strides
            half = n_train // n // 2
            prk = np.repeat(ascending[-PNDM_ORDER:], 2) + np.tile([0, half], PNDM_ORDER)
            self.prk_timesteps = np.repeat(prk[:-1], 2)[1:-1][::-1].astype(np.int64)
            plms = ascending[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._reset_history()

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        self._require_timesteps()
        out = np.asarray(model_output, dtype=np.float64)
        x = np.asarray(sample, dtype=np.float64)
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            prev = self._step_prk(out, int(timestep), x)
        else:
            prev = self._step_plms(out, int(timestep), x)
        self.counter += 1
        return prev.astype(np.float32)

    def _step_prk(self, out: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        """One of the four stages of a pseudo Runge-Kutta step, formula (13) of the paper."""
        stage = self.counter % 4
        # 1. each stage moves from the step's start to its midpoint or to its end
        half = self.config["num_train_timesteps"] // self.num_inference_steps // 2
        prev_t = t - (0 if self.counter % 2 else half)
        t_start = int(self.prk_timesteps[self.counter // 4 * 4])
        # 2. accumulate the RK4 weights 1/6, 1/3, 1/3, 1/6 of the four stage slopes
        if stage == 0:
            self.cur_model_output = self.cur_model_output + out / 6
            self.ets.append(out)
            self.cur_sample = x
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + out / 3
        else:
            out = self.cur_model_output + out / 6
            self.cur_model_output = 0.0
        # 3. every stage restarts from the sample at the step's start
        start = self.cur_sample if self.cur_sample is not None else x
        return self._transfer(start, t_start, prev_t, out)

    def _step_plms(self, out: np.ndarray, t: int, x: np.ndarray) -> np.ndarray:
        """Linear multistep update with the pseudo transfer, formula (12) of the paper."""
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise SchedulerConfigError(f"{self.name}: PLMS steps need the 12 PRK warm-up steps first")
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        # 1. the second warm-up call re-evaluates the first interval (a Heun-like correction)
        prev_t = t - stride
        if self.counter != 1:
            self.ets = self.ets[-3:] + [out]
        else:
            prev_t, t = t, t + stride
        # 2. combine the history with Adams-Bashforth weights of growing order
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = x
        elif len(e) == 1 and self.counter == 1:
            out = (out + e[-1]) / 2
            x, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            out = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            out = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            out = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        # 3. move the sample from t to prev_t with the combined slope
        return self._transfer(x, t, prev_t, out)

    def _transfer(self, x: np.ndarray, t: int, prev_t: int, out: np.ndarray) -> np.ndarray:
        """The transfer part phi(x_t, e_t, t, t - delta), formula (9) of the paper."""
        alpha_prod_t = float(self.alphas_cumprod[t])
        alpha_prod_prev = self._alpha_bar(prev_t)
        beta_prod_t, beta_prod_prev = 1.0 - alpha_prod_t, 1.0 - alpha_prod_prev
        # a v-prediction is turned into the equivalent epsilon first
        if self.config["prediction_type"] == "v_prediction":
            out = alpha_prod_t ** 0.5 * out + beta_prod_t ** 0.5 * x
        sample_coeff = (alpha_prod_prev / alpha_prod_t) ** 0.5
        denom = alpha_prod_t * beta_prod_prev ** 0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_prev) ** 0.5
        return sample_coeff * x - (alpha_prod_prev - alpha_prod_t) * out / denom
