"""A run's timings are a typed record; ldm-run's table reads its fields."""

from __future__ import annotations

import math

from ldm_edge.runtime.cli.run import timing_table
from ldm_edge.runtime.pipeline import Timings


def test_stages_add_up_and_the_table_shows_what_ran():
    t = Timings()
    t.add("unet", 0.25)
    t.add("unet", 0.5)
    t.add("lora", 0.1)
    t.unet_per_step, t.total = [0.3, 0.1, 0.35], 2.0
    assert t.unet == 0.75 and t.lora == 0.1 and t.vae_encoder is None
    assert t.unet_step_median == 0.3
    table = timing_table(t)
    assert "lora merge (numpy)" in table and "unet (3 steps)" in table
    assert "vae encoder" not in table  # it did not run
    assert math.isnan(Timings().unet_step_median)

