"""Soak: many images in one process; RSS and open file descriptors must not grow.

    python benchmarks/soak.py BUNDLE [--images 500] [--steps 1]

Prints RSS after warm-up and at the end, the growth in percent, and the fd counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

WARMUP_IMAGES = 50  # arenas and caches settle during these; growth is measured after


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def soak(bundle, images: int = 500, steps: int = 1, out_dir: Path | None = None) -> dict:
    import numpy as np

    from ldm_edge.runtime.image import save_png
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle)
    warm = None
    for i in range(images):
        r = pipe(f"a red cat number {i}", num_inference_steps=steps, seed=i)
        if out_dir is not None:
            save_png(r.images[0], Path(out_dir) / "soak.png", {"i": i})
        assert r.images.dtype == np.uint8
        if i + 1 == WARMUP_IMAGES:
            warm = (rss_bytes(), open_fds())
    end = (rss_bytes(), open_fds())
    return {"images": images, "steps": steps, "rss_after_warmup_mb": warm[0] / 1e6,
            "rss_end_mb": end[0] / 1e6, "rss_growth_pct": 100.0 * (end[0] - warm[0]) / warm[0],
            "fds_after_warmup": warm[1], "fds_end": end[1]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--steps", type=int, default=1)
    a = ap.parse_args(argv)
    if a.images <= WARMUP_IMAGES:
        sys.exit(f"--images must exceed the {WARMUP_IMAGES} warm-up images")
    print(json.dumps(soak(a.bundle, a.images, a.steps), indent=2))


if __name__ == "__main__":
    main()
