"""Shared machinery of the numpy schedulers: noise schedules, timestep spacing, config.

Each scheduler reproduces the diffusers class of the same name. The float32 beta and
alpha-bar tables are bit-identical to diffusers' (torch's CPU linspace rounding and its
float64-accumulated cumprod are reproduced), so integer timesteps derived from them match
exactly. Tables that go through a square root (sigmas, zero-SNR rescaling) can differ by
an ulp: numpy's float32 sqrt is correctly rounded, torch's CPU one is not always. The
per-step arithmetic runs in float64; outputs are float32.
No torch, no diffusers here.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ..errors import UsageError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BOOL_OFF = (False, None)  # "option disabled": diffusers treats None like False


# The training noise schedule: diffusers' defaults, shared by every scheduler's DEFAULTS.
BETA_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
}


class SchedulerConfigError(UsageError, ValueError):
    """Unknown scheduler name or a config option this runtime does not implement."""


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace with torch's CPU rounding (float32 step, halves filled from both ends)."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(n - 1)) if n > 1 else 0.0
    i = np.arange(n)
    vals = np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i))
    return vals.astype(np.float32)


def cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas whose alpha-bar follows the squared cosine of Nichol & Dhariwal (2021), eq. (17)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def cumprod32(values: np.ndarray) -> np.ndarray:
    """Cumulative product as torch computes it on CPU: float64 accumulator, float32 result."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha-bar) so the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    root = np.sqrt(cumprod32(np.float32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def make_betas(config: dict) -> np.ndarray:
    """The float32 beta table of a config (trained_betas win over beta_schedule)."""
    n = config["num_train_timesteps"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = torch_linspace(config["beta_start"], config["beta_end"], n)
    elif config["beta_schedule"] == "scaled_linear":
        root = torch_linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n)
        betas = root * root
    elif config["beta_schedule"] == "squaredcos_cap_v2":
        betas = cosine_betas(n)
    else:
        raise SchedulerConfigError(
            f"beta_schedule={config['beta_schedule']!r} is not supported; use one of {BETA_SCHEDULES}"
        )
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


def spaced_timesteps(n: int, spacing: str, num_train: int, steps_offset: int = 0) -> np.ndarray:
    """Descending int64 inference timesteps for the three spacings of Lin et al. 2023, Table 2."""
    if spacing == "linspace":
        ts = np.linspace(0, num_train - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (num_train // n))[::-1] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / n)) - 1
    else:
        raise SchedulerConfigError(f"timestep_spacing={spacing!r} is not supported; use one of {SPACINGS}")
    return np.ascontiguousarray(ts).astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Noise levels of Karras et al. 2022 (EDM), eq. (5): uniform in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating linearly in log-sigma."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10)).reshape(-1)
    above = (log_sigma[None, :] - log_sigmas[:, None]) >= 0
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigmas))


