"""onnxruntime's weight pre-packing measured: what it costs when a session opens and what it
saves per call, per component of a bundle, and what it does to a whole `ldm-run`.

    python benchmarks/bench_prepack.py BUNDLE [--components text_encoder unet vae_decoder]
        [--precision fp32] [--size 512] [--batch 1] [--repeats 3] [--calls 6] [--threads 2]
    python benchmarks/bench_prepack.py BUNDLE --ldm-run "-p 'a cat' --precision int8 --vae tiny"
        [--repeats 5]
    python benchmarks/bench_prepack.py BUNDLE --cold-start [--precision fp32] [--steps 4]
        [--size 512] [--repeats 5]

Per component: the graph cache is filled once (a temporary folder; the user's is left
alone), then ``--repeats`` rounds of two fresh processes, each opening the cached graph with
pre-packing and without (LDM_EDGE_ORT_PREPACK=1 / 0), alternating: session-open seconds,
median. Then in one process both sessions, ``--calls`` calls each in turn: median seconds
per call, the largest output difference, and after how many calls the packing has paid for
itself. ``--ldm-run ARGS``: ``ldm-run BUNDLE ARGS`` in fresh processes, ``--repeats`` rounds
of pre-packing everything (=1) against ldm-run's own choice (auto), alternating, the cache
warm: wall seconds from process start to exit, median. ``--cold-start``: benchmarks/run_one.py
(the pipeline as ldm-run opens it, every session opened before the call, DDIM) in fresh
processes, the same two settings alternating: seconds from process spawn to the first U-Net
call and to the PNG, median.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_fused import interleaved  # noqa: E402
from bench_ort_cache import _feeds  # noqa: E402

MODES = {"prepack": "1", "no-prepack": "0"}


def _open(a, component: str, mode: str):
    from ldm_edge.runtime.backends.choose import open_backend
    from ldm_edge.runtime.bundle.opener import open_bundle

    os.environ["LDM_EDGE_ORT_PREPACK"] = MODES[mode]
    m = open_bundle(a.bundle, verify=False)
    t0 = time.perf_counter()
    b = open_backend(m, component, backend="onnxruntime", device="cpu", threads=a.threads,
                     precision=a.precision, ort_cache=True)
    return m, b, time.perf_counter() - t0


def _child(a) -> None:
    _, b, seconds = _open(a, a.components[0], a.child)
    print(json.dumps({"open_s": seconds, "state": b.cache_state}))


def _run_child(a, component: str, mode: str) -> dict:
    r = subprocess.run([sys.executable, __file__, a.bundle, "--components", component,
                        f"--threads={a.threads}", f"--precision={a.precision}", f"--child={mode}"],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{component} {mode} open failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def component_rows(a) -> list[str]:
    import numpy as np

    rows = []
    for comp in a.components:
        first = _run_child(a, comp, "prepack")  # fills the cache: later opens are hits
        assert first["state"] in ("miss", "hit"), first
        opens = {k: [] for k in MODES}
        for i in range(a.repeats):
            for mode in (MODES if i % 2 == 0 else reversed(list(MODES))):
                r = _run_child(a, comp, mode)
                assert r["state"] == "hit", r
                opens[mode].append(r["open_s"])
        m, on, _ = _open(a, comp, "prepack")
        _, off, _ = _open(a, comp, "no-prepack")
        feeds = _feeds(m, on.spec, batch=a.batch, size=a.size)
        outs, per = interleaved({"prepack": on, "no-prepack": off}, feeds, a.calls)
        diff = float(np.abs(outs["prepack"] - outs["no-prepack"]).max())
        o = {k: statistics.median(v) for k, v in opens.items()}
        cost, gain = o["prepack"] - o["no-prepack"], per["no-prepack"] - per["prepack"]
        pays = f"{cost / gain:.0f}" if gain > 0 else "never"
        rows.append(f"| {comp} | {o['prepack']:.3f} | {o['no-prepack']:.3f} | {per['prepack']:.4f} | "
                    f"{per['no-prepack']:.4f} ({per['no-prepack'] / per['prepack']:.3f}×) | {pays} | "
                    f"{diff:.1e} |")
    return rows


def ldm_run_rows(a) -> list[str]:
    exe = shutil.which("ldm-run") or str(Path(sys.executable).with_name("ldm-run"))
    cmd = [exe, a.bundle, *shlex.split(a.ldm_run), "--threads", str(a.threads), "--quiet",
           "-o", str(Path(os.environ["LDM_EDGE_CACHE"]) / "out.png")]

    def once(value: str) -> float:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env={**os.environ, "LDM_EDGE_ORT_PREPACK": value},
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"ldm-run failed:\n{r.stderr[-2000:]}")
        return time.perf_counter() - t0

    once("1")  # fills the cache
    walls = {"1": [], "auto": []}
    for i in range(a.repeats):
        for value in (("1", "auto") if i % 2 == 0 else ("auto", "1")):
            walls[value].append(once(value))
    med = {k: statistics.median(v) for k, v in walls.items()}
    return [f"| pre-pack every graph (=1) | {med['1']:.2f} | {min(walls['1']):.2f}-{max(walls['1']):.2f} |",
            f"| ldm-run's choice (auto) | {med['auto']:.2f} ({med['1'] / med['auto']:.2f}× faster) | "
            f"{min(walls['auto']):.2f}-{max(walls['auto']):.2f} |"]


def cold_start_rows(a) -> list[str]:
    import numpy as np

    from ldm_edge.runtime.bundle.opener import open_bundle

    m = open_bundle(a.bundle, verify=False)
    size = a.size or m.schema.defaults.height
    f, c = int(m.schema.vae_scale_factor), m.schema.latent_channels
    tmp = Path(os.environ["LDM_EDGE_CACHE"])
    latents = tmp / "latents.npy"
    np.save(latents, np.random.default_rng(0).standard_normal((1, c, size // f, size // f),
                                                              dtype=np.float32))

    def once(value: str) -> dict:
        out = tmp / "run.json"
        cmd = [sys.executable, str(Path(__file__).with_name("run_one.py")), "--kind", "ours",
               "--bundle", a.bundle, "--precision", a.precision, "--ort-cache", "--size", str(size),
               "--steps", str(a.steps), "--threads", str(a.threads), "--latents", str(latents),
               "--png", str(tmp / "out.png"), "--out", str(out), "--t-spawn", repr(time.time())]
        r = subprocess.run(cmd, env={**os.environ, "LDM_EDGE_ORT_PREPACK": value},
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"run_one failed:\n{r.stderr[-2000:]}")
        return json.loads(out.read_text())

    once("1")  # fills the cache
    runs = {"1": [], "auto": []}
    for i in range(a.repeats):
        for value in (("1", "auto") if i % 2 == 0 else ("auto", "1")):
            runs[value].append(once(value))
    rows = []
    for value, label in (("1", "pre-pack every graph (=1)"), ("auto", "ldm-run's choice (auto)")):
        med = {k: statistics.median(r[k] for r in runs[value])
               for k in ("cold_start_first_unet_s", "cold_start_png_s", "unet_step_s", "peak_rss_mb")}
        rows.append(f"| {label} | {med['cold_start_first_unet_s']:.2f} | {med['cold_start_png_s']:.2f} | "
                    f"{med['unet_step_s']:.3f} | {med['peak_rss_mb']:.0f} |")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--components", nargs="+", default=["text_encoder", "unet", "vae_decoder"])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--size", type=int, default=None, help="pixels, square (default: the bundle's)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ldm-run", default=None, metavar="ARGS",
                    help="time whole ldm-run BUNDLE ARGS processes instead")
    ap.add_argument("--cold-start", action="store_true",
                    help="time benchmarks/run_one.py's cold start instead")
    ap.add_argument("--steps", type=int, default=4, help="--cold-start: denoising steps")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a)
    cache = tempfile.mkdtemp(prefix="ldm-edge-prepack-bench-")
    os.environ["LDM_EDGE_CACHE"] = cache
    os.environ.pop("LDM_EDGE_ORT_CACHE", None)
    try:
        if a.cold_start:
            rows = cold_start_rows(a)
            print(f"benchmarks/run_one.py on {a.bundle} ({a.precision}), {a.steps} steps, "
                  f"{a.threads} threads, graph cache warm, {a.repeats} rounds alternating, "
                  f"medians\n")
            print("| pre-packing | spawn → first U-Net call (s) | spawn → PNG (s) | "
                  "U-Net per step (s) | peak RSS (MB) |\n|---|---:|---:|---:|---:|")
        elif a.ldm_run is not None:
            rows = ldm_run_rows(a)
            print(f"ldm-run {a.bundle} {a.ldm_run}, {a.threads} threads, graph cache warm, "
                  f"wall seconds process start to exit, {a.repeats} rounds alternating\n")
            print("| pre-packing | median (s) | range (s) |\n|---|---:|---:|")
        else:
            rows = component_rows(a)
            print(f"{a.bundle} ({a.precision}), {a.threads} threads, cached graphs; opens: median "
                  f"of {a.repeats} fresh processes each; calls: batch {a.batch}, "
                  f"{a.size or 'default'} px, median of {a.calls} in turn\n")
            print("| component | open, pre-packed (s) | open, not (s) | call, pre-packed (s) | "
                  "call, not (s) | pays after (calls) | max-abs diff |")
            print("|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
