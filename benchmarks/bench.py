"""Side-by-side benchmark: ldm-edge's runtime vs diffusers (PyTorch eager), same run.

    python benchmarks/bench.py [--quick] [--models demo,sd15-256,sd15-512] [--repeats 3]

Every candidate runs in a fresh process (cold start and peak RSS are its own), the
candidates interleaved, repeated; medians are reported with ratios against diffusers.
SD1.5-architecture models have seeded random weights and are built here (nothing is
downloaded). Writes out/bench/results.json, results.md and chart.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = Path("out/bench")
METRICS = ("e2e_s", "text_encoder_s", "unet_step_s", "vae_decoder_s", "overhead_per_step_s",
           "cold_start_first_unet_s", "cold_start_png_s", "peak_rss_mb")


def candidates(model: dict) -> list[tuple[str, list[str]]]:
    c = [("diffusers-eager", ["--kind", "diffusers", "--model-dir", str(model["dir"])]),
         ("ldm-edge-ort-fp32", ["--kind", "ours", "--bundle", str(model["bundle"])]),
         # onnxruntime's optimised graphs from the disk cache (ldm-run --ort-cache); the
         # uncounted first round fills the cache, so the counted rounds measure a hit
         ("ldm-edge-ort-fp32-cached", ["--kind", "ours", "--bundle", str(model["bundle"]),
                                       "--ort-cache"])]
    import importlib.util

    if importlib.util.find_spec("openvino") is not None:
        c.append(("ldm-edge-openvino-fp32", ["--kind", "ours", "--bundle", str(model["bundle"]),
                                             "--backend", "openvino"]))
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    have = read_manifest_json(model["bundle"]).precisions("unet")
    for prec in ("fp16", "int8"):
        if prec in have:
            c.append((f"ldm-edge-ort-{prec}", ["--kind", "ours", "--bundle", str(model["bundle"]),
                                               "--precision", prec]))
        else:
            print(f"  {model['name']}: no ldm-edge-ort-{prec} candidate: the bundle has no "
                  f"{prec} U-Net (ldm-export {prec} {model['bundle']})", flush=True)
    return c


# What the benchmark's own INT8 variant is calibrated on when the bundle has none: the
# docs/benchmarks.md's SD1.5 figures use these; one scheduler checked (DDIM, what the benchmark runs)
# keeps `make bench QUICK=1` within its budget.
INT8_ARGS = ["--num-prompts", "4", "--calib-steps", "8", "--schedulers", "ddim"]


def ensure_int8(model: dict) -> None:
    """Make the bundle's INT8 U-Net with ``ldm-export int8`` when it has none."""
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    if "int8" in read_manifest_json(model["bundle"]).precisions("unet"):
        return
    cmd = [sys.executable, "-m", "ldm_edge.export.cli", "int8", str(model["bundle"]), *INT8_ARGS]
    print(f"  {model['name']}: making its INT8 U-Net: ldm-export int8 {model['bundle']} "
          f"{' '.join(INT8_ARGS)}", flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        print(f"  {model['name']}: no INT8 candidate: ldm-export int8 failed: "
              f"{(r.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
        return
    print(f"  {model['name']}: INT8 U-Net made in {time.time() - t0:.0f} s; "
          + " / ".join(ln for ln in r.stdout.splitlines() if ln.startswith("int8 end to end")),
          flush=True)


def run_once(name, args, model, a, rep) -> dict:
    out = OUT / f"{model['name']}-{name}-{rep}.json"
    png = OUT / f"{model['name']}-{name}.png"
    cmd = [sys.executable, str(HERE / "run_one.py"), *args, "--size", str(model["size"]),
           "--steps", str(a.steps), "--threads", str(a.threads), "--latents", str(model["latents"]),
           "--png", str(png), "--out", str(out), "--t-spawn", str(time.time())]
    # our own cache folder: the user's is left alone, and a rerun starts from the same state
    # the graph cache only where a candidate says --ort-cache (it is on for users)
    env = {**os.environ, "LDM_EDGE_CACHE": str(OUT / "cache"), "LDM_EDGE_ORT_CACHE": "0"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{name} failed on {model['name']}:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def measure(model: dict, a) -> dict:
    cands = candidates(model)
    runs = {n: [] for n, _ in cands}
    # the first round warms the page cache (and fills the graph cache); not counted
    for rep in range(a.repeats + 1):
        for name, args in cands:
            res = run_once(name, args, model, a, rep)
            if rep:
                runs[name].append(res)
            print(f"  {model['name']} {name} round {rep}: e2e {res['e2e_s']:.2f}s", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) if rs[0].get(k) is not None else None
               for k in METRICS} for n, rs in runs.items()}
    return {"model": model["name"], "size": model["size"], "steps": a.steps, "threads": a.threads,
            "repeats": a.repeats, "medians": med, "quality": image_parity(model, cands),
            "unet_gflop_per_call": model.get("unet_gflop"), "matmul_peak_gflops": a.peak}


def image_parity(model, cands) -> dict:
    from PIL import Image

    from ldm_edge.runtime.compare import psnr

    ref = np.asarray(Image.open(OUT / f"{model['name']}-diffusers-eager.png"))
    return {n: psnr(np.asarray(Image.open(OUT / f"{model['name']}-{n}.png")), ref)
            for n, _ in cands if n != "diffusers-eager"}


def matmul_peak_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """FP32 matrix-multiply peak of this machine with ``threads`` threads (torch)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.randn(n, n)
    torch.mm(x, x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(x, x)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="demo + sd15 at 256², 4 steps, 2 repeats")
    ap.add_argument("--models", default=None, help="comma list of demo, sd15-256, sd15-512")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-int8", action="store_true",
                    help="do not make an INT8 U-Net for a bundle that has none")
    ap.add_argument("--no-lora", action="store_true",
                    help="skip the LoRA cost benchmark (bench_lora.py) on the first SD1.5 model")
    ap.add_argument("--few-step", action="store_true",
                    help="then time to a 512² picture with few-step models (bench_few_step.py: "
                         "LCM SD1.5 and SD-Turbo-shaped SD2.1, full VAE and TAESD, FP32 and "
                         "INT8; ~40 min from nothing, so not by default)")
    a = ap.parse_args(argv)
    a.models = (a.models or ("demo,sd15-256" if a.quick else "demo,sd15-256,sd15-512")).split(",")
    a.steps = a.steps or (4 if a.quick else 10)
    a.repeats = a.repeats or (2 if a.quick else 3)
    OUT.mkdir(parents=True, exist_ok=True)
    from bench_models import prepare

    t0 = time.time()
    a.peak = matmul_peak_gflops(a.threads)
    results, lora_done = [], False
    for name in a.models:
        model = prepare(name, OUT)
        if model is None:
            print(f"skipping {name}: not available", flush=True)
            continue
        if not a.no_int8:
            ensure_int8(model)
        results.append(measure(model, a))
        if name.startswith("sd15-") and not a.no_lora and not lora_done:
            from bench_lora import measure as measure_lora

            results[-1]["lora"] = measure_lora(model["dir"], model["bundle"], size=model["size"],
                                               threads=a.threads, repeats=a.repeats,
                                               out=OUT / "lora", name=name)
            lora_done = True
    from bench_report import write_reports

    write_reports(results, OUT, command=" ".join(["python benchmarks/bench.py", *(argv or sys.argv[1:])]),
                  wall_s=time.time() - t0)
    if a.few_step:  # its own report: out/bench/few-step/results.md
        from bench_few_step import main as few_step

        few_step(["--threads", str(a.threads), "--repeats", str(a.repeats)])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
