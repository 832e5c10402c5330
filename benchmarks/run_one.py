"""One measured generation in a fresh process (so cold start and peak RSS are its own).

    python benchmarks/run_one.py --kind ours|diffusers ... --out result.json

Called by bench.py; prints nothing on success, writes a JSON of timings.
"""

from __future__ import annotations

import argparse
import json
import time

T_MAIN = time.time()


class StageTimer:
    """Wraps callables, adds their wall time per stage, notes the first call."""

    def __init__(self):
        self.total = {}
        self.calls = {}
        self.first = {}
        self.each = {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            self.first.setdefault(name, time.time())
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                self.total[name] = self.total.get(name, 0.0) + dt
                self.calls[name] = self.calls.get(name, 0) + 1
                self.each.setdefault(name, []).append(dt)
        return timed


def run_ours(a, timer: StageTimer) -> dict:
    import numpy as np

    from ldm_edge.runtime.image import save_png
    from ldm_edge.runtime.pipeline import Pipeline

    # one_shot: one picture and the process ends, as ldm-run opens its pipeline
    pipe = Pipeline(a.bundle, precision=a.precision, threads=a.threads, verify=False,
                    backend=a.backend, device="cpu", ort_cache=a.ort_cache, one_shot=True)
    first_unet = {}

    def first_unet_call(call):
        if call.name == "unet" and "t" not in first_unet:
            # when the first U-Net call started: the U-Net's session was open by then
            first_unet["t"] = time.time() - call.seconds
    pipe.add_call_hook(first_unet_call)
    request = pipe.request(prompt=a.prompt, num_inference_steps=a.steps, guidance_scale=a.guidance,
                           scheduler="ddim", height=a.size, width=a.size,
                           latents=np.load(a.latents))
    pipe.expect(request)
    for name in ("text_encoder", "unet", "vae_decoder"):
        pipe.backend(name)  # open every session first, as diffusers loads every model first
    t0 = time.perf_counter()
    r = pipe(request=request)
    e2e = time.perf_counter() - t0
    save_png(r.images[0], a.png, {"bench": True})
    t = r.timings
    engine_time = sum(t.unet_per_step)
    return {"e2e_s": e2e, "text_encoder_s": t.text_encoder, "unet_s": engine_time,
            "unet_step_s": t.unet_step_median, "vae_decoder_s": t.vae_decoder,
            "overhead_per_step_s": (t.denoise_loop - engine_time) / max(1, len(t.unet_per_step)),
            "t_first_unet": first_unet.get("t"), "t_png": time.time()}


def run_diffusers(a, timer: StageTimer) -> dict:
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    torch.set_num_threads(a.threads)
    pipe = StableDiffusionPipeline.from_pretrained(a.model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.forward = timer.wrap("text_encoder", pipe.text_encoder.forward)
    pipe.unet.forward = timer.wrap("unet", pipe.unet.forward)
    pipe.vae.decode = timer.wrap("vae_decoder", pipe.vae.decode)
    latents = torch.from_numpy(np.load(a.latents))
    t0 = time.perf_counter()
    with torch.inference_mode():
        img = pipe(a.prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, height=a.size,
                   width=a.size, latents=latents, output_type="np").images
    e2e = time.perf_counter() - t0
    Image.fromarray((img[0] * 255).round().astype("uint8")).save(a.png)
    return {"e2e_s": e2e, "text_encoder_s": timer.total.get("text_encoder", 0.0),
            "unet_s": timer.total.get("unet", 0.0),
            "unet_step_s": sorted(timer.each["unet"])[len(timer.each["unet"]) // 2],
            "vae_decoder_s": timer.total.get("vae_decoder", 0.0), "overhead_per_step_s": None,
            "t_first_unet": timer.first.get("unet"), "t_png": time.time()}


def peak_rss_mb() -> float:
    """This process's high-water RSS. (getrusage's ru_maxrss survives exec on Linux and
    would report the parent's peak; VmHWM belongs to this process image alone.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["ours", "diffusers"], required=True)
    ap.add_argument("--bundle")
    ap.add_argument("--model-dir")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--ort-cache", action="store_true", help="onnxruntime graphs from the disk cache")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="a red circle in the top left on a white background")
    ap.add_argument("--latents", required=True)
    ap.add_argument("--t-spawn", type=float, required=True)
    ap.add_argument("--png", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    timer = StageTimer()
    res = (run_ours if a.kind == "ours" else run_diffusers)(a, timer)
    res["cold_start_first_unet_s"] = res.pop("t_first_unet") - a.t_spawn
    res["cold_start_png_s"] = res.pop("t_png") - a.t_spawn
    res["import_and_load_s"] = T_MAIN - a.t_spawn
    res["peak_rss_mb"] = peak_rss_mb()
    with open(a.out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
