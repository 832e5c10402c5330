"""The numpy schedulers against the diffusers schedulers of the same name, same config, live.

Every case runs the same fake model on both sides: timesteps, sigmas, full sampling
loops, add_noise and an img2img-style partial loop must agree. Tiny tensors only.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

# The live comparisons need diffusers (and torch under it); without them the stored values
# in test_scheduler_refs.py still check every case.
torch = pytest.importorskip("torch", reason="the live diffusers comparisons need torch; "
                            "test_scheduler_refs.py checks the stored values instead")
diffusers = pytest.importorskip("diffusers", reason="the live diffusers comparisons need "
                                "diffusers; test_scheduler_refs.py checks the stored values instead")

from scheduler_cases import (CASES, CONFIGS, SD15, SHAPE, STEPS, STRENGTH,  # noqa: E402
                             fake_model, initial_sample, loop_steps, sampling_options)

from ldm_edge.runtime.schedulers import SCHEDULERS  # noqa: E402

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

class TorchNormal:
    """numpy-Generator-like adapter drawing from a torch generator, so both sides see the
    same noise."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32):
        return torch.randn(tuple(size), generator=self.gen, dtype=torch.float32).numpy().astype(dtype)


def build_pair(case: str, config: dict):
    """Ours made with the case's sampling options; diffusers' takes them at step() (run_theirs)."""
    name, cls_name, overrides = CASES[case]
    ours = SCHEDULERS[name].from_config(config, **overrides, **sampling_options(case))
    theirs = getattr(diffusers, cls_name).from_config(config, **overrides)
    theirs.step_options = sampling_options(case)
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
    extra.update(getattr(sched, "step_options", {}))  # build_pair's: the case's eta
    x = torch.from_numpy(x)
    for t in timesteps:
        out = torch.from_numpy(fake_model(sched.scale_model_input(x, t).numpy(), t))
        x = sched.step(out, t, x, return_dict=False, **extra)[0]
    return x.numpy()


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
    ours.set_timesteps(loop_steps(case))
    theirs.set_timesteps(loop_steps(case))
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


def test_registry_names_diffusers_classes():
    for name, cls in SCHEDULERS.items():
        assert hasattr(diffusers, cls.diffusers_class), name


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


def test_tcd_landing_timestep_is_diffusers_float32_floor():
    """s = floor((1 - eta) * t') as diffusers computes it (a float32 product), for every
    training timestep and a grid of eta; a float64 product differs on ~1 % of these."""
    from ldm_edge.runtime.schedulers.tcd import landing_timestep

    for eta in np.round(np.arange(0.0, 1.0001, 0.05), 2).tolist() + [1 / 3, 0.123456]:
        want = torch.floor((1 - eta) * torch.arange(1000)).long().numpy()
        got = [landing_timestep(p, eta) for p in range(1000)]
        np.testing.assert_array_equal(got, want, err_msg=f"eta={eta}")


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_tcd_eta_reaches_every_step(eta):
    """Our eta, given once, against diffusers' eta given at each step: same loop, and the loop
    at another eta is far from it (so the comparison would see a dropped or misused eta)."""
    ours = SCHEDULERS["tcd"].from_config(SD15, eta=eta)
    theirs = diffusers.TCDScheduler.from_config(SD15)
    theirs.step_options = {"eta": eta}
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    x0 = initial_sample()
    got = run_ours(ours, x0, ours.timesteps)
    want = run_theirs(theirs, x0, theirs.timesteps)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    other = SCHEDULERS["tcd"].from_config(SD15, eta=0.5)
    other.set_timesteps(4)
    assert np.abs(run_ours(other, x0, other.timesteps) - want).max() > 1e3 * ATOL
