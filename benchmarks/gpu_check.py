"""GPU check: build TensorRT engines, run the GPU test tier, time the stages, write a report.

    python benchmarks/gpu_check.py [--out out/gpu-check] [--steps 20] [--repeats 5]

On one CUDA machine with TensorRT (a GPU server or a Jetson):
1. bundles: the demo model (when its weights are installed) and a tiny random SD1 model, each
   made with `ldm-export onnx`, `ldm-export fp16` and, where that command exists, `ldm-export int8`;
2. FP16 and INT8 TensorRT engines: `ldm-export engines BUNDLE --precision fp16|int8`;
3. `pytest -m gpu`;
4. per-stage latency (text encoder, U-Net per step, VAE decoder, end to end), medians after a
   warm-up run, TensorRT vs onnxruntime's CUDA provider vs PyTorch (when it has CUDA), all in
   this one process on this one GPU — compare ratios, not numbers from other machines;
5. OUT/report.md and OUT/report.json.
Where TensorRT, cuda-python, Polygraphy or a GPU is missing: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPORT = [sys.executable, "-m", "ldm_edge.export.cli"]
PROMPT = "a red circle in the top left on a white background"
# 64-256 px and 1-2 images keep the tiny model's engines quick to build.
TINY_SIZES = ["--min-size", "64", "--max-size", "256", "--max-batch", "2"]


def fail(msg: str, code: int = 2):
    print(f"gpu-check: error: {msg}", file=sys.stderr)
    sys.exit(code)


def machine() -> dict:
    """The GPU facts, or one line and exit 2 where something is missing."""
    from ldm_edge.runtime.backends.trt_engines import TensorRTUnavailable, device_facts

    try:
        facts = device_facts()
        import polygraphy
    except TensorRTUnavailable as e:
        fail(str(e))
    except ImportError:
        fail("Polygraphy is not installed (pip install polygraphy)")
    import onnxruntime as ort

    return {"gpu": facts.device_name, "compute_capability": facts.compute_capability,
            "tensorrt": facts.trt_version, "polygraphy": polygraphy.__version__,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "python": platform.python_version(), "host": platform.node()}


class Steps:
    """Runs the export commands, logging each to OUT/logs/, recording time and outcome."""

    def __init__(self, out: Path):
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.done: list[dict] = []

    def run(self, label: str, args: list[str], timeout: int = 7200) -> bool:
        t0 = time.perf_counter()
        print(f"[gpu-check] {label}", file=sys.stderr, flush=True)
        try:
            r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout)
            rc, text = r.returncode, r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            rc, text = 124, f"timed out after {timeout} s"
        log = self.logs / (re.sub(r"[^A-Za-z0-9.]+", "_", label) + ".log")
        log.write_text(" ".join(map(str, args)) + "\n\n" + text)
        last = (text.strip().splitlines() or [""])[-1][:300]
        self.done.append({"step": label, "ok": rc == 0, "rc": rc,
                          "seconds": round(time.perf_counter() - t0, 1), "last_line": last,
                          "log": str(log.relative_to(self.logs.parent))})
        return rc == 0


def has_int8_command() -> bool:
    r = subprocess.run(EXPORT + ["--help"], capture_output=True, text=True, cwd=REPO)
    return re.search(r"^\s+int8\s", r.stdout, re.M) is not None


def make_bundles(out: Path, steps: Steps) -> dict[str, dict]:
    """name -> {"bundle", "source"}; each with fp16 (and int8) graphs and engines."""
    from ldm_edge.export.load import default_source
    from ldm_edge.export.tiny import save_tiny

    sources = {"tiny-sd1": (save_tiny(out / "models" / "tiny_sd1", "sd1", seed=0), TINY_SIZES)}
    demo = default_source()
    if demo is not None:
        sources["demo"] = (demo, ["--max-batch", "1"])
    int8 = has_int8_command()
    bundles = {}
    for name, (src, sizes) in sources.items():
        b = out / "bundles" / name
        ok = steps.run(f"{name} onnx", EXPORT + ["onnx", str(src), "-o", str(b), "--force", *sizes])
        ok = ok and steps.run(f"{name} fp16", EXPORT + ["fp16", str(b)])
        if ok and int8:
            steps.run(f"{name} int8", EXPORT + ["int8", str(b)])
        if not ok:
            continue
        for prec in ("fp16", "int8"):
            if prec == "int8" and not (int8 and _has_variant(b, "unet", "int8")):
                continue
            sizes = ["--max-batch", "1"] if name == "demo" else []
            steps.run(f"{name} engines {prec}",
                      EXPORT + ["engines", str(b), "--precision", prec, *sizes])
        bundles[name] = {"bundle": b, "source": src}
    return bundles


def _has_variant(bundle: Path, component: str, precision: str) -> bool:
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    return precision in read_manifest_json(bundle).precisions(component)


def _has_engine(bundle: Path, precision: str) -> bool:
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    engines = read_manifest_json(bundle).components["unet"].engines
    return any(e.precision == precision for e in engines)


def run_pytest(out: Path, steps: Steps) -> dict:
    ok = steps.run("pytest -m gpu", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-ra",
                                     "tests"], timeout=7200)
    return {"ok": ok, "summary": steps.done[-1]["last_line"], "log": steps.done[-1]["log"]}


# -- timing -------------------------------------------------------------------------------------
def _med(xs) -> float:
    return round(1000 * statistics.median(xs), 3) if xs else float("nan")


def time_pipeline(bundle: Path, backend: str, precision: str, device: str, steps: int,
                  repeats: int) -> dict:
    """Medians (ms) of the runtime pipeline's own per-stage timings, after one warm-up image."""
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle, backend=backend, precision=precision, device=device)
    try:
        pipe(PROMPT, num_inference_steps=steps, seed=0)  # warm-up: engines load, kernels tune
        runs = [pipe(PROMPT, num_inference_steps=steps, seed=i).timings for i in range(repeats)]
        kinds = {n: type(b).__name__ for n, b in pipe.open_components.items()}
    finally:
        pipe.close()
    return {"text_encoder_ms": _med([t.text_encoder for t in runs]),
            "unet_step_ms": _med([s for t in runs for s in t.unet_per_step]),
            "vae_decoder_ms": _med([t.vae_decoder for t in runs]),
            "total_ms": _med([t.total for t in runs]), "backends": kinds}


