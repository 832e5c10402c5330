"""What applying a LoRA costs: process start → first U-Net step, with and without one,
ldm-edge's runtime beside diffusers' ``load_lora_weights`` + ``fuse_lora``.

    python benchmarks/bench_lora.py --model-dir DIFFUSERS_FOLDER --bundle BUNDLE \\
        [--size 256] [--threads 2] [--repeats 3] [--out out/bench/lora]

The bundle must have the U-Net's weights map (bundles exported before LoRA support lack
one: ``make bench`` adds it, benchmarks/bench_models.py ``add_weights_maps``). A PEFT LoRA
for the folder's U-Net (rank 8 on to_q/to_k/to_v/to_out.0, seeded, lora_B random and small
so it changes the weights) is made once with ``StableDiffusionPipeline.save_lora_weights``
and cached in the out folder. Then four candidates, each in a fresh process, interleaved,
the first round uncounted (it warms the page cache), medians of the rest:

* ours:            ``Pipeline(bundle)``                      → first U-Net call done
* ours + LoRA:     ``Pipeline(bundle, loras=[(file, 1.0)])`` → first U-Net call done
* diffusers:       ``from_pretrained``                       → first U-Net call done
* diffusers + LoRA: + ``load_lora_weights(file)``, ``fuse_lora(lora_scale=1.0)``

Each process opens all its models first (ours: every session; diffusers loads every model),
runs the text encoder, then stops after the first U-Net call (guidance on: batch 2). Writes
<out>/results.json and results.md (a markdown table naming the CPU).
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

KINDS = ("ours", "ours-lora", "diffusers", "diffusers-lora")
RANK = 8
TARGETS = ["to_k", "to_out.0", "to_q", "to_v"]
LORA_SEED = 0
# lora_B's spread: B is zero at init in training recipes; small and non-zero here, so the
# merge changes every targeted weight without blowing the activations up
LORA_B_STD = 0.02
LORA_FILE = "bench-lora.safetensors"
PROMPT = "a red circle in the top left on a white background"


class FirstStepDone(Exception):
    """Raised from the first U-Net call's wrapper: the measurement ends there."""


# -- the LoRA -----------------------------------------------------------------------------
def make_lora(model_dir: Path, out: Path) -> Path:
    """The seeded rank-8 PEFT LoRA of ``model_dir``'s U-Net, made once (cached in ``out``)."""
    file, note_path = out / LORA_FILE, out / "bench-lora.json"
    note = {"model_dir": str(Path(model_dir).resolve()), "rank": RANK, "targets": TARGETS,
            "seed": LORA_SEED, "lora_b_std": LORA_B_STD}
    if file.is_file() and note_path.is_file() and json.loads(note_path.read_text()) == note:
        return file
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    print(f"making the benchmark LoRA (rank {RANK}, seed {LORA_SEED}) for {model_dir}", flush=True)
    torch.manual_seed(LORA_SEED)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dir) / "unet")
    cfg = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=True)
    unet.add_adapter(cfg)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, LORA_B_STD)
    meta = cfg.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])  # a set: sorted for the same bytes
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name=LORA_FILE, unet_lora_adapter_metadata=meta)
    note_path.write_text(json.dumps(note))
    return file


# -- one measured process ---------------------------------------------------------------
def child_ours(a) -> dict:
    import numpy as np

    from ldm_edge.runtime.pipeline import Pipeline

    t_imported = time.time()
    loras = [(a.lora, 1.0)] if a.kind == "ours-lora" else None
    pipe = Pipeline(a.bundle, backend="onnxruntime", device="cpu", threads=a.threads,
                    verify=False, ort_cache=False, loras=loras)
    for name in ("text_encoder", "unet", "vae_decoder"):
        pipe.backend(name)  # open every session first, as diffusers loads every model first
    t_loaded = time.time()
    lora_merge = pipe.timings.lora
    first = {}

    def first_unet_call(call):
        if call.name == "unet":
            first["unet_call_s"], first["t"] = call.seconds, time.time()
            raise FirstStepDone
    pipe.add_call_hook(first_unet_call)
    latents = np.load(a.latents)
    try:
        pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, scheduler="ddim",
             height=a.size, width=a.size, latents=latents)
    except FirstStepDone:
        pass
    return {"t_imported": t_imported, "t_loaded": t_loaded, "lora_s": lora_merge, **first}


