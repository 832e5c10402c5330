"""Store diffusers' scheduler results once, so the numpy schedulers are checked without diffusers.

    python tests/unit/make_scheduler_refs.py   # needs torch and diffusers (pip install .[export])
    python tests/unit/make_scheduler_refs.py tcd tcd-1   # only these cases; the rest as stored

For every case x config of scheduler_cases.py, diffusers' own scheduler is asked for its
timesteps, sigmas (where it has them) and init_noise_sigma at the case's loop step count
(``STEPS`` unless scheduler_cases.LOOP_STEPS says otherwise), and runs a full loop with the
fake model ``x * t / (t + 1)`` from the seeded initial sample, the case's sampling options
(tcd's eta) given to every step() call; stochastic steps
draw their noise from numpy's ``default_rng(NOISE_SEED)`` (diffusers' ``randn_tensor`` is
replaced for the run), which is what the tests hand our schedulers. A few numbers of the final
sample are kept (sum, sum of magnitudes, probe elements), not the sample. Our schedulers are
checked against the values before they are written, so a stored file is one that passes.
Writes tests/unit/data/scheduler_refs.json; test_scheduler_refs.py reads it.

Name the cases that are new or changed: torch's float32 results differ by an ulp or so from
one CPU to another (its vector kernels), so a full rerun on another machine rewrites every
stored number within the tolerances; the named cases are computed, the others kept as stored.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from scheduler_cases import (CASES, CONFIGS, LOOP_STEPS, SAMPLING_OPTIONS, STEPS, fake_model,
                             initial_sample, loop_steps, sampling_options)

OUT = Path(__file__).parent / "data" / "scheduler_refs.json"
NOISE_SEED = 0
# flat indices of the final sample kept as probes: corners of each batch item and a few between
PROBES = (0, 1, 37, 100, 255, 256, 300, 511)


def summarise(x: np.ndarray) -> dict:
    flat = np.asarray(x, np.float32).ravel()
    return {"sum": float(flat.astype(np.float64).sum()),
            "abs_sum": float(np.abs(flat.astype(np.float64)).sum()),
            "probes": [float(flat[i]) for i in PROBES]}


def run_loop(sched, x: np.ndarray, step) -> np.ndarray:
    for t in sched.timesteps:
        x = step(sched, x, t)
    return x


def diffusers_case(diffusers, torch, case: str, config: dict) -> dict:
    _, cls_name, overrides = CASES[case]
    options = sampling_options(case)
    sched = getattr(diffusers, cls_name).from_config(config, **overrides)
    sched.set_timesteps(loop_steps(case))
    ref = {"timesteps": sched.timesteps.numpy().tolist(),
           "timesteps_dtype": str(sched.timesteps.numpy().dtype),
           "init_noise_sigma": float(sched.init_noise_sigma), "order": sched.order}
    if hasattr(sched, "sigmas"):
        ref["sigmas"] = sched.sigmas.numpy().astype(np.float64).tolist()
    rng = np.random.default_rng(NOISE_SEED)

    def numpy_noise(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(rng.standard_normal(size=tuple(shape), dtype=np.float32))

    def step(s, x, t):
        out = torch.from_numpy(fake_model(s.scale_model_input(x, t).numpy(), t))
        return s.step(out, t, x, return_dict=False, **options)[0]

    module = sys.modules[type(sched).__module__]
    saved = getattr(module, "randn_tensor", None)
    module.randn_tensor = numpy_noise  # the scheduler modules import it by name
    try:
        x0 = torch.from_numpy(initial_sample()) * sched.init_noise_sigma
        ref["loop"] = summarise(run_loop(sched, x0, step).numpy())
    finally:
        if saved is not None:
            module.randn_tensor = saved
    return ref


def main(only: list[str]) -> None:
    import diffusers
    import torch

    from test_scheduler_refs import check_case

    unknown = sorted(set(only) - set(CASES))
    if unknown:
        sys.exit(f"unknown cases {unknown}; scheduler_cases.CASES has {list(CASES)}")
    stored = json.loads(OUT.read_text())["cases"] if only and OUT.is_file() else {}
    refs = {}
    for case in CASES:
        for config_id, config in CONFIGS.items():
            key = f"{case}/{config_id}"
            if only and case not in only:
                if key not in stored:
                    sys.exit(f"{key} is not stored yet: name {case} too")
                refs[key] = stored[key]
            else:
                refs[key] = diffusers_case(diffusers, torch, case, config)
            check_case(key, refs[key])  # ours agree with what is about to be stored
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "steps": STEPS,
            "noise_seed": NOISE_SEED, "probes": list(PROBES), "loop_steps": LOOP_STEPS,
            "sampling_options": SAMPLING_OPTIONS}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "cases": refs}, separators=(",", ":")) + "\n")
    fresh = len(refs) - sum(refs[k] is stored.get(k) for k in refs)
    print(f"wrote {len(refs)} cases ({fresh} computed now) to {OUT} "
          f"({OUT.stat().st_size / 1024:.0f} KiB)")

if __name__ == "__main__":
    main(sys.argv[1:])