def time_torch(source: Path, name: str, steps: int, repeats: int) -> dict:
    """The same stages in PyTorch (FP16 on CUDA): encode_prompt, one U-Net call, one decode."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch here has no CUDA")
    if name == "demo":
        from ldm_edge.demo.diffusers_pipe import demo_pipeline
        pipe = demo_pipeline(source)
    else:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                       requires_safety_checker=False)
    pipe = pipe.to("cuda", torch.float16)
    size = int(pipe.unet.config.sample_size)

    def timed(fn):
        with torch.inference_mode():
            fn()
            torch.cuda.synchronize()
            out = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                out.append(time.perf_counter() - t0)
        return out

    with torch.inference_mode():
        emb = torch.cat(pipe.encode_prompt(PROMPT, "cuda", 1, True, "")[::-1])
    lat = torch.randn(2, pipe.unet.config.in_channels, size, size, device="cuda",
                      dtype=torch.float16)
    text = timed(lambda: pipe.encode_prompt(PROMPT, "cuda", 1, True, ""))
    unet = timed(lambda: pipe.unet(lat, 500, encoder_hidden_states=emb).sample)
    vae = timed(lambda: pipe.vae.decode(lat[:1]).sample)
    med = {k: _med(v) for k, v in (("text_encoder_ms", text), ("unet_step_ms", unet),
                                    ("vae_decoder_ms", vae))}
    med["total_ms"] = round(med["text_encoder_ms"] + steps * med["unet_step_ms"]
                            + med["vae_decoder_ms"], 3)  # sum of stages: no scheduler, no copies
    med["backends"] = {"all": "torch fp16 cuda"}
    return med


def benchmark(bundles: dict, steps: int, repeats: int, providers: list[str]) -> list[dict]:
    rows = []
    for name, info in bundles.items():
        b = info["bundle"]
        configs = [("tensorrt", p, "auto") for p in ("fp16", "int8") if _has_engine(b, p)]
        if "CUDAExecutionProvider" in providers:
            configs += [("onnxruntime", p, "cuda") for p in ("fp32", "fp16", "int8")
                        if _has_variant(b, "unet", p)]
        for backend, prec, device in configs:
            label = f"{backend}{'-cuda' if backend == 'onnxruntime' else ''} {prec}"
            rows.append(_measure(name, label, time_pipeline, b, backend, prec, device, steps,
                                 repeats))
        rows.append(_measure(name, "pytorch fp16", time_torch, info["source"], name, steps,
                             repeats))
    return rows


def _measure(bundle: str, label: str, fn, *args) -> dict:
    print(f"[gpu-check] timing {bundle}: {label}", file=sys.stderr, flush=True)
    try:
        return {"bundle": bundle, "config": label, **fn(*args)}
    except Exception as e:  # a missing provider or package is a row that says so, not a crash
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return {"bundle": bundle, "config": label, "skipped": f"{type(e).__name__}: {first}"}


# -- report -------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# gpu-check — {m['gpu']} (sm{m['compute_capability'].replace('.', '')}), "
             f"TensorRT {m['tensorrt']}", "",
             f"onnxruntime {m['onnxruntime']} ({', '.join(m['providers'])}), Polygraphy "
             f"{m['polygraphy']}, Python {m['python']}; {report['steps']} steps, medians of "
             f"{report['repeats']} runs after a warm-up. Timings are from this run on this GPU "
             f"only.", "", "## Steps", "", "| step | ok | s | last line |", "|---|---|---|---|"]
    for s in report["steps_run"]:
        lines.append(f"| {s['step']} | {'yes' if s['ok'] else '**no**'} | {s['seconds']} | "
                     f"`{s['last_line'].replace('|', '/')}` |")
    lines += ["", f"pytest -m gpu: {'passed' if report['pytest']['ok'] else '**FAILED**'} — "
              f"`{report['pytest']['summary']}`", "", "## Per-stage latency (ms)", "",
              "| bundle | config | text encoder | U-Net / step | VAE decoder | end to end |",
              "|---|---|---|---|---|---|"]
    for r in report["benchmark"]:
        if "skipped" in r:
            lines.append(f"| {r['bundle']} | {r['config']} | skipped: {r['skipped']} | | | |")
            continue
        lines.append(f"| {r['bundle']} | {r['config']} | {r['text_encoder_ms']} | "
                     f"{r['unet_step_ms']} | {r['vae_decoder_ms']} | {r['total_ms']} |")
    lines += ["", "PyTorch's end to end is the sum of its stages (no scheduler, no host copies).",
              "Component backends per config are in report.json."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    facts = machine()
    a.out.mkdir(parents=True, exist_ok=True)
    steps = Steps(a.out)
    bundles = make_bundles(a.out, steps)
    pytest_result = run_pytest(a.out, steps)
    rows = benchmark(bundles, a.steps, a.repeats, facts["providers"])
    report = {"machine": facts, "steps": a.steps, "repeats": a.repeats, "steps_run": steps.done,
              "pytest": pytest_result, "benchmark": rows,
              "bundles": {k: str(v["bundle"]) for k, v in bundles.items()}}
    (a.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (a.out / "report.md").write_text(markdown(report))
    bad = [s["step"] for s in steps.done if not s["ok"]]
    print(f"gpu-check: report in {a.out / 'report.md'}"
          + (f"; failed: {', '.join(bad)}" if bad else "; all steps passed"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
