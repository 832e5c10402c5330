"""GPU check: TensorRT engines for the demo and a tiny SD1 model, drawn against onnxruntime.

    python benchmarks/gpu_check.py [--out out/gpu-check] [--budget-s 540] [--dry-run]
                                   [--timeout-scale 1] [--bench] [--pytest]

One script for one CUDA machine with TensorRT, Polygraphy and cuda-python (a GPU server or a
Jetson), meant to finish in under 10 minutes. In order, each step a subprocess with its own
timeout (the constants below, times --timeout-scale) and all of them inside one global budget
(--budget-s): a step that would start after the budget is spent is skipped and reported so,
and a running one is stopped at it. A step whose input failed is skipped, naming that step.

For each of the two bundles, tiny-sd1 (a random tiny SD1 model written here) and demo (the
bundled demo model):
1. `ldm-export onnx`, `ldm-export fp16`, `ldm-export int8` (a small calibration);
2. `ldm-export engines --precision fp16` (static: one shape, the model's default size, one
   image; the demo's built --refittable, so the LoRA step below uses the same engines) and
   `ldm-export engines --precision int8 --components unet` (the other components run on
   their FP16 engines);
3. per precision, `ldm-run --backend tensorrt` and `ldm-run --backend onnxruntime --device
   cpu` with the same prompt, seed and steps: the 8-bit PSNR between the two pictures and
   ldm-run's own per-stage timings.
Then the demo LoRA (demo/weights/lora/top_center.safetensors) on the refittable FP16 engines:
`ldm-run --backend tensorrt --lora` vs `ldm-run --backend onnxruntime --lora` (PSNR), and a
probe that times opening the U-Net engine with the LoRA (refit) and without it.
Optional: --bench (warm medians: TensorRT vs onnxruntime's CUDA provider vs PyTorch) and
--pytest (`pytest -m gpu`); both need a larger --budget-s.

Writes OUT/report.md (a table to paste into docs/tensorrt.md, and every step with its
outcome) and OUT/report.json, prints the table, and exits 1 if any step did not pass.
--dry-run prints the steps, their commands and timeouts, and runs nothing.
Where TensorRT, cuda-python, Polygraphy or a GPU is missing: one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
EXPORT = (PY, "-m", "ldm_edge.export.cli")
LDM_RUN = (PY, "-m", "ldm_edge.runtime.cli.run")
SELF = (PY, str(Path(__file__).resolve()))
PROMPT = "a red circle in the top left on a white background"
# the demo LoRA's held-out prompt: a position the base model draws in the center (docs/lora.md)
LORA_PROMPT = "a blue triangle in the top center on a white background"
LORA_FILE = "demo/weights/lora/top_center.safetensors"  # relative to the repository
SEED = 0
# One sampler for the calibration and every run: Euler keeps both models' INT8 near FP32
# (40-45 dB), while DDIM on the tiny model amplifies any difference (25 dB), which would
# hide what TensorRT changes. Calibrating on one sampler also keeps that step to seconds.
SCHEDULER = "euler"
# 20 steps: the U-Net's per-step median is over 20 calls, still well under a second per run
RUN_STEPS = 20
# The reference: onnxruntime on the CPU is what every bundle's quality is measured with
# (the CUDA provider runs INT8 Q/DQ graphs poorly, and may not be installed).
REFERENCE_DEVICE = "cpu"
# Small captures keep the PyTorch-side steps to seconds: the check compares TensorRT with
# onnxruntime on the same graphs, not the variants' quality against FP32.
FP16_CAPTURE = ("--num-prompts", "2", "--steps", "4")
INT8_CALIBRATION = ("--num-prompts", "2", "--calib-steps", "4", "--schedulers", SCHEDULER)
TINY_EXPORT = ("--min-size", "64", "--max-size", "256", "--max-batch", "2")
DEMO_EXPORT = ("--max-batch", "1")
# One fixed shape per engine (the model's default size, one image): the quickest builds, and
# the shape ldm-run asks for below. text-to-image opens these three (no VAE encoder).
STATIC = ("--static",)
FP16_COMPONENTS = "text_encoder,unet,vae_decoder"

# -- timeouts (seconds). A PyTorch-side step's cap is 2-3x what it took here on 2 shared,
# busy CPU cores; a TensorRT step's is a guess for networks this small (report.json records
# what each took, to tune these by). Every cap also ends at the global budget, and the default
# plan's caps add up to no more than it.
BUDGET_S = 540  # 10 minutes of a GPU lease less a minute for the preflight and the report
MIN_STEP_S = 5  # less budget than this left: the step is skipped, not started to be killed
MODEL_S = 25  # writing the random tiny SD1 model: 4-8 s here, mostly importing torch
ONNX_S = 30  # export + the PyTorch check at two shapes: tiny 6-9 s, demo 10-13 s here
FP16_S = 25  # capture, cast, check, fused-attention forms: 3-12 s here
INT8_S = 25  # 2 prompts x 4 steps, one sampler, the checks of both forms: 4-5 s here
ENGINES_FP16_S = 60  # three small networks, static shapes, the shared timing cache
ENGINES_INT8_S = 40  # the U-Net alone; its FP16 tactics are in the timing cache by then
RUN_TRT_S = 15  # ldm-run: imports, three engines deserialised, 20 steps at 64-128 px
RUN_ORT_S = 8  # ldm-run on the CPU: about 1 s here
REFIT_PROBE_S = 20  # opens the U-Net engine 7 times and draws two pictures
BENCH_S = 120  # --bench: up to four configs, each a warm-up and the repeats
TORCH_S = 90  # --bench: diffusers on CUDA, one model
PYTEST_S = 900  # --pytest: pytest -m gpu builds its own engines
KILL_WAIT_S = 10  # after a step is killed at its timeout: the wait for its last output

BUNDLES = ("tiny-sd1", "demo")
PRECISIONS = ("fp16", "int8")


# -- the plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]
    timeout_s: float
    needs: tuple[str, ...] = ()
    tool: str | None = None  # "ldm-export" or "ldm-run": whose flags argv uses
    png: str | None = None  # the picture it writes, relative to OUT


@dataclass(frozen=True)
class Row:
    """One row of the report's table: a bundle at a precision, TensorRT against onnxruntime."""
    bundle: str
    precision: str
    build: str  # the step that built its engines
    trt: str  # the ldm-run step on TensorRT
    ort: str  # the ldm-run step on onnxruntime
    lora: bool = False
    probe: str | None = None  # the refit probe step