def child_diffusers(a) -> dict:
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(a.threads)
    t_imported = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(a.model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    lora_s = None
    if a.kind == "diffusers-lora":
        t0 = time.perf_counter()
        pipe.load_lora_weights(str(Path(a.lora).parent), weight_name=Path(a.lora).name)
        pipe.fuse_lora(lora_scale=1.0)
        lora_s = time.perf_counter() - t0
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    t_loaded = time.time()
    original, first = pipe.unet.forward, {}

    def forward(*args, **kw):
        t0 = time.perf_counter()
        original(*args, **kw)
        first["unet_call_s"], first["t"] = time.perf_counter() - t0, time.time()
        raise FirstStepDone
    pipe.unet.forward = forward
    latents = torch.from_numpy(np.load(a.latents))
    try:
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=a.size, width=a.size,
                 latents=latents, output_type="latent")
    except FirstStepDone:
        pass
    return {"t_imported": t_imported, "t_loaded": t_loaded, "lora_s": lora_s, **first}


def child(a) -> None:
    res = (child_ours if a.kind.startswith("ours") else child_diffusers)(a)
    if "t" not in res:
        raise SystemExit(f"{a.kind}: the U-Net was never called")
    out = {"first_step_s": res["t"] - a.t_spawn, "import_s": res["t_imported"] - a.t_spawn,
           "load_s": res["t_loaded"] - res["t_imported"], "lora_s": res["lora_s"],
           "unet_call_s": res["unet_call_s"]}
    Path(a.result).write_text(json.dumps(out))


