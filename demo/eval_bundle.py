"""``make eval-demo``: prompt fidelity of the exported demo bundle through the lean runtime.

Generates N held-out prompts (combinations never seen in training) with the runtime's
pipeline and reads each image back with the deterministic evaluator. The last line is
``prompt fidelity: NN.N% (N prompts)``; the line before gives colour / shape / position.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .dataset import heldout_prompts
from .evaluate import score

BATCH = 4  # images per call; the demo bundle is exported for --max-batch 4


def evaluate_bundle(bundle, precision: str = "fp32", n: int = 200, steps: int = 25,
                    guidance: float | None = None, scheduler: str | None = None,
                    seed: int = 0, progress: bool = True) -> dict:
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle, precision=precision)
    pairs = heldout_prompts(n, seed)
    prompts = [p for p, _ in pairs]
    images = []
    for i in range(0, n, BATCH):
        chunk = prompts[i:i + BATCH]
        r = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                 seed=seed + i)
        images.extend(r.images)
        if progress:
            print(f"\r{min(i + BATCH, n)}/{n} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return score(np.stack(images), [a for _, a in pairs])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", default="out/demo-bundle")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's tuned value")
    ap.add_argument("--scheduler", default=None)
    a = ap.parse_args(argv)
    bundle = Path(a.bundle)
    if not (bundle / "manifest.json").is_file():
        from .make_demo import ensure_bundle
        from ldm_edge.export.load import default_source

        src = default_source()
        if src is None:
            sys.exit("eval-demo: the demo model's weights are missing; run `make train-demo`")
        ensure_bundle(src, bundle)
    s = evaluate_bundle(bundle, a.precision, a.n, a.steps, a.guidance, a.scheduler)
    print(f"colour {100 * s['colour']:.1f}%  shape {100 * s['shape']:.1f}%  "
          f"position {100 * s['position']:.1f}%  ({a.precision}, {a.steps} steps)")
    print(f"prompt fidelity: {100 * s['all']:.1f}% ({s['n']} prompts)")


if __name__ == "__main__":
    main()
