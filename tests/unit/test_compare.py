"""runtime.compare.Comparison reports the tolerances it was given and the limit it applied."""

from __future__ import annotations

import numpy as np

from ldm_edge.runtime.compare import compare


def test_atol_is_the_atol_given_and_the_limit_adds_rtol_of_the_reference():
    ref = np.array([10.0, -20.0, 5.0])
    c = compare(ref + 1e-4, ref, atol=1e-5, rtol=1e-5)
    assert c.atol == 1e-5 and c.rtol == 1e-5
    assert c.max_abs_limit == 1e-5 + 1e-5 * 20.0
    assert bool(c)  # 1e-4 <= 2.1e-4
    assert "atol 1.0e-05" in str(c) and "max-abs <= 2.1e-04" in str(c)
    assert not compare(ref + 3e-4, ref, atol=1e-5, rtol=1e-5)


def test_without_atol_only_cosine_and_finiteness_judge():
    ref = np.ones(4)
    assert compare(ref * 2, ref, min_cosine=0.999)  # same direction
    assert compare(ref * 2, ref).max_abs_limit is None
    assert not compare(np.array([1.0, np.nan, 1.0, 1.0]), ref)
