"""ldm-run's field table (runtime/fields.py) against what it describes: the click command,
``resolve_request``'s keywords, the served pipeline's inputs and the local-only refusal."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from ldm_edge.runtime import fields, remote
from ldm_edge.runtime.cli import run as cli
from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.fields import CLIENT_OPTIONS, FIELDS, LOCAL_ONLY, SERVED

# resolve_request's keywords that are no option. draw_seed: the caller brings a generator; denoising_start: set by ldm-run --refiner from the
# base's --denoising-end, never typed
NOT_OPTIONS = {"draw_seed", "denoising_start"}


def _click_defaults() -> dict:
    """What ldm-run's main receives when nothing is given."""
    return cli.main.make_context("ldm-run", []).params


def test_each_option_has_one_row_or_is_a_client_option():
    names = [f.option for f in FIELDS]
    assert len(names) == len(set(names))
    assert not set(names) & set(CLIENT_OPTIONS)
    assert set(names) | set(CLIENT_OPTIONS) == {p.name for p in cli.main.params}


def test_rows_say_ldm_runs_flags_and_defaults():
    params = {p.name: p for p in cli.main.params}
    defaults = _click_defaults()
    for f in FIELDS:
        assert f.flag in params[f.option].opts, f.option
        assert defaults[f.option] == f.default, f.option


def test_keywords_are_the_requests():
    from ldm_edge.runtime.request import resolve_request

    from ldm_edge.runtime.control import CONTROL_KEYWORDS

    # Pipeline.request resolves the ControlNet keywords itself (runtime/control.py), the rest
    # through resolve_request
    takes = (set(inspect.signature(resolve_request).parameters) | set(CONTROL_KEYWORDS)) \
        - {"bundle"} - NOT_OPTIONS
    keywords = [f.keyword for f in FIELDS if f.keyword]
    assert len(keywords) == len(set(keywords))
    assert set(keywords) == takes  # a new request keyword needs a row


def test_pipeline_inputs_are_the_served_rows():
    want = ({f.wire.name for f in SERVED} | {f.name_input for f in SERVED if f.file}
            | {f.files_input for f in SERVED if f.files_in_values})
    assert set(remote.PIPELINE_INPUTS) == want
    assert remote.PIPELINE_INPUTS["control"] == ("BYTES", [-1])
    assert remote.PIPELINE_INPUTS["control_image"] == ("BYTES", [-1])
    assert remote.PIPELINE_INPUTS["guess_mode"] == ("BOOL", [1])
    assert remote.PIPELINE_INPUTS["mask"] == ("BYTES", [1])
    assert remote.PIPELINE_INPUTS["mask_name"] == ("BYTES", [1])
    assert remote.PIPELINE_INPUTS["noise_level"] == ("INT32", [1])
    assert remote.PIPELINE_INPUTS["task"] == ("BYTES", [1])
    assert all(kind in remote.NUMPY_OF or kind == "BYTES"
               for kind, _ in remote.PIPELINE_INPUTS.values())


@pytest.mark.parametrize("field", LOCAL_ONLY, ids=[f.option for f in LOCAL_ONLY])
def test_each_local_only_option_is_refused_by_its_flag(field):
    options = _click_defaults()
    fields.refuse_local_only(options)  # all at their defaults: nothing refused
    options[field.option] = object()  # anything but the default
    with pytest.raises(UsageError) as e:
        fields.refuse_local_only(options)
    assert str(e.value) == (f"{field.flag} is for a local run; the server decides how it "
                            f"computes (drop {field.flag} or --server)")


def test_request_keywords_of_the_defaults():
    kw = fields.request_keywords(_click_defaults())
    assert kw["prompt"] is None and kw["num_images_per_prompt"] == 1 and kw["task"] is None
    kw = fields.request_keywords({"prompts": ("a", "b"), "negative_prompt": "blur"})
    assert kw["prompt"] == ["a", "b"] and kw["negative_prompt"] == ["blur"]
    assert set(fields.request_keywords({}, SERVED)) == {f.keyword for f in SERVED}


def test_request_inputs_by_option_name(tmp_path):
    mask = tmp_path / "m.png"
    mask.write_bytes(b"mask bytes")
    got = remote.request_inputs(prompts=["a cat"], task="unconditional", noise_level=30,
                                mask=str(mask), seed=2**64 - 1, negative_prompt=None)
    assert got["prompt"] == [b"a cat"] and got["task"] == [b"unconditional"]
    assert got["noise_level"].dtype == np.int32 and got["noise_level"].tolist() == [30]
    assert got["seed"].dtype == np.uint64 and got["seed"].tolist() == [2**64 - 1]
    assert got["mask"] == [b"mask bytes"] and got["mask_name"] == [str(mask).encode()]
    assert "negative_prompt" not in got and "init_image" not in got
    assert "prompt" not in remote.request_inputs(prompts=())  # no prompt: none sent


def test_request_inputs_refuses_what_the_wire_cannot_carry(tmp_path):
    with pytest.raises(TypeError, match="latents_path"):
        remote.request_inputs(latents_path="x.npy")
    with pytest.raises(UsageError, match=r"^--noise-level 4294967296 is out of range: the "
                                         r"server takes it as INT32"):
        remote.request_inputs(noise_level=2**32)
    with pytest.raises(UsageError, match=r"^--mask .*nope.png not found$"):
        remote.request_inputs(mask=str(tmp_path / "nope.png"))

