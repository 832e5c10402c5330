"""Whether onnxruntime pre-packs a graph's weights when it opens the session.

At session open onnxruntime copies each constant MatMul/Gemm weight into its kernels' own
layout ("pre-packing"). An integer graph needs that: its int8 kernels run much slower
without it. A float graph gains little per call, and on a large graph the packing is most of
what a start from the graph cache costs. So a float graph that a process will call only a
few times opens without it (``session.disable_prepacking``); an INT8 graph, and any graph of
a process that does not say how often it will call it (a server, a notebook's Pipeline), is
pre-packed as before. ``python benchmarks/bench_prepack.py BUNDLE`` measures both sides of
the trade on a bundle's graphs.

``LDM_EDGE_ORT_PREPACK``: ``1`` pre-packs every graph, ``0`` none, ``auto`` (the default)
decides as above.
"""

from __future__ import annotations

import os

from ..errors import UsageError

ENV = "LDM_EDGE_ORT_PREPACK"
# A float graph is pre-packed when the process will call it at least this many times. The
# packing is paid once at open and saves a little on every call (2 threads, AMD EPYC,
# `benchmarks/bench_prepack.py`, docs/run.md): SD1.5's FP32 U-Net at 512² 0.68 s at open
# (2.7 s when its weights are not yet in the page cache) against 0.033 s (1.6 %) a call, so it
# pays after 21 calls; the text encoders (CLIP ViT-L, OpenCLIP ViT-H) after 24-25; the VAE
# decoder never.
MIN_CALLS = 20
# Always pre-packed: without it the INT8 U-Net's integer kernels run 1.6x slower a call
# (0.99 -> 1.60 s on SD1.5 at 512², the same machine: more than the 0.76 s the packing takes)
# and compute other numbers (max-abs 5e-2 on its output), not those its quality check measured.
ALWAYS = ("int8",)


def prepack_wanted(precision: str, calls: int | None) -> bool:
    """True: open with pre-packing. ``calls``: how many times this process will call the
    graph (None: not known, so pre-pack)."""
    forced = os.environ.get(ENV, "auto").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced != "auto":
        raise UsageError(f"{ENV}={forced!r}: use 1 (always pre-pack), 0 (never) or auto")
    return precision in ALWAYS or calls is None or calls >= MIN_CALLS
