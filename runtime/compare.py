"""One comparator for every check: export self-checks, backend tests, calibration gates, parity.

numpy only. A :class:`Comparison` is truthy when it meets its tolerances and prints as
one readable line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Guards the relative error against division by ~0 where the reference crosses zero.
REL_EPS = 1e-6


@dataclass(frozen=True)
class Comparison:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    cosine: float
    atol: float | None = None  # as given
    rtol: float = 0.0  # as given
    # the effective absolute limit max_abs is held to: atol + rtol * max|reference|
    max_abs_limit: float | None = None
    min_cosine: float | None = None
    finite: bool = True

    def __bool__(self) -> bool:
        if not self.finite:
            return False
        if self.max_abs_limit is not None and not self.max_abs <= self.max_abs_limit:
            return False
        if self.min_cosine is not None and not self.cosine >= self.min_cosine:
            return False
        return True

    def __str__(self) -> str:
        verdict = "ok" if self else "FAIL"
        limits = []
        if self.max_abs_limit is not None:
            rel = f" + {self.rtol:.0e} x max|ref|" if self.rtol else ""
            limits.append(f"max-abs <= {self.max_abs_limit:.1e} = atol {self.atol:.1e}{rel}")
        if self.min_cosine is not None:
            limits.append(f"cos>={self.min_cosine}")
        lim = f" ({', '.join(limits)})" if limits else ""
        return (f"{self.name}: max-abs {self.max_abs:.3e}, mean-abs {self.mean_abs:.3e}, "
                f"max-rel {self.max_rel:.3e}, cosine {self.cosine:.7f}{lim} {verdict}")

    def to_json(self) -> dict:
        return {"max_abs": self.max_abs, "mean_abs": self.mean_abs,
                "max_rel": self.max_rel, "cosine": self.cosine}


def summarise(results: list[Comparison], reference: str) -> dict:
    """The worst case of a check over several shapes, as the manifest records it (each
    result named "<component> <shape>", all with the same tolerances)."""
    return {
        "max_abs": max(r.max_abs for r in results),
        "max_rel": max(r.max_rel for r in results),
        "cosine": min(r.cosine for r in results),
        "shapes": [r.name.split(" ", 1)[1] for r in results],
        "tolerance": {"atol": results[0].atol, "rtol": results[0].rtol,
                      "min_cosine": results[0].min_cosine},
        "reference": reference,
        "passed": all(bool(r) for r in results),
    }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def compare(actual: np.ndarray, reference: np.ndarray, name: str = "output", *,
            atol: float | None = None, rtol: float = 0.0,
            min_cosine: float | None = None) -> Comparison:
    """Compare ``actual`` with ``reference``.

    The absolute limit is ``atol + rtol * max|reference|`` so one tolerance serves
    outputs of very different scale (text hidden states vs. images in [-1, 1]).
    """
    actual = np.asarray(actual)
    reference = np.asarray(reference)
    if actual.shape != reference.shape:
        raise ValueError(f"{name}: shape {actual.shape} != reference shape {reference.shape}")
    a = actual.astype(np.float64)
    r = reference.astype(np.float64)
    finite = bool(np.isfinite(a).all())
    diff = np.abs(a - r)
    limit = None if atol is None else atol + rtol * float(np.abs(r).max(initial=0.0))
    return Comparison(
        name=name,
        max_abs=float(diff.max(initial=0.0)) if finite else math.inf,
        mean_abs=float(diff.mean()) if diff.size and finite else (0.0 if finite else math.inf),
        max_rel=float((diff / (np.abs(r) + REL_EPS)).max(initial=0.0)) if finite else math.inf,
        cosine=cosine(a, r) if finite else 0.0,
        atol=atol,
        rtol=rtol,
        max_abs_limit=limit,
        min_cosine=min_cosine,
        finite=finite,
    )


def psnr(image: np.ndarray, reference: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two images of the same shape (8-bit by default); inf when equal."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)
