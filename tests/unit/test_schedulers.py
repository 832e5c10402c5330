"""The numpy schedulers against the diffusers schedulers of the same name, same config.

Every case runs the same fake model on both sides: timesteps, sigmas, full sampling
loops, add_noise and an img2img-style partial loop must agree. Tiny tensors only.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_edge.runtime.schedulers import SCHEDULERS, Scheduler, make_scheduler, scheduler_names  # noqa: E402

# Why any tolerance at all: diffusers does its scalar algebra in float32 torch, we do it in
# float64; and torch's float32 sqrt on CPU is not correctly rounded (on this machine's build
# ~20% of results are 1 ulp off) while numpy's is, so even the sigma tables differ by ~1e-7.
# Zero-terminal-SNR rescaling subtracts two nearly equal square roots, which turns those
# 1-ulp differences into up to ~4e-6 relative in the tail of alphas_cumprod.
#
# Sampling loops and add_noise: a few float32 roundings per step over 20 steps.
RTOL = 1e-5
# Absolute floor for elements that land near zero: the samples here are O(1) and the loops'
# absolute error is ~1e-6 (worst seen 3e-6: Euler on the zero-SNR table), so 1e-5 absolute
# is still a 1e-5 error relative to the sample's scale.
ATOL = 1e-5
# Sigma tables and init_noise_sigma: 1 ulp normally, up to ~3e-6 with zero-SNR rescaling.
SIGMA_RTOL = 1e-5
# Fractional (Karras) Euler timesteps are interpolated in log-sigma from those tables, so
# they inherit the same relative error. Integer timesteps must be identical.
FRACTIONAL_T_RTOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

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
}


class TorchNormal:
    """numpy-Generator-like adapter drawing from a torch generator, so both sides see the
    same noise."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32):
        return torch.randn(tuple(size), generator=self.gen, dtype=torch.float32).numpy().astype(dtype)


def fake_model(model_input: np.ndarray, t) -> np.ndarray:
    """A fixed 'UNet': shrinks its (scaled) input by t / (t + 1)."""
    t = float(t)
    return (model_input * np.float32(t / (t + 1.0))).astype(np.float32)


def build_pair(case: str, config: dict):
    name, cls_name, overrides = CASES[case]
    ours = SCHEDULERS[name].from_config(config, **overrides)
    theirs = getattr(diffusers, cls_name).from_config(config, **overrides)
    return ours, theirs


def run_ours(sched, x, timesteps, seed: int = 0) -> np.ndarray:
    gen = TorchNormal(seed)
    for t in timesteps:
        out = fake_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=gen)
    return x


def run_theirs(sched, x, timesteps, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    extra = {"generator": gen} if "generator" in inspect.signature(sched.step).parameters else {}
    x = torch.from_numpy(x)
    for t in timesteps:
        out = torch.from_numpy(fake_model(sched.scale_model_input(x, t).numpy(), t))
        x = sched.step(out, t, x, return_dict=False, **extra)[0]
    return x.numpy()


def initial_sample() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)


pair_params = pytest.mark.parametrize(
    "case,config", [(c, k) for c in CASES for k in CONFIGS], ids=lambda v: v if isinstance(v, str) else None
)


@pair_params
def test_config_resolves_like_diffusers(case, config):
    ours, theirs = build_pair(case, CONFIGS[config])
    # diffusers also carries foreign keys of the source config along (unused); we drop them
    expected = {k: v for k, v in theirs.config.items() if k in inspect.signature(type(theirs)).parameters}
    assert ours.config == expected
    assert type(theirs).__name__ == ours.diffusers_class


@pair_params
@pytest.mark.parametrize("n", [1, 4, 25, 50])
def test_timesteps_and_sigmas(case, config, n):
    ours, theirs = build_pair(case, CONFIGS[config])
    try:
        theirs.set_timesteps(n)
    except Exception:  # diffusers refuses this n (e.g. PRK needs >= 4 steps): so must we
        with pytest.raises(ValueError):
            ours.set_timesteps(n)
        return
    ours.set_timesteps(n)
    expected = theirs.timesteps.numpy()
    assert ours.timesteps.dtype == expected.dtype
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(ours.timesteps, expected, rtol=FRACTIONAL_T_RTOL)
    else:
        np.testing.assert_array_equal(ours.timesteps, expected)
    assert ours.order == theirs.order
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=SIGMA_RTOL)
    if hasattr(ours, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=SIGMA_RTOL)


@pair_params
def test_full_loop_matches(case, config):
    ours, theirs = build_pair(case, CONFIGS[config])
    ours.set_timesteps(STEPS)
    theirs.set_timesteps(STEPS)
    x0 = initial_sample()
    x_ours = run_ours(ours, x0 * np.float32(ours.init_noise_sigma), ours.timesteps)
    x_theirs = run_theirs(theirs, (torch.from_numpy(x0) * theirs.init_noise_sigma).numpy(), theirs.timesteps)
    assert x_ours.dtype == np.float32 and np.isfinite(x_ours).all()
    np.testing.assert_allclose(x_ours, x_theirs, rtol=RTOL, atol=ATOL)


@pair_params
def test_add_noise_matches(case, config):
    ours, theirs = build_pair(case, CONFIGS[config])
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    picks = [3, 10]
    clean, noise = initial_sample(), np.random.default_rng(1).standard_normal(SHAPE, dtype=np.float32)
    got = ours.add_noise(clean, noise, ours.timesteps[picks])
    want = theirs.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), theirs.timesteps[picks])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL)


