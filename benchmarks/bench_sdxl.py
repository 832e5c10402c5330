"""SDXL's architecture on the CPU: ldm-edge's runtime vs diffusers, same run, same work.

    python benchmarks/bench_sdxl.py [--model-dir DIR] [--bundle B] [--make-int8] [--repeats 1]
    python benchmarks/bench_sdxl.py --rows base-1024 --modes default,low-memory ...
    python benchmarks/bench_sdxl.py --dry-run          # the plan and the exact commands
    python benchmarks/bench_sdxl.py --tiny ...         # the tiny SDXL (tests/cli/): seconds

The model is SDXL base's architecture with seeded random weights (benchmarks/make_sdxl_arch.py
writes the diffusers folder, ~14 GB; nothing is downloaded), exported with ``ldm-export onnx``;
with ``--make-int8`` it gets an INT8 U-Net (``ldm-export int8``, calibration kept small: this is
a timing benchmark; the quality it measures is recorded in the bundle's manifest).

Two kinds of measurement, each generation in a fresh process (peak RSS = its VmHWM):

* **rows** (side by side with diffusers' ``StableDiffusionXLPipeline``, PyTorch eager, the same
  prompt, initial latents, steps, guidance, sampler and size): ``base-1024`` (1024², the model's
  own Euler, classifier-free guidance: every U-Net call is batch 2) and ``turbo-512`` (512²,
  SDXL-Turbo's way of sampling with the same weights: 1 step, guidance 0, Euler on ``trailing``
  timesteps). Candidates: diffusers, ours FP32, ours INT8 (when the bundle has it). Ours opens
  every session before the clock starts, as diffusers' ``from_pretrained`` loads every model.
  Reported: load (session opens / from_pretrained), cold start (process start -> first U-Net
  call), U-Net per step (median call), end to end (the pipeline call, models loaded), VAE
  decoder, text encoders, peak RSS.
* **modes**: the ``ldm-run`` command line itself at the base row's size and steps, in each
  memory mode (``--low-memory``, ``--vae-tiling``, the INT8 U-Net): peak RSS, process wall and
  the stage timings ldm-run measured.

Writes OUT/results.json (every round) and OUT/results.md (medians). Ratios: diffusers / ours
(> 1: ours faster); RSS: ours / diffusers'.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path("out/bench/sdxl")
PROMPT = "a photo of a cat"
SEED = 0  # ldm-run's --seed in the modes; the rows' initial latents are drawn from it too

# SDXL base's defaults in diffusers' StableDiffusionXLPipeline: 1024², guidance 5.0, its Euler
# scheduler. Two steps: enough for a median U-Net call and a whole picture, and each 1024² step
# (batch 2) takes about a minute a side on 2 cores, so more would not fit ~40 min in all.
BASE_SIZE, BASE_STEPS, BASE_GUIDANCE = 1024, 2, 5.0
# SDXL-Turbo's makers' recommendation: 512², one step, no guidance, Euler on trailing timesteps
TURBO_SIZE, TURBO_STEPS, TURBO_GUIDANCE, TURBO_SPACING = 512, 1, 0.0, "trailing"
SCHEDULER = "euler"  # SDXL base's own (EulerDiscreteScheduler) in ldm-run's names
# ldm-run's default tile is the bundle's default size (1024 for SDXL), one tile at 1024²: no
# tiling at all. 512 (diffusers' own tile for a 512-sample VAE) splits 1024² into 3x3 tiles.
BASE_VAE_TILE = 512
# INT8 calibration kept small (a timing benchmark): 1 prompt, 2 Euler steps at 512²; the
# quality ldm-export measures is recorded in the manifest and repeated in results.md.
CALIB_PROMPTS, CALIB_STEPS, CALIB_SIZE = 1, 2, 512

ROWS = {
    "base-1024": {"size": BASE_SIZE, "steps": BASE_STEPS, "guidance": BASE_GUIDANCE,
                  "spacing": None},
    "turbo-512": {"size": TURBO_SIZE, "steps": TURBO_STEPS, "guidance": TURBO_GUIDANCE,
                  "spacing": TURBO_SPACING},
}
# The tiny SDXL (export/tiny_sdxl.py): the same code paths in seconds, for tests/cli/.
TINY_ROWS = {
    "base-1024": {**ROWS["base-1024"], "size": 128},
    "turbo-512": {**ROWS["turbo-512"], "size": 64},
}
TINY_EXPORT = ["--min-size", "64", "--max-size", "128", "--max-batch", "2", "--skip-vae-encoder"]
TINY_CALIB_SIZE = 64

# ldm-run's memory modes: name -> (precision, flags); tiling modes get --vae-tile-size too
MODES = {
    "default": ("fp32", []),
    "low-memory": ("fp32", ["--low-memory"]),
    "low-memory-tiling": ("fp32", ["--low-memory", "--vae-tiling"]),
    "int8-low-memory-tiling": ("int8", ["--low-memory", "--vae-tiling"]),
    "int8": ("int8", []),
}
DEFAULT_MODES = "default,low-memory,low-memory-tiling,int8-low-memory-tiling"
PRECISIONS = ("fp32", "int8")


def run(cmd: list, what: str) -> float:
    """Run a preparation step (its output shown); its wall seconds."""
    print(f"  {what}: {' '.join(str(c) for c in cmd)}", flush=True)
    t0 = time.time()
    r = subprocess.run([str(c) for c in cmd], check=False)
    if r.returncode:
        raise SystemExit(f"{what} failed (exit {r.returncode})")
    print(f"  {what}: done in {time.time() - t0:.0f} s", flush=True)
    return time.time() - t0


def export_cmd(a) -> list[str]:
    return ["onnx", str(a.model_dir), "-o", str(a.bundle), "--force",
            *(TINY_EXPORT if a.tiny else [])]


def int8_cmd(a) -> list[str]:
    return ["int8", str(a.bundle), "--num-prompts", str(CALIB_PROMPTS), "--calib-steps",
            str(CALIB_STEPS), "--size", str(TINY_CALIB_SIZE if a.tiny else CALIB_SIZE),
            "--schedulers", SCHEDULER, "--no-tensorrt-form"]


def has_int8(bundle: Path) -> bool:
    m = bundle / "manifest.json"
    return m.is_file() and "int8" in json.loads(m.read_text())["components"]["unet"]["variants"]


def prepare(a) -> dict:
    """The diffusers folder, the bundle and (``--make-int8``) its INT8 U-Net, each made only
    when missing; returns what was made and how long it took."""
    made = {}
    if not (a.model_dir / "model_index.json").is_file():
        if a.tiny:
            from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

            save_tiny_sdxl(a.model_dir)
        else:
            made["build_s"] = run([sys.executable, HERE / "make_sdxl_arch.py", a.model_dir],
                                  "make_sdxl_arch.py")
    if not a.precisions and not a.modes:
        return made  # diffusers alone: no bundle needed
    if not (a.bundle / "manifest.json").is_file():
        made["export_s"] = run([sys.executable, "-m", "ldm_edge.export.cli", *export_cmd(a)],
                               "ldm-export onnx")
    if a.make_int8 and not has_int8(a.bundle):
        made["int8_s"] = run([sys.executable, "-m", "ldm_edge.export.cli", *int8_cmd(a)],
                             "ldm-export int8")
    return made


def latents_file(out: Path, size: int) -> Path:
    import numpy as np

    path = out / f"latents-{size}.npy"
    if not path.is_file():
        np.save(path, np.random.default_rng(SEED).standard_normal(
            (1, 4, size // 8, size // 8), dtype=np.float32))
    return path


# -- one generation, in its own process ----------------------------------------------------
def peak_rss_mb() -> float:
    """This process's high-water RSS (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> None:
    sys.path.insert(0, str(HERE))
    from run_one import StageTimer

    kind = spec["side"]
    res = (work_cli if kind == "cli" else work_ours if kind == "ours" else work_diffusers)(
        spec, StageTimer())
    res["peak_rss_mb"] = peak_rss_mb()
    res["wall_s"] = time.time() - spec["t_spawn"]
    cpu = os.times()  # on a shared machine: how much of the wall this process actually ran
    res["cpu_s"] = cpu.user + cpu.system
    if res.get("t_first_unet") is not None:
        res["cold_start_s"] = res.pop("t_first_unet") - spec["t_spawn"]
    Path(spec["out"]).write_text(json.dumps(res))


