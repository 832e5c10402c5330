"""Would an INT8 VAE decoder pay? Quantise a bundle's VAE decoder with the U-Net's Q/DQ
machinery (calibration/qdq.py, percentile ranges, 7-bit weights) and measure its decode
against FP32: the 8-bit PSNR of the decoded pictures on held-out latents, and the time per
call, interleaved in one process (medians).

    python benchmarks/bench_vae_int8.py BUNDLE [--calib-size 256] [--size 512] \\
        [--prompts 4] [--repeats 4] [--threads 2] [--component vae_decoder_tiny]

Calibration inputs are the latents the bundle's own FP32 sampling ends with (6 steps, each
prompt on the next of ddim, euler, dpm++2m, pndm), as ``ldm-export int8`` captures the
U-Net's; the held-out latents are two other prompts and seeds at ``--size``. Nothing is
written to the bundle (the graph goes to a temporary folder). ``--component
vae_decoder_tiny``: the bundle's TAESD decoder instead, fed the same latents rescaled to its
own scaling (as ``ldm-export fp16`` feeds it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

CALIB_PROMPTS = ["a red circle in the top left on a white background",
                 "blue square, bottom right, gray background",
                 "a yellow triangle in the center on a black background",
                 "green circle, top right, white background",
                 "a cat on a sofa", "a mountain lake at dawn",
                 "red square, center, white background", "blue circle, bottom left"]
HELD_OUT = ["a green triangle, top left", "a dog in the snow"]
SCHEDULERS = ["ddim", "euler", "dpm++2m", "pndm"]
STEPS = 6


def final_latents(bundle, vae, prompts, size, seed, threads, rescale: float = 1.0):
    """The VAE decoder's input of each prompt's FP32 run, times ``rescale``, named as the
    graph names it."""
    from ldm_edge.calibration.capture import capture_runs

    runs = capture_runs(bundle, prompts, steps=STEPS, height=size, width=size, seed=seed,
                        schedulers=SCHEDULERS, threads=threads)
    return [{vae.graph_name(k): (v * rescale).astype(np.float32) for k, v in call.items()}
            for run in runs for call in run["vae_decoder"]]


def tiny_rescale(m) -> float:
    """Full-VAE decoder input -> TAESD decoder input (both see the same scaled latents)."""
    s_full, shift = m.schema.vae_scaling(False)
    if shift:
        raise SystemExit("a VAE with a shift factor (SD3/Flux) has no TAESD here")
    return s_full / m.schema.vae_scaling(True)[0]


def to_pixels(x: np.ndarray) -> np.ndarray:
    return (np.clip(x / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)


def main(argv=None) -> None:
    import onnx

    from ldm_edge.bundletools.save import save_graph
    from ldm_edge.calibration import qdq
    from ldm_edge.calibration.int8 import build_graph
    from ldm_edge.calibration.int8_tiny_vae import raw_psnr
    from ldm_edge.calibration.ranges import collect
    from ldm_edge.runtime.bundle.opener import open_bundle
    from ldm_edge.runtime.compare import psnr
    from ldm_edge.runtime.backends.sessions import SessionFromOnnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--calib-size", type=int, default=256, help="image side of the calibration runs")
    ap.add_argument("--size", type=int, default=512, help="image side of the held-out decodes")
    ap.add_argument("--prompts", type=int, default=4, help="calibration prompts (up to 8)")
    ap.add_argument("--repeats", type=int, default=4, help="timed calls per graph")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--component", choices=("vae_decoder", "vae_decoder_tiny"),
                    default="vae_decoder", help="the full VAE's decoder or TAESD's")
    a = ap.parse_args(argv)

    m = open_bundle(a.bundle, verify=False)
    vae = m.component(a.component)
    fp32 = m.variant(a.component, "fp32").path
    rescale = tiny_rescale(m) if a.component == "vae_decoder_tiny" else 1.0
    t0 = time.perf_counter()
    calib = final_latents(a.bundle, vae, CALIB_PROMPTS[:a.prompts], a.calib_size, 0, a.threads,
                          rescale)
    proto = onnx.load(str(fp32), load_external_data=False)
    layers, excluded = qdq.analyse(proto.graph)
    tensors = list(dict.fromkeys([ly.act for ly in layers] + [ly.out for ly in layers if ly.out]))
    hists = collect(fp32, tensors, calib, threads=a.threads)
    ranges = {t: hists[t].range("percentile") for t in tensors}
    print(f"calibrated on {len(calib)} decodes at {a.calib_size}² in "
          f"{time.perf_counter() - t0:.0f} s; {len(layers)} layers to INT8, kept float: "
          + ", ".join(f"{k} {len(v)}" for k, v in excluded.items()), flush=True)
    graph = build_graph(proto, fp32.parent, layers, ranges, {ly.unit for ly in layers}, 7)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{a.component}.int8.onnx"
        save_graph(graph, path)
        del graph, proto
        held = final_latents(a.bundle, vae, HELD_OUT, a.size, 100, a.threads, rescale)
        sessions = {"fp32": SessionFromOnnx(fp32, threads=a.threads)(),
                    "int8": SessionFromOnnx(path, threads=a.threads)()}
        out = {k: [s.run(None, f)[0] for f in held] for k, s in sessions.items()}
        for i, prompt in enumerate(HELD_OUT):
            q, ref = out["int8"][i], out["fp32"][i]
            # the raw outputs too: a random-weight decoder's lie far outside [-1, 1], where
            # the 8-bit picture is clipped to 0/255 and any sign change costs a whole level
            raw = raw_psnr(q, ref)
            print(f"{a.size}² decode of {prompt!r}: INT8 vs FP32 "
                  f"{psnr(to_pixels(q), to_pixels(ref)):.2f} dB (8-bit picture), {raw:.1f} dB "
                  f"(raw output over its range; {np.mean(np.abs(ref) > 1):.0%} of it outside [-1, 1])")
        times = {k: [] for k in sessions}
        for r in range(a.repeats):
            for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
                t = time.perf_counter()
                sessions[k].run(None, held[0])
                times[k].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"time per decode at {a.size}², median of {a.repeats}: FP32 {med['fp32']:.3f} s, "
          f"INT8 {med['int8']:.3f} s ({med['fp32'] / med['int8']:.2f}x)")


if __name__ == "__main__":
    main()