def img2img(sched, clean, noise, as_tensor):
    """diffusers' img2img recipe: start part-way, at t_start * order."""
    sched.set_timesteps(STEPS)
    t_start = max(STEPS - min(int(STEPS * STRENGTH), STEPS), 0)
    timesteps = sched.timesteps[t_start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    first = timesteps[:1].repeat(SHAPE[0]) if as_tensor else np.repeat(timesteps[:1], SHAPE[0])
    if as_tensor:
        x = sched.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), first).numpy()
        return run_theirs(sched, x, timesteps, seed=5)
    return run_ours(sched, sched.add_noise(clean, noise, first), timesteps, seed=5)


@pair_params
def test_img2img_partial_loop_matches(case, config):
    ours, theirs = build_pair(case, CONFIGS[config])
    clean, noise = initial_sample(), np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32)
    got = img2img(ours, clean, noise, as_tensor=False)
    want = img2img(theirs, clean, noise, as_tensor=True)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_registry():
    assert scheduler_names() == list(SCHEDULERS)
    assert set(scheduler_names()) == {"ddim", "ddpm", "pndm", "euler", "euler-a", "dpm++2m", "dpm++2m-karras", "lcm"}
    for name, cls in SCHEDULERS.items():
        assert cls.name == name
        assert hasattr(diffusers, cls.diffusers_class)
        params = list(inspect.signature(cls.step).parameters)
        assert params == ["self", "model_output", "timestep", "sample", "generator"], name
        for method in ("set_timesteps", "set_begin_index", "scale_model_input", "add_noise"):
            got = inspect.signature(getattr(cls, method))
            assert got == inspect.signature(getattr(Scheduler, method)), (name, method)
    assert make_scheduler("dpm++2m-karras", SD15).config["use_karras_sigmas"] is True


class CountingNormal:
    """Records every draw request; returns zeros."""

    def __init__(self) -> None:
        self.sizes: list[tuple] = []

    def standard_normal(self, size, dtype=np.float32):
        self.sizes.append(tuple(size))
        return np.zeros(size, dtype=dtype)


@pytest.mark.parametrize(
    "name,draws",
    [("ddpm", STEPS), ("euler-a", STEPS), ("lcm", STEPS - 1), ("ddim", 0), ("euler", 0), ("dpm++2m", 0)],
)
def test_noise_draws_one_call_per_stochastic_step(name, draws):
    sched = make_scheduler(name, SD15)
    sched.set_timesteps(STEPS)
    gen = CountingNormal()
    run_ours_with(sched, gen)
    assert gen.sizes == [SHAPE] * draws
    sched.set_timesteps(STEPS)
    assert np.isfinite(run_ours_with(sched, None)).all()  # None: a fresh numpy default_rng


def run_ours_with(sched, generator) -> np.ndarray:
    x = initial_sample() * np.float32(sched.init_noise_sigma)
    for t in sched.timesteps:
        x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x, generator=generator)
    return x


def test_dpm_name_fixes_algorithm_and_order():
    sched = make_scheduler("dpm++2m", {**SD15, "algorithm_type": "sde-dpmsolver++", "solver_order": 3})
    assert sched.config["algorithm_type"] == "dpmsolver++" and sched.config["solver_order"] == 2


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"dpm\+\+2m-karras") as err:
        make_scheduler("heun", SD15)
    assert "heun" in str(err.value)


@pytest.mark.parametrize(
    "name,option",
    [
        ("ddim", {"thresholding": True}),
        ("ddpm", {"variance_type": "learned_range"}),
        ("ddpm", {"beta_schedule": "sigmoid"}),
        ("lcm", {"thresholding": True}),
        ("pndm", {"prediction_type": "sample"}),
        ("euler", {"use_exponential_sigmas": True}),
        ("euler", {"interpolation_type": "log_linear"}),
        ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
        ("euler-a", {"prediction_type": "sample"}),
        ("dpm++2m", {"use_lu_lambdas": True}),
        ("dpm++2m-karras", {"use_beta_sigmas": True}),
    ],
)
def test_unsupported_option_raises(name, option):
    key = next(iter(option)) if len(option) == 1 else "timestep_type"
    with pytest.raises(ValueError, match=key):
        make_scheduler(name, {**SD15, **option})


def test_from_config_ignores_unknown_keys_and_uses_class_defaults():
    sched = make_scheduler("euler", {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "bogus": 1})
    assert sched.config["timestep_spacing"] == "linspace"  # Euler's default, not PNDM's
    assert "skip_prk_steps" not in sched.config and "bogus" not in sched.config


@pytest.mark.parametrize("case", list(CASES))
def test_saved_diffusers_config_defaults_follow_target_class(case):
    """A config saved by a diffusers scheduler lists the keys it defaulted under
    _use_default_values; loading it into another class must use that class's defaults
    (e.g. Euler gets timestep_spacing="linspace", not PNDM's "leading")."""
    hub = {k: v for k, v in SD15.items() if k != "timestep_spacing"}
    saved = dict(diffusers.PNDMScheduler.from_config(hub).config)
    assert "timestep_spacing" in saved["_use_default_values"]
    ours, theirs = build_pair(case, saved)
    assert ours.config["timestep_spacing"] == theirs.config["timestep_spacing"]
    ours.set_timesteps(25)
    theirs.set_timesteps(25)
    assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=FRACTIONAL_T_RTOL)


def test_runtime_never_imports_torch():
    code = (
        "import ldm_edge.runtime.schedulers, sys; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
