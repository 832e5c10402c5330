"""ControlNet interfaces and request rules, without models: the residual layout of SD 1.5's
U-Net config, the step schedule diffusers keeps, the --control and --control-preprocess forms."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_edge.runtime.bundle.control_spec import (MID_RESIDUAL, residual_layout, residuals_of,
                                                  with_residuals)
from ldm_edge.runtime.bundle.spec import ModelDims, describe
from ldm_edge.runtime.control import ControlRequest, parse_control_arg
from ldm_edge.runtime.control_preprocess import parse_preprocess
from ldm_edge.runtime.errors import UsageError

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def test_sd15_takes_twelve_down_residuals_and_one_mid():
    res = residual_layout(**SD15)
    assert len(res) == 13 and res[-1].name == MID_RESIDUAL
    assert [r.channels for r in res[:-1]] == [320] * 4 + [640] * 3 + [1280] * 5
    assert [r.level for r in res[:-1]] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert (res[-1].channels, res[-1].level) == (1280, 3)
    # a stride-2, padding-1 conv rounds up: 9 latent rows -> 5 -> 3 -> 2
    assert res[-1].shape(2, 9, 16) == (2, 1280, 2, 2)


def test_the_unet_spec_round_trips_its_residuals():
    dims = ModelDims(latent_channels=4, vae_scale_factor=8, text_hidden_size=768,
                     text_max_length=77, use_attention_mask=False, min_size=64, max_size=1024)
    unet = with_residuals(describe(dims)["unet"], residual_layout(**SD15))
    assert [(r.channels, r.level) for r in residuals_of(unet)] == \
        [(r.channels, r.level) for r in residual_layout(**SD15)]
    assert unet.ranges["latent_height_div8"] == (1, 16)  # ceil(8 / 8), ceil(128 / 8)


@pytest.mark.parametrize("n", [1, 7, 8, 20, 51])
@pytest.mark.parametrize("start,end", [(0.0, 1.0), (0.25, 0.75), (0.1, 0.3), (0.5, 1.0)])
def test_active_steps_are_diffusers_controlnet_keep(n, start, end):
    c = ControlRequest((), start, end)
    keep = [1.0 - float(i / n < start or (i + 1) / n > end) for i in range(n)]
    assert [float(c.active(i, n)) for i in range(n)] == keep


@pytest.mark.parametrize("arg,want", [
    ("edges:a.png", ("edges", "a.png", 1.0)),
    ("edges:a.png:0.5", ("edges", "a.png", 0.5)),
    ("edges:dir/a:b.png", ("edges", "dir/a:b.png", 1.0)),
    (("edges", np.zeros(1), 2), ("edges", None, 2.0)),
])
def test_control_args(arg, want):
    name, image, scale = parse_control_arg(arg)
    assert (name, scale) == (want[0], want[2])
    if want[1] is not None:
        assert image == want[1]


@pytest.mark.parametrize("arg", ["edges", ":a.png", "edges:", "edges:a.png:inf"])
def test_bad_control_args_are_one_line(arg):
    with pytest.raises(UsageError) as e:
        parse_control_arg(arg)
    assert "\n" not in str(e.value)


def test_preprocess_forms():
    assert str(parse_preprocess("canny")) == "canny:100:200"
    assert str(parse_preprocess("canny:50:150")) == "canny:50:150"
    for bad in ("depth", "canny:1", "canny:a:b", "canny:200:100"):
        with pytest.raises(UsageError):
            parse_preprocess(bad)
