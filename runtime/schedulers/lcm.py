"""LCM: multistep consistency sampling of Luo et al. (2023), "Latent Consistency Models",
arXiv:2310.04378 (Algorithm 3), built on the consistency models of Song et al. (2023).

Reproduces diffusers.LCMScheduler. The schedule is a subset of the `original_inference_steps`
skipping schedule the model was distilled on; timestep_spacing and steps_offset are
accepted and, as in diffusers, not used. Stochastic: every step but the last draws one
normal sample from `generator`.
"""

from __future__ import annotations

import numpy as np

from .base import BOOL_OFF, PREDICTION_TYPES, IndexedScheduler, SchedulerConfigError, x0_and_eps

SIGMA_DATA = 0.5  # data standard deviation of the consistency-model boundary condition


class LCMScheduler(IndexedScheduler):
    name = "lcm"
    diffusers_class = "LCMScheduler"
    order = 1
    DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
    }
    CHOICES = {
        "prediction_type": PREDICTION_TYPES,
        "thresholding": BOOL_OFF,
    }

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.set_timesteps_within(num_inference_steps, 1.0)

    def set_timesteps_within(self, num_inference_steps: int, strength: float) -> None:
        """``num_inference_steps`` steps picked from the first ``strength`` of the distillation
        schedule (from the noisy end): the image-to-image schedule of diffusers'
        LatentConsistencyModelImg2ImgPipeline (its LCMScheduler.set_timesteps(strength=));
        strength 1: text-to-image's."""
        n_train = self.config["num_train_timesteps"]
        original = self.config["original_inference_steps"]
        n = int(num_inference_steps)
        if original > n_train:
            raise SchedulerConfigError(f"{self.name}: original_inference_steps={original} exceeds {n_train}")
        if n > n_train or n > original:
            raise SchedulerConfigError(
                f"{self.name}: num_inference_steps={n} must not exceed original_inference_steps={original}"
            )
        window = int(original * strength)
        if window < n:
            raise SchedulerConfigError(
                f"{self.name}: --strength {strength} keeps {window} of the model's {original} "
                f"distillation steps, fewer than --steps {n}; raise --strength or lower --steps")
        # 1. the distillation schedule: every k-th training step, ending at k*original - 1
        # (at k*window - 1 for image-to-image)
        k = n_train // original
        origin = (np.arange(1, window + 1) * k - 1)[::-1]
        # 2. n evenly spaced (floored) picks from it, starting at the noisiest
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[picks].astype(np.int64)
        self.num_inference_steps = n
        self._reset_index()

    def _boundary_scalings(self, t: int) -> tuple[float, float]:
        """c_skip and c_out of the consistency parameterisation (LCM paper, eq. (9)), with the
        timestep scaled by timestep_scaling so that c_skip ~ 0 and c_out ~ 1 away from t = 0."""
        scaled = t * float(self.config["timestep_scaling"])
        c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
        c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
        return c_skip, c_out

    def step(self, model_output: np.ndarray, timestep, sample: np.ndarray, generator=None) -> np.ndarray:
        self._require_timesteps()
        self._init_step_index(timestep)
        cfg, t = self.config, int(timestep)
        # 1. the next timestep of the schedule (the same one after the last step)
        nxt = self._step_index + 1
        prev_t = int(self.timesteps[nxt]) if nxt < len(self.timesteps) else t
        alpha_prod_t, alpha_prod_prev = self._alpha_bar(t), self._alpha_bar(prev_t)

        # 2. predicted x_0 from the model output (epsilon, sample or v parameterisation)
        x = np.asarray(sample, dtype=np.float64)
        out = np.asarray(model_output, dtype=np.float64)
        pred_x0, _ = x0_and_eps(out, x, alpha_prod_t, cfg["prediction_type"])
        if cfg["clip_sample"]:
            pred_x0 = np.clip(pred_x0, -cfg["clip_sample_range"], cfg["clip_sample_range"])

        # 3. consistency function f(x, t) = c_skip * x + c_out * x_0, LCM paper eq. (9)
        c_skip, c_out = self._boundary_scalings(t)
        denoised = c_out * pred_x0 + c_skip * x

        # 4. re-noise the estimate to the next timestep, Algorithm 3 (multistep sampling)
        if self._step_index != self.num_inference_steps - 1:
            noise = self._noise(generator, np.shape(model_output))
            prev_sample = alpha_prod_prev ** 0.5 * denoised + (1.0 - alpha_prod_prev) ** 0.5 * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        return prev_sample.astype(np.float32)
