"""Time to a 512² picture with few-step models: ldm-edge's runtime vs diffusers, same run.

    python benchmarks/bench_few_step.py [--models lcm-sd15,turbo-sd21] [--repeats 2]
    python benchmarks/bench_few_step.py --dry-run          # the plan only: builds nothing
    python benchmarks/bench.py --few-step ...              # after bench.py's own models

Two models with seeded random weights and their published shapes, built here (nothing is
downloaded): the SD1.5 architecture with an LCM-style U-Net (``time_cond_proj_dim`` 256, the
LCM scheduler; a ``LatentConsistencyModelPipeline`` folder) at 4 steps, guidance 8.5 (inside
the U-Net: one call a step), and the SD2.1-base architecture with SD-Turbo's sampler (Euler on
``trailing`` timesteps, epsilon) at 1 step, guidance 0; and a TAESD (diffusers'
``AutoencoderTiny`` at its defaults, which are TAESD's). Each is exported with ``ldm-export
onnx SRC --tiny-vae TAESD`` and given an INT8 U-Net by ``ldm-export int8``.

Candidates, per model: diffusers (PyTorch eager) and ldm-edge (onnxruntime FP32 and INT8 U-Net),
each with the full VAE decoder and with TAESD. Every generation runs in a fresh process (peak
RSS is its own), the candidates interleaved, a warm-up round then N counted rounds; medians.
Reported: end to end (the pipeline call, models loaded), U-Net per step, VAE decoder, text
encoder, peak RSS, and the ratio diffusers / ours (RSS: ours / diffusers). Writes
out/bench/few-step/results.json and results.md.
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

HERE = Path(__file__).parent
OUT = Path("out/bench/few-step")
PROMPT = "a cinematic photo of a fox in the snow"
SEED = 0  # the random weights and the initial latents

# -- the models ---------------------------------------------------------------------------
# LCM-Dreamshaper's guidance embedding width (its U-Net config's time_cond_proj_dim)
LCM_TIME_COND_DIM = 256
# LatentConsistencyModelPipeline's defaults: 4 steps, guidance 8.5 (w, embedded in the U-Net)
LCM_STEPS, LCM_GUIDANCE = 4, 8.5
# SD-Turbo's makers' recommendation: one step, no classifier-free guidance
TURBO_STEPS, TURBO_GUIDANCE = 1, 0.0
SIZE = 512  # both models' native size

# Export range of the benchmark bundles: 256 so INT8 can calibrate at 256² (CALIB_SIZE), 512
# the size measured; as bench_models.py exports SD1.5. ldm-export's default 32-1024 would
# only make the export check sizes this benchmark never runs.
EXPORT_MIN, EXPORT_MAX = 256, 512
EXPORT_MAX_BATCH = 1  # one picture a request; neither model runs a guidance batch
# INT8 calibration kept small: this is a timing benchmark; ldm-export records the INT8 quality
# it measures (PSNR vs FP32) in the manifest, and results.md repeats it. Calibrated at 256²
# (SD1.5-size calibration at 512² took ~8 min on one core) under the model's own sampler only.
CALIB_PROMPTS, CALIB_STEPS, CALIB_SIZE = 2, 4, 256

MODELS = {
    # scheduler: the model's own sampler in ldm-run's names (INT8 calibrates under it)
    "lcm-sd15": {"kind": "lcm", "steps": LCM_STEPS, "guidance": LCM_GUIDANCE, "size": SIZE,
                 "scheduler": "lcm", "export_args": []},
    "turbo-sd21": {"kind": "turbo", "steps": TURBO_STEPS, "guidance": TURBO_GUIDANCE,
                   "size": SIZE, "scheduler": "euler",
                   "export_args": ["--default-steps", str(TURBO_STEPS),
                                   "--default-guidance-scale", str(TURBO_GUIDANCE)]},
}
# The tiny versions (export/tiny.py): the same code paths in seconds, for tests/cli/.
TINY_SIZE = 128  # export/tiny.py's sample_size 16 latents
TINY_EXPORT = (64, 128)
TINY_CALIB_SIZE = 64
MODELS.update({
    "tiny-lcm": {**MODELS["lcm-sd15"], "size": TINY_SIZE, "tiny": True},
    "tiny-turbo": {**MODELS["turbo-sd21"], "size": TINY_SIZE, "tiny": True},
})
DEFAULT_MODELS = "lcm-sd15,turbo-sd21"
VAES = ("full", "tiny")
PRECISIONS = ("fp32", "int8")


def sd_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                         sample_size=SIZE, scaling_factor=0.18215)


def lcm_sd15_pipeline():
    """SD1.5's architecture, its U-Net given LCM's guidance embedding; random weights."""
    import torch
    from diffusers import (
        LatentConsistencyModelPipeline,
        LCMScheduler,
        UNet2DConditionModel,
    )
    from bench_models import CLIP_L14, clip_text_model
    from ldm_edge.export.tiny import tiny_clip_tokenizer

    torch.manual_seed(SEED + 1)
    tok = tiny_clip_tokenizer()
    te = clip_text_model(tok, CLIP_L14)  # as bench_models.sd15_pipeline builds it
    unet = UNet2DConditionModel(sample_size=SIZE // 8, cross_attention_dim=768,
                                time_cond_proj_dim=LCM_TIME_COND_DIM)
    # LCM-Dreamshaper's scheduler config
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=1,
                         original_inference_steps=50, timestep_scaling=10.0,
                         prediction_type="epsilon", clip_sample=False)
    return LatentConsistencyModelPipeline(vae=sd_vae(), text_encoder=te, tokenizer=tok,
                                          unet=unet, scheduler=sched,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)


def turbo_sd21_pipeline():
    """SD2.1-base's architecture (OpenCLIP ViT-H text encoder, linear-projection attention
    with per-block head dims, cross-attention 1024), epsilon, with SD-Turbo's sampler."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from bench_models import OPENCLIP_H14, clip_text_model
    from ldm_edge.export.tiny import tiny_clip_tokenizer

    torch.manual_seed(SEED + 2)
    tok = tiny_clip_tokenizer(pad_token="!")  # SD2's tokenizer pads with "!"
    te = clip_text_model(tok, OPENCLIP_H14)
    unet = UNet2DConditionModel(sample_size=SIZE // 8, cross_attention_dim=1024,
                                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", num_train_timesteps=1000,
                                   prediction_type="epsilon", timestep_spacing="trailing",
                                   steps_offset=1)
    return StableDiffusionPipeline(vae=sd_vae(), text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def taesd():
    """AutoencoderTiny at diffusers' defaults (TAESD's published config), random weights.
    He-normal convolutions: at PyTorch's default init it decodes every latent to about -1
    (a black picture), an unrepresentative decoder to time (export/tiny.py says more)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(SEED + 3)
    vae = AutoencoderTiny()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return vae.eval()


def run(cmd: list[str], what: str) -> str:
    print(f"  {what}: {' '.join(str(c) for c in cmd[2:])}", flush=True)
    t0 = time.time()
    r = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{what} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    print(f"  {what}: done in {time.time() - t0:.0f} s", flush=True)
    return r.stdout


def prepare(name: str, out: Path, int8: bool) -> dict:
    """Build the diffusers folders and the bundle (cached under ``out``); returns the plan."""
    spec = MODELS[name]
    tiny = spec.get("tiny", False)
    folder, bundle, tae = paths(name, out)
    if not (tae / "config.json").is_file():
        if tiny:
            from ldm_edge.export.tiny import save_tiny_taesd

            save_tiny_taesd(tae)
        else:
            taesd().save_pretrained(tae, safe_serialization=True)
    if not (folder / "model_index.json").is_file():
        print(f"building {name} (random weights, the published shapes)", flush=True)
        if tiny:
            from ldm_edge.export.tiny import save_tiny_lcm, save_tiny_turbo

            (save_tiny_lcm if spec["kind"] == "lcm" else save_tiny_turbo)(folder)
        else:
            (lcm_sd15_pipeline if spec["kind"] == "lcm" else turbo_sd21_pipeline)().save_pretrained(
                folder, safe_serialization=True)
    if not (bundle / "manifest.json").is_file():
        run([sys.executable, "-m", "ldm_edge.export.cli", *export_cmd(name, folder, bundle, tae)],
            f"{name}: ldm-export onnx")
    int8_quality = ensure_int8(name, bundle) if int8 else None
    return {"name": name, **spec, "dir": folder, "bundle": bundle, "taesd": tae,
            "latents": _latents(out / f"{name}-latents.npy", spec["size"]),
            "int8_quality": int8_quality}


def paths(name: str, out: Path) -> tuple[Path, Path, Path]:
    """The model's diffusers folder, its bundle, and the TAESD folder it is exported with."""
    tae = "taesd-tiny" if MODELS[name].get("tiny") else "taesd-random"
    return out / f"{name}-diffusers", out / f"{name}-bundle", out / tae


def export_cmd(name: str, folder: Path, bundle: Path, tae: Path) -> list[str]:
    """``ldm-export`` arguments that write the model's bundle (prepare runs them, --dry-run
    prints them)."""
    spec = MODELS[name]
    lo, hi = TINY_EXPORT if spec.get("tiny") else (EXPORT_MIN, EXPORT_MAX)
    return ["onnx", str(folder), "-o", str(bundle), "--tiny-vae", str(tae),
            "--min-size", str(lo), "--max-size", str(hi), "--max-batch", str(EXPORT_MAX_BATCH),
            "--skip-vae-encoder", "--force", *spec["export_args"]]


def int8_cmd(name: str, bundle: Path) -> list[str]:
    """``ldm-export`` arguments that add the INT8 U-Net (calibration kept small, above)."""
    spec = MODELS[name]
    calib = TINY_CALIB_SIZE if spec.get("tiny") else CALIB_SIZE
    return ["int8", str(bundle), "--num-prompts", str(CALIB_PROMPTS),
            "--calib-steps", str(CALIB_STEPS), "--size", str(calib),
            "--schedulers", spec["scheduler"], "--no-tensorrt-form"]


def ensure_int8(name: str, bundle: Path):
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    if "int8" not in read_manifest_json(bundle).precisions("unet"):
        run([sys.executable, "-m", "ldm_edge.export.cli", *int8_cmd(name, bundle)],
            f"{name}: ldm-export int8")
    quality = json.loads((bundle / "manifest.json").read_text()).get("quality", {})
    return quality.get("int8")


def _latents(path: Path, size: int) -> Path:
    import numpy as np

    if not path.is_file():
        np.save(path, np.random.default_rng(SEED).standard_normal(
            (1, 4, size // 8, size // 8), dtype=np.float32))
    return path


def candidates(precisions, vaes) -> list[tuple[str, str, str, str]]:
    """(label, side, precision, VAE): per VAE, diffusers first."""
    out = []
    for vae in vaes:
        out.append((f"diffusers-{vae}", "diffusers", "fp32", vae))
        out += [(f"ours-{p}-{vae}", "ours", p, vae) for p in precisions]
    return out


# -- one generation, in its own process ---------------------------------------------------------
def worker(a) -> None:
    from run_one import StageTimer, peak_rss_mb

    spec = json.loads(a.worker)
    res = (work_ours if spec["side"] == "ours" else work_diffusers)(spec, StageTimer())
    res["peak_rss_mb"] = peak_rss_mb()
    Path(spec["out"]).write_text(json.dumps(res))


def work_ours(s: dict, timer) -> dict:
    import numpy as np
    from ldm_edge.runtime.bundle.spec import TINY_VAE
    from ldm_edge.runtime.image import save_png
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(s["bundle"], precision=s["precision"], threads=s["threads"], verify=False,
                    backend="onnxruntime", device="cpu", vae=s["vae"])
    decoder = TINY_VAE["vae_decoder"] if s["vae"] == "tiny" else "vae_decoder"
    for name in ("text_encoder", "unet", decoder):
        pipe.backend(name)  # every session open first, as diffusers loads every model first
    t0 = time.perf_counter()
    r = pipe(PROMPT, num_inference_steps=s["steps"], guidance_scale=s["guidance"],
             height=s["size"], width=s["size"], latents=np.load(s["latents"]))
    e2e = time.perf_counter() - t0
    save_png(r.images[0], s["png"], {"bench": True})
    t = r.timings
    return {"e2e_s": e2e, "text_encoder_s": t.text_encoder, "unet_step_s": t.unet_step_median,
            "unet_calls": len(t.unet_per_step), "vae_decoder_s": t.vae_decoder}


def work_diffusers(s: dict, timer) -> dict:
    import numpy as np
    import torch
    from diffusers import (
        AutoencoderTiny,
        LatentConsistencyModelPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image

    torch.set_num_threads(s["threads"])
    cls = LatentConsistencyModelPipeline if s["kind"] == "lcm" else StableDiffusionPipeline
    pipe = cls.from_pretrained(s["dir"], safety_checker=None, requires_safety_checker=False)
    if s["vae"] == "tiny":
        pipe.vae = AutoencoderTiny.from_pretrained(s["taesd"])
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.forward = timer.wrap("text_encoder", pipe.text_encoder.forward)
    pipe.unet.forward = timer.wrap("unet", pipe.unet.forward)
    pipe.vae.decode = timer.wrap("vae_decoder", pipe.vae.decode)
    latents = torch.from_numpy(np.load(s["latents"]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        img = pipe(PROMPT, num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                   height=s["size"], width=s["size"], latents=latents, output_type="np").images
    e2e = time.perf_counter() - t0
    Image.fromarray((img[0] * 255).round().astype("uint8")).save(s["png"])
    unet = sorted(timer.each["unet"])
    return {"e2e_s": e2e, "text_encoder_s": timer.total.get("text_encoder", 0.0),
            "unet_step_s": unet[len(unet) // 2], "unet_calls": len(unet),
            "vae_decoder_s": timer.total.get("vae_decoder", 0.0)}


# -- the driver ---------------------------------------------------------------------------------
METRICS = ("e2e_s", "unet_step_s", "vae_decoder_s", "text_encoder_s", "peak_rss_mb", "unet_calls")


def run_one(model: dict, cand, a, rep: int) -> dict:
    label, side, precision, vae = cand
    out = a.out / f"{model['name']}-{label}-{rep}.json"
    spec = {"side": side, "precision": precision, "vae": vae, "threads": a.threads,
            "steps": model["steps"], "guidance": model["guidance"], "size": model["size"],
            "kind": model["kind"], "bundle": str(model["bundle"]), "dir": str(model["dir"]),
            "taesd": str(model["taesd"]), "latents": str(model["latents"]),
            "png": str(a.out / f"{model['name']}-{label}.png"), "out": str(out)}
    # onnxruntime's graph cache off (it is on for users): a warm-up round would store the
    # graphs and the counted rounds time its hits; its gain is bench_ort_cache.py's
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
           "LDM_EDGE_CACHE": str(a.out / "cache"), "LDM_EDGE_ORT_CACHE": "0"}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                        json.dumps(spec)], check=False, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{label} failed on {model['name']}:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def measure(model: dict, a) -> dict:
    cands = candidates(a.precisions, a.vaes)
    runs = {c[0]: [] for c in cands}
    for rep in range(a.warmup + a.repeats):
        # the order turns each round, so no candidate always follows the same one
        for cand in cands[rep % len(cands):] + cands[:rep % len(cands)]:
            res = run_one(model, cand, a, rep)
            if rep >= a.warmup:
                runs[cand[0]].append(res)
            print(f"  {model['name']} {cand[0]} round {rep}"
                  f"{' (warm-up)' if rep < a.warmup else ''}: e2e {res['e2e_s']:.2f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in METRICS} for n, rs in runs.items()}
    return {"model": model["name"], "size": model["size"], "steps": model["steps"],
            "guidance": model["guidance"], "threads": a.threads, "repeats": a.repeats,
            "medians": med, "all": runs, "psnr_vs_diffusers": image_parity(model, cands, a.out),
            "int8_quality": model.get("int8_quality")}


def image_parity(model: dict, cands, out: Path) -> dict:
    import numpy as np
    from ldm_edge.runtime.compare import psnr
    from PIL import Image

    got = {}
    for label, side, _, vae in cands:
        if side == "ours":
            ref = np.asarray(Image.open(out / f"{model['name']}-diffusers-{vae}.png"))
            got[label] = psnr(np.asarray(Image.open(out / f"{model['name']}-{label}.png")), ref)
    return got


ROWS = [("e2e_s", "end to end (s)", 2), ("unet_step_s", "U-Net per step (s)", 3),
        ("vae_decoder_s", "VAE decoder (s)", 3), ("text_encoder_s", "text encoder (s)", 3),
        ("peak_rss_mb", "peak RSS (MB)", 0)]


def table(res: dict) -> str:
    from bench_report import side_by_side

    med = res["medians"]
    head = (f"### {res['model']} ({res['size']}², {res['steps']} step{'s' * (res['steps'] > 1)}, "
            f"guidance {res['guidance']:g}, {res['threads']} threads, median of {res['repeats']})")
    # each of ours beside diffusers with the same VAE
    return side_by_side(head, ROWS, med, lambda n: None if n.startswith("diffusers") else
                        med[f"diffusers-{n.rsplit('-', 1)[1]}"], res["psnr_vs_diffusers"],
                        "8-bit PSNR vs diffusers, same VAE (dB)")


def write_reports(results: list, out: Path, command: str, wall_s: float) -> None:
    (out / "results.json").write_text(json.dumps(
        {"command": command, "wall_s": wall_s, "results": results}, indent=1, default=str))
    parts = [(f"`{command}` (wall {wall_s / 60:.1f} min). Ratios: diffusers / ours "
              "(> 1: ours faster); peak RSS: ours / diffusers' with the same VAE."), ""]
    for r in results:
        parts += [table(r), ""]
        q = r.get("int8_quality")
        if q:
            scheds = ", ".join(f"{k} {v['psnr_db']:.1f} dB "
                               f"(U-Net cosine ≥ {v['unet_cosine_min']:.4f})"
                               for k, v in q.get("per_scheduler", {}).items())
            parts += [(f"INT8 U-Net's quality as `ldm-export int8` measured and recorded it "
                       f"(8-bit PSNR vs FP32): {scheds or q.get('psnr_db')}."), ""]
        if r["model"].endswith("lcm") or "lcm-" in r["model"]:
            parts += [("(LCM adds fresh noise between steps, drawn by each side's own "
                       "generator, so its pictures are not expected to match diffusers'.)"), ""]
    (out / "results.md").write_text("\n".join(parts))
    print("\n".join(parts))


def plan(a) -> list[str]:
    """What a run would do, one line a step; the ldm-export lines are the exact commands."""
    lines = []
    for name in a.models:
        spec = MODELS[name]
        folder, bundle, tae = paths(name, a.out)
        lines.append(f"{name}: {spec['kind']}, {spec['size']}², {spec['steps']} steps, "
                     f"guidance {spec['guidance']:g}")
        lines.append("  ldm-export " + " ".join(export_cmd(name, folder, bundle, tae)))
        if "int8" in a.precisions:
            lines.append("  ldm-export " + " ".join(int8_cmd(name, bundle)))
        for label, *_ in candidates(a.precisions, a.vaes):
            lines.append(f"  candidate {label}: {a.warmup} warm-up + {a.repeats} counted, "
                         f"{a.threads} threads, own process")
    return lines


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma list of {', '.join(MODELS)} (default {DEFAULT_MODELS})")
    ap.add_argument("--repeats", type=int, default=2, help="counted rounds (median)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (page cache)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--vaes", default=",".join(VAES))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--dry-run", action="store_true", help="print the plan; build nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.models = a.models.split(",")
    a.precisions = a.precisions.split(",")
    a.vaes = a.vaes.split(",")
    for name in a.models:
        if name not in MODELS:
            ap.error(f"unknown model {name!r}: use {', '.join(MODELS)}")
    for p in a.precisions:
        if p not in PRECISIONS:
            ap.error(f"unknown precision {p!r}: use {', '.join(PRECISIONS)}")
    for v in a.vaes:
        if v not in VAES:
            ap.error(f"unknown VAE {v!r}: use {', '.join(VAES)}")
    if a.repeats < 1 or a.warmup < 0:
        ap.error("--repeats must be at least 1 and --warmup at least 0")
    return a


def main(argv=None) -> None:
    a = parse(argv)
    if a.worker:
        return worker(a)
    if a.dry_run:
        print("\n".join(plan(a)))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = []
    for name in a.models:
        model = prepare(name, a.out, int8="int8" in a.precisions)
        results.append(measure(model, a))
    write_reports(results, a.out, " ".join(["python benchmarks/bench_few_step.py",
                                            *(sys.argv[1:] if argv is None else argv)]),
                  time.time() - t0)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
