"""The scheduler cases shared by the live diffusers comparisons (test_schedulers.py), the
stored-value tests (test_scheduler_refs.py) and the script that stores the values
(make_scheduler_refs.py): configs, overrides, sampling options (tcd's eta), loop step counts,
the fake model and the initial sample. Torch-free."""

from __future__ import annotations

import numpy as np

SHAPE = (2, 4, 8, 8)  # batch 2: add_noise gets one timestep per batch item
STEPS = 20
STRENGTH = 0.6

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
CONFIGS = {
    "sd15": SD15,
    "sd2-v": {**SD15, "prediction_type": "v_prediction"},  # stable-diffusion-2 (768-v)
    "v-trailing": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "eps-linspace": {**SD15, "timestep_spacing": "linspace"},
    "v-zero-snr": {
        **SD15,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
    },
}
# case id -> (CLI name, diffusers class, overrides given to both sides)
CASES = {
    "ddim": ("ddim", "DDIMScheduler", {}),
    "ddim-clip-alpha1": (
        "ddim",
        "DDIMScheduler",
        {"clip_sample": True, "clip_sample_range": 1.5, "set_alpha_to_one": True},
    ),
    "ddpm": ("ddpm", "DDPMScheduler", {}),
    "ddpm-fixed_large": ("ddpm", "DDPMScheduler", {"variance_type": "fixed_large"}),
    "ddpm-fixed_small_log": ("ddpm", "DDPMScheduler", {"variance_type": "fixed_small_log"}),
    "pndm": ("pndm", "PNDMScheduler", {}),
    "pndm-prk": ("pndm", "PNDMScheduler", {"skip_prk_steps": False}),
    "euler": ("euler", "EulerDiscreteScheduler", {}),
    "euler-karras": ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-sigma_min": ("euler", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}),
    "euler-a": ("euler-a", "EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("dpm++2m", "DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("dpm++2m-karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m-heun-sigma_min": (
        "dpm++2m",
        "DPMSolverMultistepScheduler",
        {"solver_type": "heun", "final_sigmas_type": "sigma_min"},
    ),
    "dpm++2m-clipped-euler_final": (
        "dpm++2m",
        "DPMSolverMultistepScheduler",
        {"lambda_min_clipped": -5.1, "euler_at_final": True, "lower_order_final": False},
    ),
    "lcm": ("lcm", "LCMScheduler", {}),
    "lcm-orig25": ("lcm", "LCMScheduler", {"original_inference_steps": 25, "timestep_scaling": 5.0}),
    # TCD: eta (its stochasticity) comes from SAMPLING_OPTIONS, the step count from LOOP_STEPS
    "tcd": ("tcd", "TCDScheduler", {}),  # eta not given: both sides' default, 0.3
    "tcd-1": ("tcd", "TCDScheduler", {}),
    "tcd-2": ("tcd", "TCDScheduler", {}),
    "tcd-4": ("tcd", "TCDScheduler", {}),
    "tcd-8": ("tcd", "TCDScheduler", {}),
    "tcd-4-eta0": ("tcd", "TCDScheduler", {}),
    "tcd-8-eta0": ("tcd", "TCDScheduler", {}),
    "tcd-8-eta1": ("tcd", "TCDScheduler", {}),
    # original_inference_steps from the config: k = 40 and k = 10 training steps apart
    "tcd-orig25-eta0.5": ("tcd", "TCDScheduler", {"original_inference_steps": 25}),
    "tcd-orig100-eta0.7": ("tcd", "TCDScheduler", {"original_inference_steps": 100}),
}
# case id -> sampling options: our scheduler is made with them (make_scheduler(name, config,
# **options)), diffusers' takes them at every step() call
SAMPLING_OPTIONS = {
    "tcd-1": {"eta": 0.3},
    "tcd-2": {"eta": 0.3},
    "tcd-4": {"eta": 0.3},
    "tcd-8": {"eta": 0.3},
    "tcd-4-eta0": {"eta": 0.0},
    "tcd-8-eta0": {"eta": 0.0},
    "tcd-8-eta1": {"eta": 1.0},
    "tcd-orig25-eta0.5": {"eta": 0.5},
    "tcd-orig100-eta0.7": {"eta": 0.7},
}
# case id -> steps of the full sampling loop (any other case: STEPS); TCD is run at the few
# steps it is distilled for
LOOP_STEPS = {
    "tcd-1": 1,
    "tcd-2": 2,
    "tcd-4": 4,
    "tcd-8": 8,
    "tcd-4-eta0": 4,
    "tcd-8-eta0": 8,
    "tcd-8-eta1": 8,
    "tcd-orig25-eta0.5": 8,
    "tcd-orig100-eta0.7": 4,
}


def sampling_options(case: str) -> dict:
    return dict(SAMPLING_OPTIONS.get(case, {}))


def loop_steps(case: str) -> int:
    return LOOP_STEPS.get(case, STEPS)


def fake_model(model_input: np.ndarray, t) -> np.ndarray:
    """A fixed 'UNet': shrinks its (scaled) input by t / (t + 1)."""
    t = float(t)
    return (model_input * np.float32(t / (t + 1.0))).astype(np.float32)


def initial_sample() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
