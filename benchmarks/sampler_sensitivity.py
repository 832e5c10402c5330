"""How far does each sampler carry a small error of the U-Net? FP32 only: every U-Net
output gets seeded Gaussian noise of a given size relative to its norm (a per-call cosine
of 1/sqrt(1 + rel²), the measure `ldm-export int8` records for INT8), and the picture and
final latents are compared with the same run without it.

    python benchmarks/sampler_sensitivity.py BUNDLE [--size 256] [--steps 8] \\
        [--schedulers ddim,pndm] [--rel 0.045,0.01,0.001] [--threads 2]

A sampler/model pair that turns a per-call error far smaller than INT8's into a different
picture cannot be held to a PSNR bar by any INT8 graph; the per-call cosine is the measure
that says what the INT8 U-Net itself does there.
"""

from __future__ import annotations

import argparse

import numpy as np

PROMPT = "a cat sleeping on a windowsill in the sun"


def main(argv=None) -> None:
    from ldm_edge.runtime.compare import psnr
    from ldm_edge.runtime.pipeline import Pipeline

    class Perturb:
        """A call hook adding noise of relative size ``rel`` to each U-Net output."""
        rel = 0.0

        def __call__(self, call):
            out = call.output
            if call.name != "unet" or not self.rel:
                return None
            t = float(np.ravel(call.feeds.get("timestep", [0]))[0])
            noise = np.random.default_rng(int(t) + 7).standard_normal(out.shape).astype(out.dtype)
            return out + noise * (self.rel * np.linalg.norm(out) / np.linalg.norm(noise))

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedulers", default="ddim,pndm")
    ap.add_argument("--rel", default="0.045,0.01,0.001",
                    help="noise sizes relative to the U-Net output's norm, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    pipe, perturb = Pipeline(a.bundle, threads=a.threads), Perturb()
    pipe.add_call_hook(perturb)
    run = dict(num_inference_steps=a.steps, seed=a.seed, height=a.size, width=a.size)
    print(f"{'scheduler':<10} {'noise (rel)':>11} {'cosine':>9} {'PSNR':>8} {'final latents off':>18}")
    for sched in a.schedulers.split(","):
        perturb.rel = 0.0
        base = pipe(PROMPT, scheduler=sched, **run)
        for rel in (float(x) for x in a.rel.split(",")):
            perturb.rel = rel
            r = pipe(PROMPT, scheduler=sched, **run)
            off = np.linalg.norm(r.latents - base.latents) / np.linalg.norm(base.latents)
            print(f"{sched:<10} {rel:11.4f} {1 / np.sqrt(1 + rel * rel):9.6f} "
                  f"{psnr(r.images, base.images):6.2f} dB {100 * off:16.1f} %", flush=True)


if __name__ == "__main__":
    main()
