"""The backend interface's own bookkeeping: bound inputs, merging, checks."""
from __future__ import annotations

import numpy as np
import pytest

from ldm_edge.runtime.backends.base import Backend
from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.bundle.spec import ComponentSpec, TensorSpec

SPEC = ComponentSpec("toy", (TensorSpec("a", "float32", ("batch", 2)), TensorSpec("b", "float32", ("batch", 2))),
                     (TensorSpec("sum", "float32", ("batch", 2)),), {"batch": [1, 4]})


class Sum(Backend):
    def _run(self, feeds, bound):
        full = self._with_bound(feeds, bound)
        return {"sum": full["a"] + full["b"]}


def test_bound_inputs_are_used_until_unbound_and_reported_by_bound():
    be = Sum(SPEC)
    b = np.ones((1, 2), np.float32)
    be.bind({"b": b})
    assert set(be.bound) == {"b"} and be.bound["b"] is b
    be.bound.clear()  # a copy of the mapping: the backend keeps its inputs
    out = be.run({"a": np.full((1, 2), 2, np.float32)})["sum"]
    assert np.array_equal(out, np.full((1, 2), 3, np.float32))
    # a feed overrides the bound input of the same name
    out = be.run({"a": np.zeros((1, 2), np.float32), "b": np.full((1, 2), 5, np.float32)})["sum"]
    assert np.array_equal(out, np.full((1, 2), 5, np.float32))
    be.unbind()
    assert be.bound == {}
    with pytest.raises(UsageError, match="input 'b' missing"):
        be.run({"a": np.zeros((1, 2), np.float32)})


@pytest.mark.parametrize("feeds,message", [
    ({"c": np.zeros((1, 2), np.float32)}, "unknown input"),
    ({"a": np.zeros((1, 2), np.float64)}, "must be float32"),
    ({"a": np.zeros((2,), np.float32)}, "must have 2 dims"),
    ({"a": np.zeros((1, 3), np.float32)}, "expects"),
    ({"a": np.zeros((5, 2), np.float32)}, "outside the exported range"),
])
def test_bind_checks_what_it_keeps(feeds, message):
    with pytest.raises(UsageError, match=message):
        Sum(SPEC).bind(feeds)


def test_bound_and_fed_inputs_must_agree_on_batch():
    be = Sum(SPEC)
    be.bind({"b": np.zeros((2, 2), np.float32)})
    with pytest.raises(UsageError, match="disagree on batch"):
        be.run({"a": np.zeros((1, 2), np.float32)})


@pytest.mark.parametrize("message,expected", [
    ("first line\nsecond line", "first line"), ("", "ValueError"), ("   \n  ", "ValueError"),
    ("x" * 500, "x" * 200)])
def test_first_line_of_an_error(message, expected):
    from ldm_edge.runtime.errors import first_line

    assert first_line(ValueError(message)) == expected