def _first_unet_hook(pipe, first: dict):
    def hook(call):
        if call.name == "unet" and "t" not in first:
            first["t"] = time.time() - call.seconds  # when the first U-Net call started
    pipe.add_call_hook(hook)


def _ours_timings(t) -> dict:
    return {"unet_step_s": t.unet_step_median, "unet_calls": len(t.unet_per_step),
            "unet_first_s": t.unet_per_step[0] if t.unet_per_step else None,
            "text_encoder_s": t.text_encoder, "vae_decoder_s": t.vae_decoder}


def work_ours(s: dict, timer) -> dict:
    import numpy as np
    from ldm_edge.runtime.bundle.opener import open_bundle
    from ldm_edge.runtime.image import save_png
    from ldm_edge.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    manifest = open_bundle(s["bundle"], False)
    if s["spacing"]:  # Turbo's sampling with the same weights: only the timesteps differ
        manifest.schema.scheduler = {**manifest.schema.scheduler, "timestep_spacing": s["spacing"]}
    pipe = Pipeline(manifest, precision=s["precision"], threads=s["threads"], verify=False,
                    backend="onnxruntime", device="cpu")
    first = {}
    _first_unet_hook(pipe, first)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        if pipe.manifest.has(name):
            pipe.backend(name)  # every session open first, as diffusers loads every model first
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = pipe(PROMPT, num_inference_steps=s["steps"], guidance_scale=s["guidance"],
             scheduler=SCHEDULER, height=s["size"], width=s["size"], latents=np.load(s["latents"]))
    e2e = time.perf_counter() - t0
    save_png(r.images[0], s["png"], {"bench": True})
    return {"load_s": load, "e2e_s": e2e, "t_first_unet": first.get("t"),
            **_ours_timings(r.timings)}