def _ldm_run(name, bundle: Path, backend: str, precision: str, png: str, out: Path, *,
             needs, prompt=PROMPT, lora: Path | None = None) -> Step:
    device = ("--device", REFERENCE_DEVICE) if backend == "onnxruntime" else ()
    extra = ("--lora", f"{lora}:1") if lora else ()
    argv = (*LDM_RUN, str(bundle), "-p", prompt, "--seed", str(SEED), "--steps", str(RUN_STEPS),
            "--scheduler", SCHEDULER, "--backend", backend, *device, "--precision", precision,
            *extra, "-o", str(out / png))
    return Step(name, argv, RUN_TRT_S if backend == "tensorrt" else RUN_ORT_S, needs,
                "ldm-run", png)


def _bundle_steps(name: str, out: Path) -> tuple[list[Step], list[Row]]:
    b = out / "bundles" / name
    steps = []
    if name == "tiny-sd1":
        model = out / "models" / name
        code = "import sys; from ldm_edge.export.tiny import save_tiny; save_tiny(sys.argv[1])"
        steps.append(Step(f"{name} model", (PY, "-c", code, str(model)), MODEL_S))
        source, flags, first = (str(model),), TINY_EXPORT, (f"{name} model",)
    else:  # no SOURCE: the bundled demo model
        source, flags, first = (), DEMO_EXPORT, ()
    refit = ("--refittable",) if name == "demo" else ()
    cache = ("--timing-cache", str(out / "trt-timing.cache"))
    steps += [
        Step(f"{name} onnx", (*EXPORT, "onnx", *source, "-o", str(b), "--force", *flags), ONNX_S,
             first, "ldm-export"),
        Step(f"{name} fp16", (*EXPORT, "fp16", str(b), *FP16_CAPTURE), FP16_S, (f"{name} onnx",),
             "ldm-export"),
        Step(f"{name} int8", (*EXPORT, "int8", str(b), *INT8_CALIBRATION), INT8_S,
             (f"{name} onnx",), "ldm-export"),
        Step(f"{name} engines fp16", (*EXPORT, "engines", str(b), "--precision", "fp16", *STATIC,
                                      "--components", FP16_COMPONENTS, *refit, *cache),
             ENGINES_FP16_S, (f"{name} fp16",), "ldm-export"),
        Step(f"{name} engines int8", (*EXPORT, "engines", str(b), "--precision", "int8", *STATIC,
                                      "--components", "unet", *cache),
             ENGINES_INT8_S, (f"{name} int8",), "ldm-export"),
    ]
    rows = []
    for prec in PRECISIONS:
        built = (f"{name} engines {prec}",) + ((f"{name} engines fp16",) if prec == "int8" else ())
        trt, ort = f"{name} ldm-run tensorrt {prec}", f"{name} ldm-run onnxruntime {prec}"
        steps += [_ldm_run(trt, b, "tensorrt", prec, f"pictures/{name}-{prec}-tensorrt.png", out,
                           needs=built),
                  _ldm_run(ort, b, "onnxruntime", prec, f"pictures/{name}-{prec}-onnxruntime.png",
                           out, needs=tuple(dict.fromkeys((f"{name} {prec}", f"{name} fp16"))))]
        rows.append(Row(name, prec, f"{name} engines {prec}", trt, ort))
    return steps, rows


