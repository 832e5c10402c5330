"""FP16 vs FP32 end to end on the tiny unconditional LDM (VQ-f4) model, per seed and step
count: where a VQ decoder meets FP16 rounding (docs/paper-models.md).

    python benchmarks/ldm_fp16_seeds.py [--steps 8 10 25] [--seeds 0 1 2]

Builds the tiny random model (export/tiny.py), exports it and its FP16 variant in a scratch
folder, and prints one PSNR per (steps, seed), ddim, with how far the final latents moved
and how many pixels are off by more than 8 levels (a flipped code: a 4x4 patch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[8, 10, 25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    from ldm_edge.calibration.fp16 import make_fp16
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny import save_tiny_ldm
    from ldm_edge.runtime.compare import psnr
    from ldm_edge.runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as d:
        model = save_tiny_ldm(Path(d) / "model", "ldm-uncond")
        bundle = Path(d) / "bundle"
        export_bundle(load_model(model), bundle, ExportOptions())
        make_fp16(bundle)
        runs = {p: Pipeline(bundle, precision=p) for p in ("fp32", "fp16")}
        latents = {}
        for p, pipe in runs.items():  # the decoder's input, to count flipped codes
            real = pipe.decode
            pipe.decode = lambda lat, real=real, p=p: (latents.__setitem__(p, lat), real(lat))[1]
        for steps in args.steps:
            for seed in args.seeds:
                a, b = (runs[p](num_inference_steps=steps, seed=seed, scheduler="ddim").images
                        for p in ("fp32", "fp16"))
                moved = float(np.abs(latents["fp32"] - latents["fp16"]).max())
                far = int((np.abs(a.astype(int) - b.astype(int)).max(-1) > 8).sum())
                print(f"steps {steps:3d} seed {seed}: PSNR {psnr(a, b):5.1f} dB "
                      f"(final latents max-abs difference {moved:.2e}; {far} pixels off by "
                      f"more than 8 levels)")


if __name__ == "__main__":
    main()
