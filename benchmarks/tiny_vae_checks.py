"""Three checks of a bundle's tiny VAE (TAESD), as docs/benchmarks.md and docs/precision.md quote them.

    python benchmarks/tiny_vae_checks.py amplification BUNDLE [--latents NPY] [--steps 1]
    python benchmarks/tiny_vae_checks.py decoder-time BUNDLE [--pictures 3] [--steps 4]
    python benchmarks/tiny_vae_checks.py int8-picture BUNDLE [--steps 10]

``amplification``: the FP32 and the INT8 U-Net's final latents (same prompt, latents, steps;
``decode=False``), each decoded by the full and by the tiny decoder: how far apart the
latents are, and each decoder's outputs (8-bit picture PSNR, raw-output PSNR over its range,
the share of the raw output outside [-1, 1]). ``decoder-time``: per precision, a process of
its own drawing ``--pictures`` 512² pictures with ``--vae tiny``: the tiny decoder's seconds
each (the first is the session's first call). ``int8-picture``: FP32 and INT8 pipelines, each
with the full and the tiny VAE: the INT8 pictures' PSNR against FP32's.
Every pipeline here: onnxruntime, 2 threads, the graph cache off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

os.environ["LDM_EDGE_ORT_CACHE"] = "0"
PROMPT = "a red circle in the top left on a white background"


def _pipe(bundle, precision, vae=None, threads=2):
    from ldm_edge.runtime.pipeline import Pipeline

    return Pipeline(bundle, precision=precision, vae=vae, threads=threads)


def amplification(a) -> None:
    from ldm_edge.calibration.int8_tiny_vae import raw_psnr
    from ldm_edge.runtime.compare import psnr

    lat0 = np.load(a.latents) if a.latents else None
    lat = {p: _pipe(a.bundle, p)(PROMPT, num_inference_steps=a.steps, latents=lat0, seed=0,
                                 decode=False).latents for p in ("fp32", "int8")}
    d = lat["int8"] - lat["fp32"]
    print(f"INT8 vs FP32 latents: relative error {np.linalg.norm(d) / np.linalg.norm(lat['fp32']):.4f}")
    pipe = _pipe(a.bundle, "fp32")
    for comp, tiny in (("vae_decoder", False), ("vae_decoder_tiny", True)):
        scale, shift = pipe.manifest.schema.vae_scaling(tiny)
        out = {p: pipe.call_component(comp, {"latent": (x / scale + (shift or 0.0)).astype(np.float32)})
               for p, x in lat.items()}
        q, ref = out["int8"], out["fp32"]

        def px(x):
            return (np.clip(x / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
        print(f"{comp}: 8-bit picture {psnr(px(q), px(ref)):.1f} dB, raw output {raw_psnr(q, ref):.1f} dB "
              f"over its range (relative error {np.linalg.norm(q - ref) / np.linalg.norm(ref):.4f}); "
              f"mean |output| {np.abs(ref).mean():.2f}, {np.mean(np.abs(ref) > 1):.1%} outside [-1, 1]")


def decoder_time(a) -> None:
    if a.child:
        pipe = _pipe(a.bundle, a.child, vae="tiny")
        for i in range(a.pictures):
            r = pipe(PROMPT, num_inference_steps=a.steps, seed=i, height=512, width=512)
            print(f"{a.child} U-Net, picture {i}: tiny decoder {r.timings.vae_decoder:.3f} s")
        return
    for precision in ("fp32", "int8"):
        subprocess.run([sys.executable, __file__, "decoder-time", a.bundle, "--child", precision,
                        "--pictures", str(a.pictures), "--steps", str(a.steps)], check=True)


def int8_picture(a) -> None:
    from ldm_edge.runtime.compare import psnr

    for vae in ("full", "tiny"):
        pics = {p: _pipe(a.bundle, p, vae=vae)(PROMPT, num_inference_steps=a.steps, seed=0).images[0]
                for p in ("fp32", "int8")}
        print(f"--vae {vae}: INT8 picture vs FP32 {psnr(pics['int8'], pics['fp32']):.1f} dB "
              f"({a.steps} steps)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("check", choices=("amplification", "decoder-time", "int8-picture"))
    ap.add_argument("bundle")
    ap.add_argument("--latents", help="amplification: initial latents (.npy)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--pictures", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.steps = a.steps or {"amplification": 1, "decoder-time": 4, "int8-picture": 10}[a.check]
    {"amplification": amplification, "decoder-time": decoder_time,
     "int8-picture": int8_picture}[a.check](a)


if __name__ == "__main__":
    main()