def _lora_steps(out: Path) -> tuple[list[Step], list[Row]]:
    """The demo LoRA on the demo's refittable FP16 engines, against onnxruntime with it."""
    b, lora = out / "bundles" / "demo", REPO / LORA_FILE
    trt, ort, probe = "demo lora ldm-run tensorrt fp16", "demo lora ldm-run onnxruntime fp16", \
        "demo lora refit probe"
    steps = [
        _ldm_run(trt, b, "tensorrt", "fp16", "pictures/demo-lora-fp16-tensorrt.png", out,
                 needs=("demo engines fp16",), prompt=LORA_PROMPT, lora=lora),
        _ldm_run(ort, b, "onnxruntime", "fp16", "pictures/demo-lora-fp16-onnxruntime.png", out,
                 needs=("demo fp16",), prompt=LORA_PROMPT, lora=lora),
        Step(probe, (*SELF, "--child", "refit", str(b), str(lora)), REFIT_PROBE_S,
             ("demo engines fp16",)),
    ]
    return steps, [Row("demo", "fp16", "demo engines fp16", trt, ort, lora=True, probe=probe)]


def plan(out: Path, *, bench: bool = False, pytest: bool = False) -> tuple[list[Step], list[Row]]:
    """Every step in the order it runs, and the rows of the report's table."""
    steps, rows = [], []
    for name in BUNDLES:
        s, r = _bundle_steps(name, out)
        steps += s
        rows += r
    s, r = _lora_steps(out)
    steps += s
    rows += r
    if bench:
        for name in BUNDLES:
            b = out / "bundles" / name
            steps.append(Step(f"{name} bench", (*SELF, "--child", "bench", str(b)), BENCH_S,
                              (f"{name} engines fp16",)))
        tiny = out / "models" / "tiny-sd1"
        steps += [Step("tiny-sd1 pytorch", (*SELF, "--child", "torch", "tiny-sd1", str(tiny)),
                       TORCH_S, ("tiny-sd1 model",)),
                  Step("demo pytorch", (*SELF, "--child", "torch", "demo", ""), TORCH_S)]
    if pytest:
        steps.append(Step("pytest -m gpu", (PY, "-m", "pytest", "-m", "gpu", "-q", "-ra", "tests"),
                          PYTEST_S))
    return steps, rows


def shown(argv) -> str:
    """A command as a reader would type it: ``python`` for this interpreter, paths as given."""
    return shlex.join("python" if a == PY else a for a in argv)


