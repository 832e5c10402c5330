"""Load test of a served bundle: N concurrent clients, M requests each, against `ldm-serve`'s
tritonserver (Python-backend components, this CPU), beside the same images made by one
`ldm-run` process in a loop.

    python benchmarks/bench_serve.py [--bundle out/demo-bundle] [--tiny] [--clients 1,2,4,8]
                                     [--requests 3] [--instances 1,2] [--steps N]

Reports per level: images/s, p50/p99 request latency, failed requests; and the baseline's
images/s. --tiny adds the tiny random SD1 model (built here; needs the export extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ("a red circle in the top left on a white background",
           "blue square, bottom right, gray background")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def baseline(bundle: Path, n: int, steps: int | None) -> float:
    """One ldm-run process: the pipeline opened once, ``n`` images in a loop (images/s)."""
    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle)
    pipe(PROMPTS[0], num_inference_steps=steps, seed=0)  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        pipe(PROMPTS[i % 2], num_inference_steps=steps, seed=i)
    return n / (time.perf_counter() - t0)


def load(url: str, clients: int, requests: int, steps: int | None) -> dict:
    from ldm_edge.runtime.remote import generate, request_inputs

    latencies, failed, lock = [], [0], threading.Lock()

    def client(k: int):
        for j in range(requests):
            t0 = time.perf_counter()
            try:
                generate(url, request_inputs(prompts=[PROMPTS[(k + j) % 2]], seed=k * 100 + j,
                                             steps=steps))
            except Exception as e:  # noqa: BLE001 - counted, and the first one shown
                with lock:
                    failed[0] += 1
                print(f"  failed: {e}", file=sys.stderr)
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"images_s": len(latencies) / wall, "p50": statistics.median(latencies) if latencies
            else float("nan"), "p99": percentile(latencies, 99) if latencies else float("nan"),
            "failed": failed[0], "n": clients * requests}


def serve_levels(bundle: Path, instances: int, levels: list[int], requests: int,
                 steps: int | None, serve_venv: str | None, max_steps: int) -> list[dict]:
    from ldm_edge.serve.limits import ServeLimits
    from ldm_edge.serve.repository import write_repository
    from ldm_edge.serve.server import TritonServer, find_triton

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "serve"))
    from serve_helpers import free_ports

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        repo = write_repository(bundle, Path(tmp) / "repo", components="python",
                                instances=instances, limits=ServeLimits(max_steps=max_steps))
        http, grpc, metrics = free_ports(3)
        server = TritonServer(find_triton(serve_venv), repo, http_port=http, grpc_port=grpc,
                              metrics_port=metrics, log_path=Path(tmp) / "triton.log")
        with server:
            load(server.http_url, 1, 1, steps)  # warm-up: first request opens the sessions
            rows = []
            for n in levels:
                r = load(server.http_url, n, requests, steps)
                rows.append({"instances": instances, "clients": n, **r})
                print(f"  {instances} instance(s), {n} client(s): {r['images_s']:.2f} img/s, "
                      f"p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s, failed {r['failed']}",
                      file=sys.stderr)
    return rows


def tiny_bundle(root: Path) -> Path:
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny import save_tiny

    model = save_tiny(root / "tiny_sd1", "sd1", seed=0)
    export_bundle(load_model(model), root / "bundle_sd1", ExportOptions())
    return root / "bundle_sd1"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="out/demo-bundle")
    ap.add_argument("--tiny", action="store_true", help="also the tiny random SD1 model")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=3, help="per client")
    ap.add_argument("--instances", default="1,2")
    ap.add_argument("--steps", type=int, default=None, help="default: the bundle's")
    ap.add_argument("--serve-venv", default=None)
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-serve-tiny-") as tmp:
        bundles = {"demo": Path(a.bundle)}
        if a.tiny:
            bundles["tiny SD1"] = tiny_bundle(Path(tmp))
        lines = ["| bundle | pipeline instances | clients | images/s | p50 latency s | "
                 "p99 latency s | failed / requests |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, bundle in bundles.items():
            # the baseline before and after the served runs: the machine is shared and noisy
            n_base = max(levels) * a.requests // 2
            before = baseline(bundle, n_base, a.steps)
            print(f"{name}: one ldm-run process in a loop {before:.2f} img/s", file=sys.stderr)
            rows = []
            for inst in (int(x) for x in a.instances.split(",")):
                rows += serve_levels(bundle, inst, levels, a.requests, a.steps, a.serve_venv,
                                     max(a.steps or 0, 100))
            after = baseline(bundle, n_base, a.steps)
            print(f"{name}: one ldm-run process in a loop {after:.2f} img/s", file=sys.stderr)
            lines.append(f"| {name} | one `ldm-run` process, {n_base} images in a loop, before "
                         f"/ after the served runs | 1 | {before:.2f} / {after:.2f} | | | |")
            for r in rows:
                lines.append(f"| {name} | {r['instances']} | {r['clients']} | "
                             f"{r['images_s']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} | "
                             f"{r['failed']} / {r['n']} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
