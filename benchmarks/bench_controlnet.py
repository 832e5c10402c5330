"""The cost of one ControlNet per step at 512², SD1.5 architecture: ldm-edge vs diffusers.

    python benchmarks/bench_controlnet.py [--repeats 2] [--steps 4] [--no-int8]
    python benchmarks/bench_controlnet.py --dry-run       # the plan only: builds nothing
    make bench CONTROLNET=1                               # the same, after bench.py's models

Built here with seeded random weights at the real shapes (nothing is downloaded): the SD1.5
architecture (bench_models.sd15_pipeline: 320/640/1280/1280 channels, cross-attention 768,
CLIP ViT-L/14, the SD VAE) and a ControlNet ``ControlNetModel.from_unet(unet)`` at diffusers'
defaults (the released SD1.5 ControlNets' shape: the U-Net's encoder plus its zero convs and a
conditioning embedding 16/32/96/256), its zero convs and the embedding's last conv drawn at
random (diffusers initialises them to zero: residuals of zeros, export/tiny_controlnet.py).

Two bundles of the same model: one exported with ``--controlnet`` (its U-Net takes the 13
residual inputs), one without. Candidates, each generation in its own process, interleaved,
a warm-up round then N counted rounds, medians over every step of the counted rounds:

* ``diffusers-cn``: ``StableDiffusionControlNetPipeline`` (PyTorch eager), FP32;
* ``ours-fp32-cn`` / ``ours-int8-cn``: ``Pipeline(..., control=...)`` on the ControlNet bundle
  (INT8: what ``ldm-export int8`` made for it: the U-Net, and the ControlNet where its INT8
  graph passed the check; the manifest says which, and results.md repeats it);
* ``ours-fp32-zeros``: the ControlNet bundle without control (the residual inputs fed zeros);
* ``ours-fp32-plain``: the bundle exported without ``--controlnet``.

All at 512², DDIM, guidance 7.5 (CFG batch 2 in every U-Net and ControlNet call), the same
prompt, initial latents and control image; the pictures' latents are compared (decoding is
left out: this measures the steps). Per step: the U-Net call, the ControlNet call (ours: the
call hook's seconds of ``controlnet/*``; diffusers: ``controlnet.forward`` wrapped) and their
sum. Writes out/bench/controlnet/results.json and results.md.
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
OUT = Path("out/bench/controlnet")
PROMPT = "a cinematic photo of a house by a lake"
SEED = 0  # the random weights, the initial latents, the control image
CN_NAME = "canny"  # the ControlNet's name in the bundle (ldm-run --control canny:IMAGE)

SIZE = 512  # SD1.5's native size: what the issue's target is stated at
STEPS = 4  # per generation; the per-step medians pool every counted step
GUIDANCE = 7.5  # diffusers' default: guidance on, so every call is a CFG batch of 2
SCHEDULER = "ddim"  # one U-Net (and ControlNet) call per step on both sides, as bench.py
CONDITIONING_SCALE = 1.0

# Export range: 256 so INT8 can calibrate at 256² (CALIB_SIZE), 512 the size measured
# (bench_few_step.py's reasoning); one picture a request (the U-Net sees 2 under guidance).
EXPORT_MIN, EXPORT_MAX, EXPORT_MAX_BATCH = 256, 512, 1
# INT8 kept small: a timing benchmark. Two prompts, because calibration runs every other
# prompt with a ControlNet on a stand-in control image (bundletools/task_inputs.CONTROL_EVERY):
# one prompt would calibrate no ControlNet. 256²: SD1.5 calibration at 512² took ~8 min on
# one core (bench_few_step.py). The quality ldm-export int8 measures is recorded and repeated.
CALIB_PROMPTS, CALIB_STEPS, CALIB_SIZE = 2, 2, 256

# The randomised zero convs (1x1, fan_in = the block's channels) and the conditioning
# embedding's last conv (3x3 over 256 channels) are drawn N(0, 1/fan_in): each residual about
# the size of the activation it is made from, as PyTorch's default init would keep it; zeros
# would let the INT8 check pass on nothing and the U-Net add nothing.
INIT_GAIN = 1.0

# The tiny model (export/tiny.py's SD1, latents 16²; export/tiny_controlnet.py's ControlNet):
# the same code paths in seconds, for tests/cli/test_bench_controlnet.py.
TINY_SIZE, TINY_EXPORT, TINY_CALIB_SIZE = 128, (64, 128), 64
MEMORY_POLL_S = 20  # --min-free-gb: how often to look again

CANDIDATES = {  # label: (side, bundle, precision, control on)
    "diffusers-cn": ("diffusers", "cn", "fp32", True),
    "ours-fp32-cn": ("ours", "cn", "fp32", True),
    "ours-int8-cn": ("ours", "cn", "int8", True),
    "ours-fp32-zeros": ("ours", "cn", "fp32", False),
    "ours-fp32-plain": ("ours", "plain", "fp32", False),
}


# -- the models ---------------------------------------------------------------------------------
def sd15_controlnet(unet):
    """``ControlNetModel.from_unet(unet)`` at diffusers' defaults, the zero convs and the
    conditioning embedding's last conv drawn at random (INIT_GAIN / fan_in variance)."""
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(SEED + 7)
    convs = [*net.controlnet_down_blocks, net.controlnet_mid_block,
             net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in convs:
            fan_in = conv.weight[0].numel()
            std = (INIT_GAIN / fan_in) ** 0.5
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * std)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * std)
    return net.eval()


