"""The numpy schedulers against values stored from diffusers, and their own contract; no torch,
no diffusers (the lean runtime install runs these).

tests/unit/data/scheduler_refs.json holds, for every case x config of scheduler_cases.py,
diffusers' timesteps, sigmas and init_noise_sigma at the case's loop step count (STEPS unless
LOOP_STEPS says otherwise) and a few numbers of the sample after a full loop with the fake
model and the case's sampling options (tcd's eta); make_scheduler_refs.py wrote it (rerun it
for a case added or changed). test_schedulers.py makes the same comparisons live where
diffusers is here.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scheduler_cases import (CASES, CONFIGS, LOOP_STEPS, SAMPLING_OPTIONS, SD15, SHAPE, STEPS,
                             fake_model, initial_sample, loop_steps, sampling_options)

from ldm_edge.runtime.schedulers import SCHEDULERS, Scheduler, make_scheduler, scheduler_names

REFS = Path(__file__).parent / "data" / "scheduler_refs.json"
# The same tolerances as the live comparisons (test_schedulers.py), for the same reasons:
# diffusers does its scalar algebra in float32 torch (whose CPU sqrt is not correctly rounded),
# we do it in float64, so tables differ by ~1 ulp (up to ~3e-6 relative with zero-SNR
# rescaling) and a 20-step loop's samples, which are O(1), by up to ~3e-6 absolute.
REF_RTOL = 1e-5
REF_ATOL = 1e-5
# A sum over the sample's elements may collect every element's error: its bound is the
# per-element bound times the number of elements (errors of one sign are the worst case).
N_ELEMENTS = int(np.prod(SHAPE))


def load_refs() -> dict:
    return json.loads(REFS.read_text())


def check_case(key: str, ref: dict) -> None:
    """Assert our scheduler of ``key`` ("case/config") reproduces the stored diffusers values."""
    case, config_id = key.split("/")
    name, _, overrides = CASES[case]
    sched = SCHEDULERS[name].from_config(CONFIGS[config_id], **overrides, **sampling_options(case))
    sched.set_timesteps(loop_steps(case))
    assert str(sched.timesteps.dtype) == ref["timesteps_dtype"], key
    if sched.timesteps.dtype.kind == "f":  # Karras: interpolated in log-sigma, inherits its error
        np.testing.assert_allclose(sched.timesteps, ref["timesteps"], rtol=REF_RTOL, err_msg=key)
    else:
        np.testing.assert_array_equal(sched.timesteps, ref["timesteps"], err_msg=key)
    assert sched.order == ref["order"], key
    assert float(sched.init_noise_sigma) == pytest.approx(ref["init_noise_sigma"], rel=REF_RTOL)
    assert hasattr(sched, "sigmas") == ("sigmas" in ref), key
    if "sigmas" in ref:
        np.testing.assert_allclose(sched.sigmas, ref["sigmas"], rtol=REF_RTOL, err_msg=key)
    gen = np.random.default_rng(0)  # make_scheduler_refs.NOISE_SEED: diffusers drew the same
    x = initial_sample() * np.float32(sched.init_noise_sigma)
    for t in sched.timesteps:
        x = sched.step(fake_model(sched.scale_model_input(x, t), t), t, x, generator=gen)
    assert x.dtype == np.float32 and np.isfinite(x).all(), key
    flat, want = x.ravel().astype(np.float64), ref["loop"]
    probes = flat[list(PROBES)]
    np.testing.assert_allclose(probes, want["probes"], rtol=REF_RTOL, atol=REF_ATOL, err_msg=key)
    for what, got in (("sum", flat.sum()), ("abs_sum", np.abs(flat).sum())):
        bound = N_ELEMENTS * REF_ATOL + REF_RTOL * want["abs_sum"]
        assert abs(got - want[what]) <= bound, (key, what, got, want[what])


PROBES = (0, 1, 37, 100, 255, 256, 300, 511)  # make_scheduler_refs.PROBES
STORED = load_refs() if REFS.is_file() else {"meta": {}, "cases": {}}


def test_stored_values_cover_every_case():
    want = {f"{c}/{k}" for c in CASES for k in CONFIGS}
    assert set(STORED["cases"]) == want, "rerun tests/unit/make_scheduler_refs.py"
    assert tuple(STORED["meta"]["probes"]) == PROBES and STORED["meta"]["steps"] == STEPS
    # a case whose step count or eta changed since the values were stored must be re-stored
    assert STORED["meta"]["loop_steps"] == LOOP_STEPS, "rerun tests/unit/make_scheduler_refs.py"
    assert STORED["meta"]["sampling_options"] == SAMPLING_OPTIONS, "rerun make_scheduler_refs.py"


@pytest.mark.parametrize("key", sorted(STORED["cases"]))
def test_matches_stored_diffusers_values(key):
    check_case(key, STORED["cases"][key])


def test_registry():
    assert scheduler_names() == list(SCHEDULERS)
    assert set(scheduler_names()) == {"ddim", "ddpm", "pndm", "euler", "euler-a", "dpm++2m",
                                      "dpm++2m-karras", "lcm", "tcd"}
    for name, cls in SCHEDULERS.items():
        assert cls.name == name
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
    [("ddpm", STEPS), ("euler-a", STEPS), ("lcm", STEPS - 1), ("tcd", STEPS - 1), ("ddim", 0),
     ("euler", 0), ("dpm++2m", 0)],
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
        ("tcd", {"prediction_type": "flow_prediction"}),
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


def test_runtime_never_imports_torch():
    code = (
        "import ldm_edge.runtime.schedulers, sys; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tcd_eta_is_a_sampling_option():
    """eta is given when the scheduler is made (diffusers takes it at step()): default 0.3,
    not a config key, checked, and refused by a scheduler that has no use for it."""
    assert make_scheduler("tcd", SD15).eta == 0.3
    assert make_scheduler("tcd", SD15, eta=None).eta == 0.3  # None: not given
    assert make_scheduler("tcd", SD15, eta=0).eta == 0.0
    assert "eta" not in make_scheduler("tcd", SD15, eta=0.7).config
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="eta=.* between 0 .* and 1"):
            make_scheduler("tcd", SD15, eta=bad)
    assert make_scheduler("ddim", SD15, eta=None).name == "ddim"
    with pytest.raises(ValueError, match="'ddim' takes no eta .*option of tcd"):
        make_scheduler("ddim", SD15, eta=0.3)


def test_tcd_eta0_draws_nothing():
    sched = make_scheduler("tcd", SD15, eta=0.0)
    sched.set_timesteps(8)
    gen = CountingNormal()
    run_ours_with(sched, gen)
    assert gen.sizes == []


def test_tcd_landing_timestep_spot_values():
    """diffusers' floor((1 - eta) * t') is a float32 product (values read from torch 2.13);
    a float64 one gives 62, 118 and 0 here."""
    from ldm_edge.runtime.schedulers.tcd import landing_timestep

    got = [landing_timestep(90, 0.3), landing_timestep(170, 0.3), landing_timestep(5, 0.8)]
    assert got == [63, 119, 1]
    assert landing_timestep(0, 0.3) == 0 and landing_timestep(999, 0.0) == 999
    assert landing_timestep(999, 1.0) == 0


def test_tcd_ignores_clipping_and_thresholding_like_diffusers():
    """diffusers' TCD step never clips or thresholds x_0 (LCM's does): the keys are accepted
    and change nothing."""
    plain = make_scheduler("tcd", SD15, eta=0.3)
    keys = {"clip_sample": True, "clip_sample_range": 0.05, "thresholding": True}
    tight = make_scheduler("tcd", {**SD15, **keys}, eta=0.3)
    for sched in (plain, tight):
        sched.set_timesteps(4)
    a = run_ours_with(plain, np.random.default_rng(3))
    b = run_ours_with(tight, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
