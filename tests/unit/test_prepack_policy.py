"""When onnxruntime pre-packs a graph's weights (runtime/backends/prepack.py)."""

from __future__ import annotations

import pytest

from ldm_edge.runtime.backends.prepack import ENV, MIN_CALLS, prepack_wanted
from ldm_edge.runtime.errors import UsageError


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.setenv(ENV, "auto")


def test_a_float_graph_called_a_few_times_is_not_prepacked(auto):
    assert not prepack_wanted("fp32", 1)
    assert not prepack_wanted("fp16", MIN_CALLS - 1)
    assert prepack_wanted("fp32", MIN_CALLS)


def test_unknown_calls_and_int8_graphs_are_prepacked(auto):
    assert prepack_wanted("fp32", None)  # a server, a notebook: many calls to come
    assert prepack_wanted("int8", 1)  # its integer kernels need the packed weights


def test_the_environment_forces_either_way(monkeypatch):
    monkeypatch.setenv(ENV, "1")
    assert prepack_wanted("fp32", 1)
    monkeypatch.setenv(ENV, "0")
    assert not prepack_wanted("int8", None)
    monkeypatch.delenv(ENV)  # not set: auto
    assert not prepack_wanted("fp32", 1) and prepack_wanted("fp32", None)


def test_a_misspelt_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(ENV, "sometimes")
    with pytest.raises(UsageError, match=f"{ENV}='sometimes': use 1"):
        prepack_wanted("fp32", 1)
