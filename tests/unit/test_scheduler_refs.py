"""The numpy schedulers against values stored from diffusers, and their own contract; no torch,
no diffusers (the lean runtime install runs these).

tests/unit/data/scheduler_refs.json holds, for every case x config of scheduler_cases.py,
diffusers' timesteps, sigmas and init_noise_sigma at STEPS steps and a few numbers of the
sample after a full loop with the fake model; make_scheduler_refs.py wrote it (rerun it when
a case is added). test_schedulers.py makes the same comparisons live where diffusers is here.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scheduler_cases import CASES, CONFIGS, SD15, SHAPE, STEPS, fake_model, initial_sample

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
    sched = SCHEDULERS[name].from_config(CONFIGS[config_id], **overrides)
    sched.set_timesteps(STEPS)
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


@pytest.mark.parametrize("key", sorted(STORED["cases"]))
def test_matches_stored_diffusers_values(key):
    check_case(key, STORED["cases"][key])


def test_registry():
    assert scheduler_names() == list(SCHEDULERS)
    assert set(scheduler_names()) == {"ddim", "ddpm", "pndm", "euler", "euler-a", "dpm++2m", "dpm++2m-karras", "lcm"}
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


def test_runtime_never_imports_torch():
    code = (
        "import ldm_edge.runtime.schedulers, sys; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
