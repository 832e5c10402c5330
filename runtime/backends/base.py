"""The one backend interface: named numpy arrays in, named arrays out.

Checking of names, dtypes, ranks, fixed dims and the exported shape ranges lives
here, once; a backend implements ``_run`` (and may override ``bind`` to keep inputs
resident on its device).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..bundle.spec import ComponentSpec
from ..errors import UsageError


class Backend(ABC):
    name = "base"

    def __init__(self, spec: ComponentSpec, *, precision: str = "fp32"):
        self.spec = spec
        self.precision = precision  # of the graph or engine this backend runs
        self._bound: dict[str, np.ndarray] = {}

    # -- lifecycle ----------------------------------------------------------------
    def bind(self, feeds: dict[str, np.ndarray]) -> None:
        """Keep inputs that do not change between calls (e.g. text embeddings)."""
        self.check(feeds, partial=True)
        self._bound = dict(feeds)

    @property
    def bound(self) -> dict[str, np.ndarray]:
        """The inputs kept by ``bind`` (a copy of the mapping; the arrays are shared)."""
        return dict(self._bound)

    def unbind(self) -> None:
        self._bound = {}

    def close(self) -> None:
        self._bound = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- calls --------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        merged = {**self._bound, **feeds}
        self.check(merged)
        return self._run(feeds, bound=set(self._bound) - set(feeds))

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray], bound: set[str]) -> dict[str, np.ndarray]:
        """Run with ``feeds`` plus the bound inputs named in ``bound``."""

    def _with_bound(self, feeds: dict[str, np.ndarray], bound: set[str]) -> dict[str, np.ndarray]:
        """``feeds`` plus the bound host arrays named in ``bound``: what a backend without
        device-resident inputs passes to its engine."""
        return {**{k: self._bound[k] for k in bound}, **feeds}

    def check(self, feeds: dict[str, np.ndarray], partial: bool = False) -> None:
        spec = self.spec
        unknown = set(feeds) - set(spec.input_names)
        if unknown:
            raise UsageError(f"{spec.name}: unknown input(s) {sorted(unknown)}; "
                             f"expects {spec.input_names}")
        sizes: dict[str, int] = {}
        for t in spec.inputs:
            if t.name not in feeds:
                if partial:
                    continue
                raise UsageError(f"{spec.name}: input {t.name!r} missing")
            a = feeds[t.name]
            if not isinstance(a, np.ndarray) or a.dtype != np.dtype(t.dtype):
                got = getattr(a, "dtype", type(a).__name__)
                raise UsageError(f"{spec.name}: input {t.name!r} must be {t.dtype}, got {got}")
            if a.ndim != len(t.shape):
                raise UsageError(f"{spec.name}: input {t.name!r} must have {len(t.shape)} dims "
                                 f"{list(t.shape)}, got shape {list(a.shape)}")
            for dim, n in zip(t.shape, a.shape):
                if isinstance(dim, int) and dim != n:
                    raise UsageError(f"{spec.name}: input {t.name!r} has shape {list(a.shape)}, "
                                     f"expects {list(t.shape)}")
                if isinstance(dim, str):
                    if sizes.setdefault(dim, n) != n:
                        raise UsageError(f"{spec.name}: inputs disagree on {dim} "
                                         f"({sizes[dim]} vs {n})")
                    lo, hi = spec.ranges.get(dim, (1, None))
                    if n < lo or (hi is not None and n > hi):
                        raise UsageError(f"{spec.name}: {dim} {n} is outside the exported range "
                                         f"{lo}..{hi}; re-export with a wider range")