def paths(out: Path, tiny: bool) -> dict:
    tag = "tiny" if tiny else "sd15"
    return {"model": out / f"{tag}-diffusers", "controlnet": out / f"{tag}-controlnet",
            "cn": out / f"{tag}-cn-bundle", "plain": out / f"{tag}-plain-bundle",
            "latents": out / f"{tag}-latents.npy", "image": out / f"{tag}-control.png"}


def export_cmd(p: dict, which: str, tiny: bool) -> list[str]:
    """``ldm-export`` arguments writing bundle ``which`` ("cn" or "plain")."""
    lo, hi = TINY_EXPORT if tiny else (EXPORT_MIN, EXPORT_MAX)
    cn = ["--controlnet", f"{CN_NAME}={p['controlnet']}"] if which == "cn" else []
    return ["onnx", str(p["model"]), "-o", str(p[which]), "--min-size", str(lo),
            "--max-size", str(hi), "--max-batch", str(EXPORT_MAX_BATCH), "--skip-vae-encoder",
            "--force", *cn]


def int8_cmd(p: dict, tiny: bool) -> list[str]:
    return ["int8", str(p["cn"]), "--num-prompts", str(CALIB_PROMPTS),
            "--calib-steps", str(CALIB_STEPS),
            "--size", str(TINY_CALIB_SIZE if tiny else CALIB_SIZE),
            "--schedulers", SCHEDULER, "--no-tensorrt-form"]


def run(cmd: list[str], what: str) -> str:
    print(f"  {what}: ldm-export {' '.join(str(c) for c in cmd[3:])}", flush=True)
    t0 = time.time()
    r = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{what} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    print(f"  {what}: done in {time.time() - t0:.0f} s", flush=True)
    return r.stdout