def print_plan(steps: list[Step], budget_s: float, scale: float) -> None:
    total = sum(s.timeout_s * scale for s in steps)
    print(f"gpu-check plan: {len(steps)} steps; their timeouts sum to {total:.0f} s of the "
          f"{budget_s:.0f} s budget" + ("" if total <= budget_s else
                                        " (the last steps may be skipped at the budget)"))
    for i, s in enumerate(steps, 1):
        needs = f"   [after: {', '.join(s.needs)}]" if s.needs else ""
        print(f"{i:3d}. {s.name:<36} {s.timeout_s * scale:5.0f} s  {shown(s.argv)}{needs}")
    print("then: the 8-bit PSNR of each TensorRT picture against onnxruntime's, report.md and "
          "report.json")


# -- running ------------------------------------------------------------------------------------
def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


class Runner:
    """Runs steps in order inside one deadline; logs each to OUT/logs/ and records it."""

    def __init__(self, out: Path, budget_s: float, scale: float = 1.0):
        self.out, self.budget_s, self.scale = out, budget_s, scale
        self.deadline = time.monotonic() + budget_s
        self.logs = out / "logs"
        self.records: dict[str, dict] = {}

    def run(self, step: Step) -> dict:
        rec = {"step": step.name, "command": shown(step.argv),
               "timeout_s": round(step.timeout_s * self.scale, 1)}
        blocked = [n for n in step.needs if self.records.get(n, {}).get("status") != "ok"]
        left = self.deadline - time.monotonic()
        if blocked:
            why = self.records.get(blocked[0], {}).get("status", "not run")
            rec.update(status="skipped", reason=f"needs {blocked[0]} ({why})")
        elif left < MIN_STEP_S:
            rec.update(status="skipped", reason=f"the {self.budget_s:.0f} s budget was spent")
        else:
            rec.update(self._execute(step, min(step.timeout_s * self.scale, left),
                                     cut=left < step.timeout_s * self.scale))
        self.records[step.name] = rec
        mark = rec["status"] + (f" ({rec['seconds']} s)" if "seconds" in rec else "")
        print(f"[gpu-check] {step.name}: {mark}", file=sys.stderr, flush=True)
        return rec

    def _execute(self, step: Step, timeout: float, cut: bool) -> dict:
        print(f"[gpu-check] {step.name} (at most {timeout:.0f} s)", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if step.png:
            (self.out / step.png).parent.mkdir(parents=True, exist_ok=True)
        rc, stdout, stderr = call(step.argv, timeout)
        seconds = round(time.perf_counter() - t0, 1)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / (re.sub(r"[^A-Za-z0-9.]+", "_", step.name) + ".log")
        log.write_text(shown(step.argv) + "\n\n" + stdout + "\n" + stderr)
        rec = {"seconds": seconds, "rc": rc, "log": log.relative_to(self.out).as_posix()}
        if rc is None:
            limit = f"the {self.budget_s:.0f} s budget" if cut else f"its {timeout:.0f} s timeout"
            said = last_line(stderr) or last_line(stdout)
            return {**rec, "status": "failed", "last_line": f"stopped at {limit}"
                    + (f" (its last output: {said[:150]})" if said else "")}
        if rc != 0:
            return {**rec, "status": "failed", "last_line": last_line(stderr) or last_line(stdout)}
        rec.update(status="ok", last_line=last_line(stderr) or last_line(stdout))
        if step.tool == "ldm-run":
            rec["timings"] = parse_timings(stderr)
        elif "--child" in step.argv:
            try:
                rec["result"] = json.loads(last_line(stdout))
            except ValueError:
                rec.update(status="failed", last_line=f"no JSON result: {last_line(stdout)!r}")
        return rec


def call(argv, timeout: float) -> tuple[int | None, str, str]:
    """(exit code or None when stopped at ``timeout``, stdout, stderr). The command runs in a
    process group of its own, so a timeout stops whatever it started too."""
    proc = subprocess.Popen(list(argv), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (AttributeError, ProcessLookupError, PermissionError):
            proc.kill()
        try:
            out, err = proc.communicate(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # something outside the group holds its pipes
            out, err = "", ""
        return None, out, err


TIMING_ROWS = {"text encoder": "text_encoder_ms", "unet per step (median)": "unet_step_ms",
               "vae decoder": "vae_decoder_ms", "lora merge (numpy)": "lora_merge_ms",
               "total": "total_ms"}


def parse_timings(stderr: str) -> dict:
    """ldm-run's timing table (seconds) as milliseconds by stage."""
    found = {}
    for line in stderr.splitlines():
        m = re.match(r"^(.+?)\s+(\d+\.\d+)\s*$", line.strip())
        if m and m.group(1) in TIMING_ROWS:
            found[TIMING_ROWS[m.group(1)]] = round(1000 * float(m.group(2)), 3)
    return found


# -- results ------------------------------------------------------------------------------------
def picture_psnr(out: Path, a: str, b: str) -> float | None:
    import numpy as np
    from PIL import Image

    from ldm_edge.runtime.compare import psnr

    x, y = (np.asarray(Image.open(out / p).convert("RGB")) for p in (a, b))
    return round(psnr(x, y), 2) if x.shape == y.shape else None


def root_cause(name: str, records: dict, steps: dict) -> dict | None:
    """The record of the step that kept ``name`` from passing (itself, or the first failed
    step it waited for), or None when it passed."""
    rec = records.get(name, {"step": name, "status": "skipped", "reason": "not run"})
    if rec["status"] == "ok":
        return None
    if rec["status"] == "skipped":
        for need in steps[name].needs if name in steps else ():
            cause = root_cause(need, records, steps)
            if cause is not None:
                return cause
    return rec


def row_result(row: Row, records: dict, steps: dict, out: Path) -> dict:
    """What the report says about one row: its numbers, or why it has none."""
    res = {"bundle": row.bundle, "precision": row.precision, "lora": row.lora}
    build = records.get(row.build, {})
    if build.get("status") == "ok" and not row.lora:  # the LoRA row reuses the FP16 engines
        res["build_s"] = build["seconds"]
    trt, ort = records.get(row.trt, {}), records.get(row.ort, {})
    res["tensorrt"], res["onnxruntime"] = trt.get("timings"), ort.get("timings")
    if trt.get("status") == ort.get("status") == "ok":
        res["psnr_db"] = picture_psnr(out, steps[row.trt].png, steps[row.ort].png)
    if row.probe and records.get(row.probe, {}).get("status") == "ok":
        res["refit"] = records[row.probe].get("result")
    causes = [c for n in (row.trt, row.ort, row.probe) if n
              for c in [root_cause(n, records, steps)] if c is not None]
    if causes:
        c = causes[0]
        res["status"] = c["status"]
        res["why"] = f"{c['step']}: {c.get('last_line') or c.get('reason', '')}"
    else:
        res["status"] = "ok"
    return res


# -- report -------------------------------------------------------------------------------------
def _cell(value, fmt="{:g}") -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and value == float("inf"):
        return "identical"
    return fmt.format(value)


def _ms(timings, key) -> str:
    return _cell((timings or {}).get(key))


def results_table(rows: list[dict]) -> list[str]:
    """The table for docs/tensorrt.md: every row, with its numbers or why it has none."""
    lines = ["| bundle | precision | engines built (s) | TensorRT vs onnxruntime, 8-bit PSNR (dB) "
             "| text encoder (ms) | U-Net / step (ms) | VAE decoder (ms) | ldm-run total (ms) "
             "| onnxruntime CPU U-Net / step (ms) | LoRA refit (s) | status |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        trt, refit = r.get("tensorrt"), r.get("refit") or {}
        bundle = r["bundle"] + (" + demo LoRA" if r.get("lora") else "")
        prec = r["precision"] + (" (refittable)" if r["bundle"] == "demo" and
                                 r["precision"] == "fp16" else "")
        # the step that kept the row empty; its last line is in the steps table
        status = "ok" if r["status"] == "ok" else \
            f"**{r['status']}** at {r.get('why', '?').split(': ')[0]}"
        lines.append(
            f"| {bundle} | {prec} | {_cell(r.get('build_s'))} | {_cell(r.get('psnr_db'))} "
            f"| {_ms(trt, 'text_encoder_ms')} | {_ms(trt, 'unet_step_ms')} "
            f"| {_ms(trt, 'vae_decoder_ms')} | {_ms(trt, 'total_ms')} "
            f"| {_ms(r.get('onnxruntime'), 'unet_step_ms')} "
            f"| {_cell(refit.get('refit_s'))} | {status} |")
    return lines


def steps_table(records: list[dict]) -> list[str]:
    lines = ["| # | step | outcome | s | timeout (s) | last line |", "|--:|---|---|--:|--:|---|"]
    for i, s in enumerate(records, 1):
        text = (s.get("reason") or s.get("last_line") or "").replace("|", "/").replace("`", "'")
        outcome = s["status"] if s["status"] == "ok" else f"**{s['status']}**"
        lines.append(f"| {i} | {s['step']} | {outcome} | {_cell(s.get('seconds'))} "
                     f"| {_cell(s.get('timeout_s'))} | {text} |")
    return lines


def bench_table(records: list[dict]) -> list[str]:
    rows = [r for s in records if s.get("status") == "ok" and isinstance(s.get("result"), list)
            for r in s["result"]]
    if not rows:
        return []
    lines = ["", "## Warm medians (--bench, ms)", "",
             "| bundle | config | text encoder | U-Net / step | VAE decoder | end to end |",
             "|---|---|--:|--:|--:|--:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['bundle']} | {r['config']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['bundle']} | {r['config']} | {r['text_encoder_ms']} | "
                         f"{r['unet_step_ms']} | {r['vae_decoder_ms']} | {r['total_ms']} |")
    return lines


def markdown(report: dict) -> str:
    m = report.get("machine") or {}
    cc = str(m.get("compute_capability", "?")).replace(".", "")
    head = (f"gpu-check on {m.get('gpu', '?')} (sm{cc}), TensorRT {m.get('tensorrt', '?')}, "
            f"onnxruntime {m.get('onnxruntime', '?')}, Polygraphy {m.get('polygraphy', '?')}; "
            f"{report.get('seconds', '?')} s of a {_cell(report.get('budget_s'))} s budget.")
    notes = (f"Each row: `ldm-run` at the model's default size, {RUN_STEPS} {SCHEDULER} steps, "
             f"seed {SEED}, "
             f"on static TensorRT engines (the INT8 rows run the U-Net in INT8, the rest on "
             f"the FP16 engines) against `ldm-run --backend onnxruntime --device "
             f"{REFERENCE_DEVICE}` at the same precision; an INT8 row's build time is its "
             f"U-Net's alone. Timings are ldm-run's own table from "
             f"that one run (the U-Net's is the median over its steps; the total includes "
             f"opening the engines). LoRA refit: opening the U-Net engine with the LoRA minus "
             f"opening it without, the numpy merge not counted.")
    effect = [r["refit"]["lora_vs_base_psnr_db"] for r in report.get("rows", [])
              if (r.get("refit") or {}).get("lora_vs_base_psnr_db") is not None]
    if effect:
        notes += (f" The LoRA changed the TensorRT picture: {effect[0]} dB against the same "
                  f"engines without it.")
    lines = [head, "", *results_table(report.get("rows", [])), "", notes, "", "## Steps", "",
             *steps_table(report.get("steps", [])), *bench_table(report.get("steps", []))]
    return "\n".join(lines) + "\n"


# -- the preflight ------------------------------------------------------------------------------
def fail(msg: str, code: int = 2):
    print(f"gpu-check: error: {msg}", file=sys.stderr)
    sys.exit(code)


def machine() -> dict:
    """The GPU facts, or one line and exit 2 where something is missing."""
    from ldm_edge.runtime.backends.trt_engines import (TensorRTUnavailable, device_facts,
                                                       import_polygraphy)

    try:
        facts = device_facts()
        import_polygraphy()
    except TensorRTUnavailable as e:
        fail(str(e))
    import onnxruntime as ort
    import polygraphy

    return {"gpu": facts.device_name, "compute_capability": facts.compute_capability,
            "tensorrt": facts.trt_version, "polygraphy": polygraphy.__version__,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "python": platform.python_version(), "host": platform.node()}


# -- children: what runs in-process, in a subprocess of its own with a timeout ------------------
def _med(xs) -> float:
    return round(1000 * statistics.median(xs), 3) if xs else float("nan")


def refit_probe(bundle: str, lora: str, backend: str = "tensorrt", precision: str = "fp16",
                repeats: int = 3) -> dict:
    """Seconds to open the U-Net engine with the LoRA (numpy merge, then refit) and without,
    after a first picture has opened everything; and the LoRA's effect on the picture.
    (``backend``: the tests run it on onnxruntime, where there is no GPU.)"""
    from ldm_edge.runtime.compare import psnr
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle, backend=backend, precision=precision)
    try:
        base = pipe(LORA_PROMPT, num_inference_steps=RUN_STEPS, seed=SEED,
                    scheduler=SCHEDULER).images[0]
        with_lora, without, merge = [], [], []
        for _ in range(repeats):
            pipe.set_loras([(lora, 1.0)])
            m0, t0 = pipe.timings.lora or 0.0, time.perf_counter()
            pipe.backend("unet")
            with_lora.append(time.perf_counter() - t0)
            merge.append((pipe.timings.lora or 0.0) - m0)
            pipe.set_loras([])
            t0 = time.perf_counter()
            pipe.backend("unet")
            without.append(time.perf_counter() - t0)
        pipe.set_loras([(lora, 1.0)])
        drawn = pipe(LORA_PROMPT, num_inference_steps=RUN_STEPS, seed=SEED,
                    scheduler=SCHEDULER).images[0]
    finally:
        pipe.close()
    med = {k: statistics.median(v) for k, v in
           (("open_with_lora_s", with_lora), ("open_without_s", without), ("merge_s", merge))}
    refit = med["open_with_lora_s"] - med["open_without_s"] - med["merge_s"]
    return {**{k: round(v, 4) for k, v in med.items()}, "refit_s": round(refit, 4),
            "lora_vs_base_psnr_db": round(psnr(drawn, base), 2)}


def time_pipeline(bundle: str, backend: str, precision: str, device: str, repeats: int) -> dict:
    """Medians (ms) of the runtime pipeline's own per-stage timings, after one warm-up image."""
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle, backend=backend, precision=precision, device=device)
    try:
        # warm-up: engines load, kernels tune
        pipe(PROMPT, num_inference_steps=RUN_STEPS, seed=0, scheduler=SCHEDULER)
        runs = [pipe(PROMPT, num_inference_steps=RUN_STEPS, seed=i,
                     scheduler=SCHEDULER).timings for i in range(repeats)]
        kinds = {n: type(b).__name__ for n, b in pipe.open_components.items()}
    finally:
        pipe.close()
    return {"text_encoder_ms": _med([t.text_encoder for t in runs]),
            "unet_step_ms": _med([s for t in runs for s in t.unet_per_step]),
            "vae_decoder_ms": _med([t.vae_decoder for t in runs]),
            "total_ms": _med([t.total for t in runs]), "backends": kinds}


def bench(bundle: str, repeats: int = 5) -> list[dict]:
    """TensorRT's engines and onnxruntime's CUDA provider at each precision, warm medians."""
    import onnxruntime as ort

    from ldm_edge.runtime.bundle.schema import read_manifest_json

    m = read_manifest_json(Path(bundle))
    name = Path(bundle).name
    configs = [("tensorrt", p, "auto") for p in PRECISIONS
               if any(e.precision == p for e in m.components["unet"].engines)]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        configs += [("onnxruntime", p, "cuda") for p in ("fp32", *PRECISIONS)
                    if p in m.precisions("unet")]
    rows = []
    for backend, prec, device in configs:
        label = f"{backend}{'-cuda' if backend == 'onnxruntime' else ''} {prec}"
        rows.append(_measure(name, label, time_pipeline, bundle, backend, prec, device, repeats))
    return rows


def time_torch(name: str, source: str, repeats: int = 5) -> list[dict]:
    """The same stages in PyTorch (FP16 on CUDA): encode_prompt, one U-Net call, one decode."""
    return [_measure(name, "pytorch fp16", _time_torch, name, source, repeats)]


def _time_torch(name: str, source: str, repeats: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("PyTorch here has no CUDA")
    if name == "demo":
        from ldm_edge.demo.diffusers_pipe import demo_pipeline
        from ldm_edge.export.load import default_source
        pipe = demo_pipeline(default_source())
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
    med = {"text_encoder_ms": _med(timed(lambda: pipe.encode_prompt(PROMPT, "cuda", 1, True, ""))),
           "unet_step_ms": _med(timed(lambda: pipe.unet(lat, 500, encoder_hidden_states=emb))),
           "vae_decoder_ms": _med(timed(lambda: pipe.vae.decode(lat[:1]).sample))}
    med["total_ms"] = round(med["text_encoder_ms"] + RUN_STEPS * med["unet_step_ms"]
                            + med["vae_decoder_ms"], 3)  # sum of stages: no scheduler, no copies
    return med


def _measure(bundle: str, label: str, fn, *args) -> dict:
    try:
        return {"bundle": bundle, "config": label, **fn(*args)}
    except Exception as e:  # a missing provider or package is a row that says so, not a crash
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return {"bundle": bundle, "config": label, "skipped": f"{type(e).__name__}: {first}"}


CHILDREN = {"refit": refit_probe, "bench": bench, "torch": time_torch}


def child(args: list[str]) -> None:
    """``--child KIND ARGS...``: one measurement, its JSON as the last line of stdout."""
    from ldm_edge.runtime.errors import LdmEdgeError

    kind, rest = args[0], args[1:]
    if kind not in CHILDREN:
        fail(f"unknown --child {kind!r}")
    try:
        result = CHILDREN[kind](*rest)
    except LdmEdgeError as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1)
    print(json.dumps(result, default=str))


# -- main ---------------------------------------------------------------------------------------
def arguments(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gpu-check")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="global deadline in seconds; steps after it are skipped (default: "
                         "%(default)s)")
    ap.add_argument("--timeout-scale", type=float, default=1.0,
                    help="multiply every step's timeout (a slower machine, e.g. a Jetson: 4 "
                         "with --budget-s 2400)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the steps, their commands and timeouts; run nothing")
    ap.add_argument("--bench", action="store_true",
                    help="also warm medians: TensorRT vs onnxruntime's CUDA provider vs PyTorch")
    ap.add_argument("--pytest", action="store_true", help="also run pytest -m gpu")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.budget_s <= 0 or a.timeout_scale <= 0:
        fail("--budget-s and --timeout-scale must be positive")
    return a


def main(argv=None) -> None:
    a = arguments(argv)
    if a.child:
        return child(a.child)
    out = a.out.resolve()
    steps, rows = plan(out, bench=a.bench, pytest=a.pytest)
    if a.dry_run:
        return print_plan(steps, a.budget_s, a.timeout_scale)
    facts = machine()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    runner = Runner(out, a.budget_s, a.timeout_scale)
    for step in steps:
        runner.run(step)
    by_name = {s.name: s for s in steps}
    report = {"machine": facts, "budget_s": a.budget_s, "seconds": round(time.monotonic() - t0),
              "settings": {"prompt": PROMPT, "lora_prompt": LORA_PROMPT, "lora": LORA_FILE,
                           "seed": SEED, "steps": RUN_STEPS, "reference_device": REFERENCE_DEVICE,
                           "timeout_scale": a.timeout_scale},
              "rows": [row_result(r, runner.records, by_name, out) for r in rows],
              "steps": list(runner.records.values())}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    (out / "report.md").write_text(text)
    print(text)
    bad = [s["step"] for s in report["steps"] if s["status"] != "ok"]
    print(f"gpu-check: report in {out / 'report.md'}"
          + (f"; {len(bad)} step(s) did not pass: {', '.join(bad)}" if bad else
             "; every step passed"), file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the plan or the table piped into `head`: not an error
        sys.stderr.close()
        sys.exit(0)