def per_sample(coef: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape one coefficient per batch item so it broadcasts over a sample of ndim dims."""
    coef = np.asarray(coef, dtype=np.float64).reshape(-1)
    return coef.reshape(coef.shape + (1,) * (ndim - 1))


def x0_and_eps(model_output, sample, alpha_prod_t: float, prediction_type: str):
    """Clean sample and noise implied by the model output, DDPM eq. (4)/(15), v: Salimans & Ho 2022."""
    a, b = alpha_prod_t ** 0.5, (1 - alpha_prod_t) ** 0.5
    if prediction_type == "epsilon":
        return (sample - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / b
    if prediction_type == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    raise SchedulerConfigError(f"prediction_type={prediction_type!r} is not supported")


def predicted_x0(model_output, sample: np.ndarray, alpha_prod_t: float, config: dict):
    """(x_0, epsilon) from the model output, x_0 clipped when the config asks for it."""
    out = np.asarray(model_output, dtype=np.float64)
    pred_x0, pred_eps = x0_and_eps(out, sample, alpha_prod_t, config["prediction_type"])
    if config.get("clip_sample"):
        limit = config["clip_sample_range"]
        pred_x0 = np.clip(pred_x0, -limit, limit)
    return pred_x0, pred_eps


class Scheduler:
    """Common interface; subclasses fill DEFAULTS with their diffusers class's __init__ defaults."""

    name: ClassVar[str] = ""
    diffusers_class: ClassVar[str] = ""
    order: ClassVar[int] = 1
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    # key -> accepted values; anything else raises (options not implemented here).
    CHOICES: ClassVar[dict[str, tuple]] = {}
    # Values implied by the CLI name (e.g. karras sigmas); they win over the config.
    FORCED: ClassVar[dict[str, Any]] = {}

    def __init__(self, **config: Any) -> None:
        unknown = sorted(set(config) - set(self.DEFAULTS))
        if unknown:
            raise SchedulerConfigError(f"{self.name}: unknown config keys {unknown}")
        self.config = {**self.DEFAULTS, **config, **self.FORCED}
        for key, allowed in self.CHOICES.items():
            if self.config[key] not in allowed:
                raise SchedulerConfigError(
                    f"scheduler {self.name!r}: option {key}={self.config[key]!r} is not supported "
                    f"by the numpy runtime (supported: {allowed})"
                )
        self.betas = make_betas(self.config)
        self.alphas_cumprod = cumprod32(np.float32(1.0) - self.betas)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.config["num_train_timesteps"])[::-1].astype(np.int64)

    @classmethod
    def from_config(cls, config: dict, **overrides: Any) -> "Scheduler":
        """Like DiffusersClass.from_config: keys the class does not know are ignored, missing
        keys take this class's defaults, overrides win over the config. Keys that a saved
        diffusers config lists under "_use_default_values" were defaults of the class that
        saved it, so they are dropped too and this class's own defaults apply."""
        defaulted = set(config.get("_use_default_values", ()))
        merged = {k: v for k, v in dict(config).items() if k not in defaulted}
        merged.update(overrides)
        return cls(**{k: v for k, v in merged.items() if k in cls.DEFAULTS})

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def set_begin_index(self, begin_index: int = 0) -> None:
        """No-op: the diffusers class keeps no step index."""

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        raise NotImplementedError

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """Forward process q(x_t | x_0), DDPM eq. (4)."""
        alpha_bar = self.alphas_cumprod[np.asarray(timesteps, dtype=np.int64).reshape(-1)]
        ndim = np.ndim(original_samples)
        out = per_sample(np.sqrt(alpha_bar), ndim) * original_samples
        out = out + per_sample(np.sqrt(1.0 - alpha_bar.astype(np.float64)), ndim) * noise
        return out.astype(np.float32)

    def _alpha_bar(self, t: int) -> float:
        """alpha-bar at training step t; "before the first step" (t < 0) it is 1 (clean data)
        with set_alpha_to_one, else the first training step's value."""
        if t >= 0:
            return float(self.alphas_cumprod[t])
        return 1.0 if self.config.get("set_alpha_to_one") else float(self.alphas_cumprod[0])

    def _set_spaced_timesteps(self, num_inference_steps: int) -> None:
        """Integer timesteps spaced over the training range (DDIM/DDPM style)."""
        n_train = self.config["num_train_timesteps"]
        if num_inference_steps > n_train:
            raise SchedulerConfigError(
                f"{self.name}: num_inference_steps={num_inference_steps} exceeds num_train_timesteps={n_train}"
            )
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = spaced_timesteps(
            self.num_inference_steps, self.config["timestep_spacing"], n_train, self.config["steps_offset"]
        )

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise SchedulerConfigError(f"{self.name}: call set_timesteps() before step()")

    @staticmethod
    def _noise(generator, shape) -> np.ndarray:
        """The one noise draw of a stochastic step (numpy Generator protocol)."""
        if generator is None:
            generator = np.random.default_rng()
        return np.asarray(generator.standard_normal(size=shape, dtype=np.float32))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class IndexedScheduler(Scheduler):
    """Schedulers that walk their timestep list with a step index (diffusers' _step_index)."""

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = int(begin_index)

    def _reset_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep) -> int:
        """Position of timestep in the schedule; the second hit when it appears twice."""
        hits = np.flatnonzero(self.timesteps == np.asarray(timestep).reshape(()))
        if hits.size == 0:
            raise SchedulerConfigError(f"{self.name}: timestep {timestep!r} is not in the schedule")
        return int(hits[1] if hits.size > 1 else hits[0])

    def _init_step_index(self, timestep) -> None:
        if self._step_index is None:
            if self._begin_index is None:
                self._step_index = self.index_for_timestep(timestep)
            else:
                self._step_index = self._begin_index

    def _noise_indices(self, timesteps) -> list[int]:
        """Which schedule entry add_noise uses for each requested timestep."""
        ts = np.asarray(timesteps).reshape(-1)
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in ts]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * ts.shape[0]