def control_image(size: int):
    """A deterministic line-art control image (canny-like: white outlines on black), uint8."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    img = np.zeros((size, size), np.uint8)
    for _ in range(8):
        y0, x0 = rng.integers(0, size * 3 // 4, 2)
        y1, x1 = y0 + rng.integers(size // 8, size // 4), x0 + rng.integers(size // 8, size // 4)
        img[y0:y1, [x0, min(x1, size - 1)]] = 255
        img[[y0, min(y1, size - 1)], x0:x1] = 255
    return np.repeat(img[:, :, None], 3, axis=2)


def prepare(out: Path, tiny: bool, int8: bool, bundles=("cn", "plain")) -> dict:
    """The diffusers folders, ``bundles`` and the INT8 variant (cached under ``out``)."""
    import numpy as np
    from PIL import Image

    p = paths(out, tiny)
    size = TINY_SIZE if tiny else SIZE
    if not (p["model"] / "model_index.json").is_file():
        print("building the model (random weights, the published shapes)", flush=True)
        if tiny:
            from ldm_edge.export.tiny import save_tiny

            save_tiny(p["model"], "sd1")
        else:
            from bench_models import sd15_pipeline

            sd15_pipeline().save_pretrained(p["model"], safe_serialization=True)
    if not (p["controlnet"] / "config.json").is_file():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(p["model"] / "unet")
        if tiny:
            from ldm_edge.export.tiny_controlnet import tiny_controlnet

            net = tiny_controlnet(unet, SEED)
        else:
            net = sd15_controlnet(unet)
        net.save_pretrained(p["controlnet"], safe_serialization=True)
    for which in bundles:
        if not (p[which] / "manifest.json").is_file():
            run([sys.executable, "-m", "ldm_edge.export.cli", *export_cmd(p, which, tiny)],
                f"{which} bundle")
    quality = None
    if int8:
        from ldm_edge.runtime.bundle.schema import read_manifest_json

        if "int8" not in read_manifest_json(p["cn"]).precisions("unet"):
            run([sys.executable, "-m", "ldm_edge.export.cli", *int8_cmd(p, tiny)], "INT8")
        quality = int8_facts(p["cn"])
    if not p["latents"].is_file():
        np.save(p["latents"], np.random.default_rng(SEED).standard_normal(
            (1, 4, size // 8, size // 8), dtype=np.float32))
    if not p["image"].is_file():
        Image.fromarray(control_image(size)).save(p["image"])
    return {**{k: str(v) for k, v in p.items()}, "size": size, "tiny": tiny, "int8": quality}


def int8_facts(bundle: Path) -> dict:
    """What ``ldm-export int8`` quantised in the ControlNet bundle, and the quality it
    recorded."""
    m = json.loads((bundle / "manifest.json").read_text())
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    schema = read_manifest_json(bundle)
    comps = ["unet", f"controlnet/{CN_NAME}"]
    return {"int8_components": [c for c in comps if "int8" in schema.precisions(c)],
            "quality": m.get("quality", {}).get("int8")}


# -- one generation, in its own process ---------------------------------------------------------
def worker(a) -> None:
    from run_one import peak_rss_mb

    spec = json.loads(a.worker)
    res = (work_ours if spec["side"] == "ours" else work_diffusers)(spec)
    res["peak_rss_mb"] = peak_rss_mb()
    Path(spec["out"]).write_text(json.dumps(res))


def work_ours(s: dict) -> dict:
    import numpy as np
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(s["bundle"], precision=s["precision"], threads=s["threads"], verify=False,
                    backend="onnxruntime", device="cpu")
    cn_key = f"controlnet/{CN_NAME}"
    for name in ("text_encoder", "unet", *([cn_key] if s["control"] else [])):
        pipe.backend(name)  # every session open first, as diffusers loads every model first
    cn_calls = []
    pipe.add_call_hook(lambda c: cn_calls.append(c.seconds) if c.name == cn_key else None)
    control = {"control": [(CN_NAME, s["image"], CONDITIONING_SCALE)]} if s["control"] else {}
    t0 = time.perf_counter()
    r = pipe(PROMPT, num_inference_steps=s["steps"], guidance_scale=GUIDANCE,
             scheduler=SCHEDULER, height=s["size"], width=s["size"],
             latents=np.load(s["latents"]), decode=False, **control)
    e2e = time.perf_counter() - t0
    np.save(s["result"], r.latents)
    return {"loop_s": e2e, "unet": list(r.timings.unet_per_step), "controlnet": cn_calls,
            "precisions": {n: pipe.backend(n).precision for n in ("unet",)
                           + ((cn_key,) if s["control"] else ())}}


def work_diffusers(s: dict) -> dict:
    import numpy as np
    import torch
    from diffusers import (
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
    )
    from PIL import Image
    from run_one import StageTimer

    torch.set_num_threads(s["threads"])
    timer = StageTimer()
    net = ControlNetModel.from_pretrained(s["controlnet"])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        s["model"], controlnet=net, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.forward = timer.wrap("unet", pipe.unet.forward)
    pipe.controlnet.forward = timer.wrap("controlnet", pipe.controlnet.forward)
    latents = torch.from_numpy(np.load(s["latents"]))
    image = Image.open(s["image"]).convert("RGB")
    t0 = time.perf_counter()
    with torch.inference_mode():
        lat = pipe(PROMPT, image=image, num_inference_steps=s["steps"], guidance_scale=GUIDANCE,
                   height=s["size"], width=s["size"], latents=latents, output_type="latent",
                   controlnet_conditioning_scale=CONDITIONING_SCALE).images
    e2e = time.perf_counter() - t0
    np.save(s["result"], lat.float().numpy())
    return {"loop_s": e2e, "unet": timer.each["unet"], "controlnet": timer.each["controlnet"],
            "precisions": {"unet": "fp32", "controlnet": "fp32"}}


# -- the driver ---------------------------------------------------------------------------------
def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def wait_for_memory(min_gb: float) -> None:
    """On a shared machine: wait until ``min_gb`` GiB are available (a generation at 512²
    peaks at ~6 GB) rather than push another process into the OOM killer."""
    while available_gb() < min_gb:
        print(f"  waiting: {available_gb():.1f} GiB available, want {min_gb:g}", flush=True)
        time.sleep(MEMORY_POLL_S)


def run_one(model: dict, label: str, a, rep: int) -> dict:
    side, bundle, precision, control = CANDIDATES[label]
    wait_for_memory(a.min_free_gb)
    out = a.out / f"{label}-{rep}.json"
    spec = {"side": side, "precision": precision, "control": control, "threads": a.threads,
            "steps": a.steps, "size": model["size"], "bundle": model[bundle],
            "model": model["model"], "controlnet": model["controlnet"],
            "latents": model["latents"], "image": model["image"],
            "result": str(a.out / f"{label}-latents.npy"), "out": str(out)}
    # onnxruntime's graph cache off (it is on for users): its gain is bench_ort_cache.py's
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads),
           "LDM_EDGE_CACHE": str(a.out / "cache"), "LDM_EDGE_ORT_CACHE": "0"}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                        json.dumps(spec)], check=False, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{label} failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "n": len(xs)}


def summarise(runs: list[dict]) -> dict:
    """Per-step statistics over every counted step: U-Net, ControlNet, their sum."""
    unet = [t for r in runs for t in r["unet"]]
    cn = [t for r in runs for t in r["controlnet"]]
    both = [u + c for r in runs for u, c in zip(r["unet"], r["controlnet"])] if cn else unet
    return {"unet": _stats(unet), "controlnet": _stats(cn), "step": _stats(both),
            "loop_s": _stats([r["loop_s"] for r in runs]),
            "peak_rss_mb": _stats([r["peak_rss_mb"] for r in runs]),
            "precisions": runs[0]["precisions"], "calls": len(runs[0]["unet"])}


def measure(model: dict, a) -> dict:
    labels = list(a.candidates)
    runs = {n: [] for n in labels}
    for rep in range(a.warmup + a.repeats):
        # the order turns each round, so no candidate always follows the same one
        for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
            res = run_one(model, label, a, rep)
            if rep >= a.warmup:
                runs[label].append(res)
            cn = f", ControlNet {statistics.median(res['controlnet']):.3f} s" \
                if res["controlnet"] else ""
            print(f"  {label} round {rep}{' (warm-up)' if rep < a.warmup else ''}: U-Net "
                  f"{statistics.median(res['unet']):.3f} s/step{cn}, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    return {"size": model["size"], "steps": a.steps, "threads": a.threads,
            "repeats": a.repeats, "warmup": a.warmup,
            "summary": {n: summarise(rs) for n, rs in runs.items()}, "all": runs,
            "latents_vs_diffusers": latent_parity(labels, a.out), "int8": model.get("int8")}


def latent_parity(labels: list[str], out: Path) -> dict:
    """Each of ours' final latents against diffusers' (the same work: the same latents)."""
    import numpy as np

    ref_path = out / "diffusers-cn-latents.npy"
    if not ref_path.is_file():
        return {}
    ref = np.load(ref_path).astype(np.float64).ravel()
    got = {}
    for label in labels:
        if label.startswith("ours"):
            x = np.load(out / f"{label}-latents.npy").astype(np.float64).ravel()
            got[label] = {"max_abs": float(np.abs(x - ref).max()),
                          "cosine": float(x @ ref / (np.linalg.norm(x) * np.linalg.norm(ref)))}
    return got


def _cell(st: dict, base: dict | None, digits: int = 3) -> str:
    if st["median"] is None:
        return "–"
    cell = f"{st['median']:.{digits}f}"
    if base and base["median"]:
        cell += f" ({base['median'] / st['median']:.2f}×)"
    return cell


def table(res: dict) -> str:
    s = res["summary"]
    base = s.get("diffusers-cn")
    n = next(iter(s.values()))["unet"]["n"]
    lines = [f"### {res['size']}², {res['steps']} steps × {res['repeats']} rounds, guidance "
             f"{GUIDANCE:g} (CFG batch 2), {res['threads']} threads: medians of {n} steps "
             f"(ratio diffusers / ours)", "",
             "| per step (s) | " + " | ".join(s) + " |", "|---" * (len(s) + 1) + "|"]
    for key, label in (("step", "U-Net + ControlNet"), ("unet", "U-Net"),
                       ("controlnet", "ControlNet")):
        lines.append(f"| {label} | " + " | ".join(
            _cell(st[key], base[key] if base and key in base else None) for st in s.values())
            + " |")
    lines.append("| U-Net min–max | " + " | ".join(
        f"{st['unet']['min']:.3f}–{st['unet']['max']:.3f}" for st in s.values()) + " |")
    lines.append("| ControlNet share of the step | " + " | ".join(
        f"{st['controlnet']['median'] / st['step']['median']:.0%}"
        if st["controlnet"]["median"] else "–" for st in s.values()) + " |")
    lines.append("| peak RSS (MB) | " + " | ".join(
        f"{st['peak_rss_mb']['median']:.0f}" for st in s.values()) + " |")
    lines.append("| precisions | " + " | ".join(
        ", ".join(f"{k.split('/')[0]} {v}" for k, v in st["precisions"].items())
        for st in s.values()) + " |")
    q = res["latents_vs_diffusers"]
    lines.append("| final latents vs diffusers' (cosine) | " + " | ".join(
        f"{q[n]['cosine']:.6f}" if n in q else "–" for n in s) + " |")
    return "\n".join(lines)


def zero_cost(res: dict) -> str | None:
    s = res["summary"]
    if "ours-fp32-zeros" not in s or "ours-fp32-plain" not in s:
        return None
    z, p = s["ours-fp32-zeros"]["unet"], s["ours-fp32-plain"]["unet"]
    return (f"Zero-fed residual inputs: U-Net per step {z['median']:.3f} s "
            f"({z['min']:.3f}–{z['max']:.3f}, n={z['n']}) on the ControlNet bundle without "
            f"control vs {p['median']:.3f} s ({p['min']:.3f}–{p['max']:.3f}, n={p['n']}) on the "
            f"bundle exported without --controlnet: {z['median'] / p['median'] - 1:+.1%}.")


def write_reports(res: dict, out: Path, command: str, wall_s: float) -> None:
    (out / "results.json").write_text(json.dumps(
        {"command": command, "wall_s": wall_s, "result": res}, indent=1, default=str))
    parts = [f"`{command}` (wall {wall_s / 60:.1f} min).", "", table(res), ""]
    zc = zero_cost(res)
    if zc:
        parts += [zc, ""]
    q = res.get("int8")
    if q:
        parts += [f"INT8 components: {', '.join(q['int8_components']) or 'none'}; quality "
                  f"`ldm-export int8` recorded: {json.dumps(q['quality'])}", ""]
    (out / "results.md").write_text("\n".join(parts))
    print("\n".join(parts))


def plan(a) -> list[str]:
    p = paths(a.out, a.tiny)
    lines = [f"{'tiny SD1' if a.tiny else 'SD1.5 architecture'} + ControlNet {CN_NAME}, "
             f"{TINY_SIZE if a.tiny else SIZE}², {a.steps} steps, guidance {GUIDANCE:g}, "
             f"{SCHEDULER}"]
    lines += ["  ldm-export " + " ".join(export_cmd(p, w, a.tiny)) for w in ("cn", "plain")]
    if any(CANDIDATES[c][2] == "int8" for c in a.candidates):
        lines.append("  ldm-export " + " ".join(int8_cmd(p, a.tiny)))
    lines += [f"  candidate {c}: {a.warmup} warm-up + {a.repeats} counted, {a.threads} threads, "
              f"own process" for c in a.candidates]
    return lines


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2, help="counted rounds (median)")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first (page cache)")
    ap.add_argument("--steps", type=int, default=STEPS, help="steps per generation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", default=",".join(CANDIDATES),
                    help=f"comma list of {', '.join(CANDIDATES)}")
    ap.add_argument("--no-int8", action="store_true", help="leave out ours-int8-cn")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (tests)")
    ap.add_argument("--min-free-gb", type=float, default=0.0,
                    help="before each generation, wait until this much memory is available")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--dry-run", action="store_true", help="print the plan; build nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.candidates = a.candidates.split(",")
    for c in a.candidates:
        if c not in CANDIDATES:
            ap.error(f"unknown candidate {c!r}: use {', '.join(CANDIDATES)}")
    if a.no_int8:
        a.candidates = [c for c in a.candidates if CANDIDATES[c][2] != "int8"]
    if a.repeats < 1 or a.warmup < 0 or a.steps < 1:
        ap.error("--repeats and --steps must be at least 1, --warmup at least 0")
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
    int8 = any(CANDIDATES[c][2] == "int8" for c in a.candidates)
    model = prepare(a.out, a.tiny, int8, sorted({CANDIDATES[c][1] for c in a.candidates}))
    print(f"prepared in {(time.time() - t0) / 60:.1f} min", flush=True)
    res = measure(model, a)
    write_reports(res, a.out, " ".join(["python benchmarks/bench_controlnet.py",
                                        *(sys.argv[1:] if argv is None else argv)]),
                  time.time() - t0)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