def work_diffusers(s: dict, timer) -> dict:
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from PIL import Image

    torch.set_num_threads(s["threads"])
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(s["dir"])
    load = time.perf_counter() - t0
    if s["spacing"]:
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                            timestep_spacing=s["spacing"])
    pipe.set_progress_bar_config(disable=True)
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        module.forward = timer.wrap("text_encoder", module.forward)
    pipe.unet.forward = timer.wrap("unet", pipe.unet.forward)
    pipe.vae.decode = timer.wrap("vae_decoder", pipe.vae.decode)
    latents = torch.from_numpy(np.load(s["latents"]))
    t0 = time.perf_counter()
    with torch.inference_mode():
        img = pipe(PROMPT, num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                   height=s["size"], width=s["size"], latents=latents, output_type="np").images
    e2e = time.perf_counter() - t0
    Image.fromarray((img[0] * 255).round().astype("uint8")).save(s["png"])
    unet = timer.each["unet"]
    return {"load_s": load, "e2e_s": e2e, "t_first_unet": timer.first.get("unet"),
            "unet_step_s": statistics.median(unet), "unet_calls": len(unet),
            "unet_first_s": unet[0], "text_encoder_s": timer.total.get("text_encoder", 0.0),
            "vae_decoder_s": timer.total.get("vae_decoder", 0.0)}


def work_cli(s: dict, timer) -> dict:
    """``ldm-run ARGV`` in this process (so its VmHWM is ldm-run's); the stage timings are
    read from the Result its pipeline returns."""
    from ldm_edge.runtime.cli.run import main
    from ldm_edge.runtime.pipeline import Pipeline

    got, first = [], {}
    call, init = Pipeline.__call__, Pipeline.__init__

    def timed_call(self, *args, **kw):
        r = call(self, *args, **kw)
        got.append(r.timings)
        return r

    def hooked_init(self, *args, **kw):
        init(self, *args, **kw)
        _first_unet_hook(self, first)

    Pipeline.__call__, Pipeline.__init__ = timed_call, hooked_init
    try:
        main.main(args=s["argv"], prog_name="ldm-run", standalone_mode=False)
    finally:
        Pipeline.__call__, Pipeline.__init__ = call, init
    if not got:
        raise SystemExit("ldm-run generated nothing")
    return {"t_first_unet": first.get("t"), "e2e_s": got[-1].total, **_ours_timings(got[-1])}