# -- the driver -----------------------------------------------------------------------------
def run_child(kind: str, a, lora: Path, latents: Path, result: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model-dir", str(a.model_dir),
           "--bundle", str(a.bundle), "--lora", str(lora), "--latents", str(latents),
           "--size", str(a.size), "--threads", str(a.threads), "--result", str(result),
           "--t-spawn", str(time.time())]
    env = {k: v for k, v in os.environ.items() if k != "LDM_EDGE_ORT_CACHE"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if r.returncode:
        raise SystemExit(f"bench_lora: {kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(result.read_text())


def cpu_name() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(ln.split(":", 1)[1].strip() for ln in out.splitlines()
                     if ln.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    vnni = "yes" if " avx512_vnni" in flags else "no"
    return f"{model}, {os.cpu_count()} cores, avx512_vnni {vnni}"


def measure(model_dir, bundle, *, size: int, threads: int, repeats: int, out: Path,
            name: str = "") -> dict:
    """Make the LoRA (once), run the four candidates interleaved; returns the medians."""
    import numpy as np

    from ldm_edge.runtime.bundle.schema import read_manifest_json

    bundle, model_dir, out = Path(bundle), Path(model_dir), Path(out)
    manifest = read_manifest_json(bundle)
    if manifest.components["unet"].weights_map is None:
        raise SystemExit(f"bench_lora: {bundle} has no U-Net weights map (exported before LoRA "
                         f"support): re-export it, or add one (bench_models.add_weights_maps)")
    out.mkdir(parents=True, exist_ok=True)
    lora = make_lora(model_dir, out)
    latents = out / f"latents-{size}.npy"
    if not latents.is_file():
        np.save(latents, np.random.default_rng(1).standard_normal(
            (1, manifest.latent_channels, size // 8, size // 8), dtype=np.float32))
    runs = {k: [] for k in KINDS}
    for rep in range(repeats + 1):  # round 0 warms the page cache: not counted
        for kind in KINDS:
            res = run_child(kind, argparse.Namespace(model_dir=model_dir, bundle=bundle, size=size,
                                                     threads=threads),
                            lora, latents, out / f"{kind}-{rep}.json")
            if rep:
                runs[kind].append(res)
            print(f"  lora bench {name} {kind} round {rep}: first step {res['first_step_s']:.2f}s"
                  + (f" (LoRA {res['lora_s']:.2f}s)" if res["lora_s"] is not None else ""),
                  flush=True)
    med = {k: {m: (statistics.median(r[m] for r in rs) if rs[0][m] is not None else None)
               for m in rs[0]} for k, rs in runs.items()}
    return {"model": name or model_dir.name, "size": size, "threads": threads, "repeats": repeats,
            "cpu": cpu_name(), "medians": med, "runs": runs}


def markdown(res: dict) -> str:
    m = res["medians"]
    ours_add = m["ours-lora"]["first_step_s"] - m["ours"]["first_step_s"]
    diff_add = m["diffusers-lora"]["first_step_s"] - m["diffusers"]["first_step_s"]
    rows = [("ldm-edge (onnxruntime fp32)", "ours", ours_add, "merge in numpy"),
            ("diffusers (PyTorch eager)", "diffusers", diff_add, "load_lora_weights + fuse_lora")]
    title = (f"### LoRA cost, {res['model']} ({res['size']}², {res['threads']} threads, median "
             f"of {res['repeats']}; {res['cpu']})")
    head = ("| runtime | start → first U-Net step, no LoRA (s) | with the LoRA (s) "
            "| added by the LoRA (s) | of which the LoRA step (s) | added cost vs diffusers' |")
    lines = [title, "", head, "|---|---|---|---|---|---|"]
    diff_step = m["diffusers-lora"]["lora_s"]
    for label, k, add, how in rows:
        lora_s = m[f"{k}-lora"]["lora_s"]
        # added time, then the LoRA step alone (less noisy: one span inside one process)
        ratio = ((f"{add / diff_add:.2f}×" if diff_add > 0 else "–")
                 + (f" (step {lora_s / diff_step:.2f}×)" if diff_step else ""))
        lines.append(f"| {label} | {m[k]['first_step_s']:.2f} | {m[f'{k}-lora']['first_step_s']:.2f} "
                     f"| {add:+.2f} | {lora_s:.2f} ({how}) | {ratio if k == 'ours' else '1×'} |")
    phases = [("imports", "import_s"), ("load (with the LoRA step)", "load_s"),
              ("text encoder + first U-Net call", "rest"), ("total", "first_step_s")]
    lines += ["", "| phase, median of each (they need not add up) (s) | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for label, key in phases:
        cells = [m[k]["first_step_s"] - m[k]["import_s"] - m[k]["load_s"] if key == "rest"
                 else m[k][key] for k in KINDS]
        lines.append(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    note = (f"LoRA: rank {RANK} on {'/'.join(TARGETS)} of every attention block, scale 1.0 "
            f"(benchmarks/bench_lora.py). Each figure is a fresh process: start → the first "
            f"U-Net call (batch 2, guidance on) has returned; all models loaded first.")
    lines += ["", note]
    return "\n".join(lines)


def profile_merge(bundle: Path, lora: Path, top: int = 12) -> None:
    """Where the numpy merge's time goes: cProfile of reading the LoRA and merging it into
    the U-Net's weights (``LoraWeights``, runtime/lora/apply.py), no session built."""
    import cProfile
    import pstats

    from ldm_edge.runtime.bundle.opener import open_bundle
    from ldm_edge.runtime.lora.apply import LoraWeights

    weights = LoraWeights(open_bundle(bundle, False))
    t0 = time.perf_counter()
    lora_set = weights.load([(str(lora), 1.0)])
    print(f"reading the LoRA: {time.perf_counter() - t0:.2f} s")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(weights.graph_weights, lora_set, "unet")
    print(f"merging it into the U-Net's weights: {time.perf_counter() - t0:.2f} s")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="the diffusers folder the bundle was exported from")
    ap.add_argument("--bundle", type=Path, help="its ldm-edge bundle (with a U-Net weights map)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="counted rounds (default 3)")
    ap.add_argument("--out", type=Path, default=Path("out/bench/lora"),
                    help="where the LoRA, the runs and results.{json,md} go")
    ap.add_argument("--name", default="", help="the model's name in the table")
    ap.add_argument("--profile-merge", action="store_true",
                    help="only profile our merge of the (cached) LoRA, in this process")
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--lora", help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--t-spawn", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.kind = a.child
        return child(a)
    if a.model_dir is None or a.bundle is None:
        ap.error("give --model-dir and --bundle")
    for p, what in ((a.model_dir / "model_index.json", "a diffusers folder"),
                    (a.bundle / "manifest.json", "a bundle")):
        if not p.is_file():
            ap.error(f"{p.parent} is not {what} (no {p.name})")
    if a.profile_merge:
        return profile_merge(a.bundle, make_lora(a.model_dir, a.out))
    res = measure(a.model_dir, a.bundle, size=a.size, threads=a.threads, repeats=a.repeats,
                  out=a.out, name=a.name)
    md = markdown(res)
    cmd = " ".join(["python benchmarks/bench_lora.py", *(argv if argv is not None else sys.argv[1:])])
    (a.out / "results.json").write_text(json.dumps({"command": cmd, **res}, indent=2))
    (a.out / "results.md").write_text(f"Command: `{cmd}`\n\n{md}\n")
    print(md)
    print(f"wrote {a.out / 'results.json'}, {a.out / 'results.md'}")


if __name__ == "__main__":
    main()
