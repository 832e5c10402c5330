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
DEFAULT_BUNDLE = "out/demo-bundle"


def _latents(m, k: int, seed: int) -> np.ndarray:
    """Initial latents for ``k`` images at the bundle's default size (``m``: a BundleManifest)."""
    f, d = int(m.vae_scale_factor), m.defaults
    shape = (k, int(m.latent_channels), d.height // f, d.width // f)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def evaluate_bundle(bundle, precision: str = "fp32", n: int = 200, steps: int = 25,
                    guidance: float | None = None, scheduler: str | None = None,
                    seed: int = 0, progress: bool = True, reference: str = "runtime") -> dict:
    """Fidelity on N held-out prompts. ``reference="diffusers"`` samples the same model in
    PyTorch with diffusers instead (same prompts, same initial latents, DDIM)."""
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle, precision=precision)
    g = guidance if guidance is not None else float(pipe.manifest.schema.defaults.guidance_scale)
    torch_pipe = _diffusers_pipe() if reference == "diffusers" else None
    pairs = heldout_prompts(n, seed)
    prompts = [p for p, _ in pairs]
    images = []
    for i in range(0, n, BATCH):
        chunk = prompts[i:i + BATCH]
        lat = _latents(pipe.manifest.schema, len(chunk), seed + i)
        if torch_pipe is None:
            r = pipe(chunk, num_inference_steps=steps, guidance_scale=g,
                     scheduler=scheduler or "ddim", latents=lat)
            images.extend(r.images)
        else:
            images.extend(_torch_images(torch_pipe, chunk, steps, g, lat))
        if progress:
            print(f"\r{min(i + BATCH, n)}/{n} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return score(np.stack(images), [a for _, a in pairs])


def _diffusers_pipe():
    from ldm_edge.export.load import default_source

    from .diffusers_pipe import demo_pipeline

    pipe = demo_pipeline(default_source())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _torch_images(pipe, prompts, steps, guidance, lat):
    import torch

    with torch.inference_mode():
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                   latents=torch.from_numpy(lat), output_type="np").images
    return list((out * 255).round().astype(np.uint8))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", default=DEFAULT_BUNDLE,
                    help="default: the demo model's bundle, (re-)exported when it is missing "
                         "or was made from other weights than demo/weights")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's tuned value")
    ap.add_argument("--scheduler", default=None, help="default: ddim (what diffusers' reference uses)")
    ap.add_argument("--reference", choices=["runtime", "diffusers"], default="runtime",
                    help="diffusers: sample the same model in PyTorch instead, same latents")
    a = ap.parse_args(argv)
    bundle = Path(a.bundle)
    if a.bundle == DEFAULT_BUNDLE or not (bundle / "manifest.json").is_file():
        # after `make train-demo` the default bundle holds the previous weights: re-export
        from .make_demo import ensure_bundle
        from ldm_edge.export.load import default_source

        src = default_source()
        if src is None:
            sys.exit("eval-demo: the demo model's weights are missing; run `make train-demo`")
        ensure_bundle(src, bundle)
    s = evaluate_bundle(bundle, a.precision, a.n, a.steps, a.guidance, a.scheduler,
                        reference=a.reference)
    what = "PyTorch/diffusers" if a.reference == "diffusers" else f"runtime {a.precision}"
    print(f"colour {100 * s['colour']:.1f}%  shape {100 * s['shape']:.1f}%  "
          f"position {100 * s['position']:.1f}%  ({what}, {a.steps} steps)")
    print(f"prompt fidelity: {100 * s['all']:.1f}% ({s['n']} prompts)")


if __name__ == "__main__":
    main()