# -- the driver ----------------------------------------------------------------------------
def spawn(spec: dict, a) -> dict:
    spec = {**spec, "t_spawn": time.time()}
    # onnxruntime's graph cache off (it is on for users): a 1024² mode would store a 10 GB
    # entry and the next mode time its hits; the modes measure ldm-run as it opens the bundle
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "LDM_EDGE_ORT_CACHE": "0"}
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                        json.dumps(spec)], check=False, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{spec['label']} failed:\n{r.stderr[-3000:]}")
    return json.loads(Path(spec["out"]).read_text())


def row_candidates(a) -> list[tuple[str, str, str]]:
    """(label, side, precision): diffusers first."""
    cands = [("diffusers", "diffusers", "fp32")]
    for p in a.precisions:
        if p == "int8" and not has_int8(a.bundle):
            print(f"  ours-int8: skipped, the bundle has no INT8 U-Net (--make-int8, or "
                  f"ldm-export {' '.join(int8_cmd(a))})", flush=True)
            continue
        cands.append((f"ours-{p}", "ours", p))
    return cands


def measure_row(name: str, a) -> dict:
    row = (TINY_ROWS if a.tiny else ROWS)[name]
    cands = row_candidates(a)
    runs = {c[0]: [] for c in cands}
    for rep in range(a.warmup + a.repeats):
        for label, side, precision in cands[rep % len(cands):] + cands[:rep % len(cands)]:
            spec = {"side": side, "label": label, "precision": precision, "threads": a.threads,
                    **row, "bundle": str(a.bundle), "dir": str(a.model_dir),
                    "latents": str(latents_file(a.out, row["size"])),
                    "png": str(a.out / f"{name}-{label}.png"),
                    "out": str(a.out / f"{name}-{label}-{rep}.json")}
            res = spawn(spec, a)
            if rep >= a.warmup:
                runs[label].append(res)
            print(f"  {name} {label} round {rep}{' (warm-up)' if rep < a.warmup else ''}: "
                  f"U-Net step {res['unet_step_s']:.2f} s, e2e {res['e2e_s']:.2f} s, peak RSS "
                  f"{res['peak_rss_mb']:.0f} MiB, cold start {res['cold_start_s']:.1f} s",
                  flush=True)
    return {"row": name, **row, "threads": a.threads, "repeats": a.repeats,
            "medians": medians(runs), "all": runs, "psnr_vs_diffusers": parity(name, cands, a.out)}


def medians(runs: dict) -> dict:
    return {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]
                    if isinstance(rs[0][k], (int, float))} for label, rs in runs.items() if rs}


def parity(name: str, cands, out: Path) -> dict:
    import numpy as np
    from ldm_edge.runtime.compare import psnr
    from PIL import Image

    ref = np.asarray(Image.open(out / f"{name}-diffusers.png"))
    return {label: psnr(np.asarray(Image.open(out / f"{name}-{label}.png")), ref)
            for label, side, _ in cands if side == "ours"}


def mode_argv(mode: str, a, png: Path) -> list[str]:
    """The ldm-run command line of one memory mode at the base row's size and steps."""
    row = (TINY_ROWS if a.tiny else ROWS)["base-1024"]
    precision, flags = MODES[mode]
    tile = a.vae_tile_size if a.vae_tile_size else (None if a.tiny else BASE_VAE_TILE)
    if "--vae-tiling" in flags and tile:
        flags = [*flags, "--vae-tile-size", str(tile)]
    return [str(a.bundle), "-p", PROMPT, "--steps", str(row["steps"]), "--seed", str(SEED),
            "--threads", str(a.threads), "--height", str(row["size"]), "--width",
            str(row["size"]), "--precision", precision, *flags, "-q", "-o", str(png)]


def measure_modes(a, baseline: float | None) -> dict:
    runs, failed = {}, {}
    for mode in a.modes:
        if MODES[mode][0] == "int8" and not has_int8(a.bundle):
            print(f"  mode {mode}: skipped, the bundle has no INT8 U-Net", flush=True)
            continue
        argv = mode_argv(mode, a, a.out / f"mode-{mode}.png")
        for rep in range(a.repeats):
            try:
                res = spawn({"side": "cli", "label": mode, "argv": argv,
                             "out": str(a.out / f"mode-{mode}-{rep}.json")}, a)
            except SystemExit as e:  # one mode refused or failed: the others still run
                print(f"  mode {mode}: {e}", flush=True)
                failed[mode] = str(e).strip().splitlines()[-1]
                break
            res["command"] = "ldm-run " + shlex.join(argv)
            runs.setdefault(mode, []).append(res)
            print(f"  mode {mode} round {rep}: peak RSS {res['peak_rss_mb']:.0f} MiB, wall "
                  f"{res['wall_s']:.1f} s", flush=True)
    return {"medians": medians(runs), "all": runs, "baseline_mb": baseline, "failed": failed,
            "commands": {m: rs[0]["command"] for m, rs in runs.items()}}


# -- the report ----------------------------------------------------------------------------
TABLE = [("load_s", "load: session opens / from_pretrained (s)", 1),
         ("cold_start_s", "cold start: process start -> first U-Net call (s)", 1),
         ("unet_step_s", "U-Net per step, median call (s)", 2),
         ("unet_first_s", "first U-Net call (s)", 2),
         ("e2e_s", "end to end, models loaded (s)", 2),
         ("text_encoder_s", "text encoders (s)", 2), ("vae_decoder_s", "VAE decoder (s)", 2),
         ("peak_rss_mb", "peak RSS (MiB)", 0)]


def row_table(res: dict) -> str:
    from bench_report import side_by_side

    med = res["medians"]
    head = (f"### {res['row']} ({res['size']}², {res['steps']} step{'s' * (res['steps'] > 1)}, "
            f"guidance {res['guidance']:g}, {res['threads']} threads, median of {res['repeats']})")
    return side_by_side(head, TABLE, med, lambda n: None if n == "diffusers" else med["diffusers"],
                        res["psnr_vs_diffusers"], "8-bit PSNR vs diffusers (dB)")


def modes_table(res: dict) -> str:
    base = res["baseline_mb"]
    lines = ["| ldm-run mode | peak RSS (MiB) | of diffusers' | wall (s) | U-Net per step (s) "
             "| VAE decoder (s) |", "|---|---|---|---|---|---|"]
    for mode, m in res["medians"].items():
        ratio = f"{m['peak_rss_mb'] / base:.2f}×" if base else "–"
        lines.append(f"| {mode} | {m['peak_rss_mb']:.0f} | {ratio} | {m['wall_s']:.1f} | "
                     f"{m['unet_step_s']:.2f} | {m['vae_decoder_s']:.2f} |")
    lines += [f"| {mode} | failed: {why} | | | | |" for mode, why in res["failed"].items()]
    lines += ["", "Commands:", ""] + [f"* {m}: `{c}`" for m, c in res["commands"].items()]
    return "\n".join(lines)


def write_reports(report: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    parts = [f"`{report['command']}` (wall {report['wall_s'] / 60:.1f} min; CPU "
             f"{report['cpu']}). Ratios: diffusers / ours (> 1: ours faster); peak RSS: ours / "
             f"diffusers'.", ""]
    if report["prepared"]:
        parts += ["Prepared: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["prepared"].items()),
                  ""]
    for r in report["rows"]:
        parts += [row_table(r), ""]
    if report.get("modes"):
        parts += [modes_table(report["modes"]), ""]
    q = report.get("int8_quality")
    if q:
        by = ", ".join(f"{k} {v['psnr_db']:.1f} dB (U-Net cosine >= {v['unet_cosine_min']:.4f})"
                       for k, v in (q.get("per_scheduler") or {}).items())
        parts += [f"INT8 U-Net's quality as `ldm-export int8` recorded it (8-bit PSNR vs FP32 "
                  f"at {q.get('size')}): {by or q.get('psnr_db')}.", ""]
    (out / "results.md").write_text("\n".join(parts))
    print("\n".join(parts))


def cpu_name() -> str:
    try:
        r = subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
        for line in r.stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return "unknown"


def plan(a) -> list[str]:
    lines = [f"diffusers folder {a.model_dir} (benchmarks/make_sdxl_arch.py when missing)",
             "  ldm-export " + " ".join(export_cmd(a))]
    if a.make_int8:
        lines.append("  ldm-export " + " ".join(int8_cmd(a)))
    for name in a.rows:
        row = (TINY_ROWS if a.tiny else ROWS)[name]
        lines.append(f"row {name}: {row['size']}², {row['steps']} steps, guidance "
                     f"{row['guidance']:g}, {SCHEDULER}"
                     + (f" ({row['spacing']} timesteps)" if row["spacing"] else ""))
        for p in ("diffusers", *(f"ours-{p}" for p in a.precisions)):
            lines.append(f"  candidate {p}: {a.warmup} warm-up + {a.repeats} counted, "
                         f"{a.threads} threads, own process")
    for mode in a.modes:
        lines.append(f"mode {mode}: ldm-run " + shlex.join(mode_argv(mode, a, a.out / "x.png")))
    return lines


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="SDXL diffusers folder (default OUT/sdxl-arch, built when missing)")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="its bundle (default OUT/sdxl-bundle, exported when missing)")
    ap.add_argument("--make-int8", action="store_true",
                    help="add the INT8 U-Net to the bundle when it has none")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--modes", default=DEFAULT_MODES,
                    help=f"ldm-run memory modes, comma list of {', '.join(MODES)}; '' for none")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--vae-tile-size", type=int, default=None,
                    help=f"the tiling modes' tile (default {BASE_VAE_TILE}; tiny: ldm-run's)")
    ap.add_argument("--repeats", type=int, default=1, help="counted rounds (median)")
    ap.add_argument("--warmup", type=int, default=0, help="uncounted rounds first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="the tiny SDXL (export/tiny_sdxl.py)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--dry-run", action="store_true", help="print the plan; build nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return a
    a.rows = [r for r in a.rows.split(",") if r]
    a.modes = [m for m in a.modes.split(",") if m]
    a.precisions = [p for p in a.precisions.split(",") if p]
    for values, known, what in ((a.rows, ROWS, "row"), (a.modes, MODES, "mode"),
                                (a.precisions, PRECISIONS, "precision")):
        for v in values:
            if v not in known:
                ap.error(f"unknown {what} {v!r}: use {', '.join(known)}")
    if a.repeats < 1 or a.warmup < 0:
        ap.error("--repeats must be at least 1 and --warmup at least 0")
    a.model_dir = a.model_dir or a.out / ("tiny-sdxl" if a.tiny else "sdxl-arch")
    a.bundle = a.bundle or a.out / ("tiny-sdxl-bundle" if a.tiny else "sdxl-bundle")
    return a


def main(argv=None) -> None:
    a = parse(argv)
    if a.worker:
        return worker(json.loads(a.worker))
    if a.dry_run:
        print("\n".join(plan(a)))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    report = {"command": " ".join(["python benchmarks/bench_sdxl.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              "cpu": cpu_name(), "prepared": prepare(a), "rows": []}
    for name in a.rows:
        report["rows"].append(measure_row(name, a))
        (a.out / "results.partial.json").write_text(json.dumps(report, default=str))
    baseline = next((r["medians"]["diffusers"]["peak_rss_mb"] for r in report["rows"]
                     if r["row"] == "base-1024"), None)
    if a.modes:
        report["modes"] = measure_modes(a, baseline)
    if has_int8(a.bundle):
        report["int8_quality"] = json.loads((a.bundle / "manifest.json").read_text()).get(
            "quality", {}).get("int8")
    report["wall_s"] = time.time() - t0
    write_reports(report, a.out)


if __name__ == "__main__":
    main()
