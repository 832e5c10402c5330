"""The SDXL U-Net alone in onnxruntime at a given size: export it the way ldm-export does (no
check, no fused form), then time a fresh session's open and its batch-2 (guidance) calls.

    OMP_NUM_THREADS=2 python benchmarks/sdxl_unet_probe.py SDXL_DIR --out DIR \
        [--size 1024] [--calls 2] [--threads 2]

For when a whole bundle cannot be made in the time (the full export checks every component
at the largest size: ~37 min on 2 quiet cores). Each phase runs in a child process and its
peak RSS is the kernel's count for it (wait4 ru_maxrss, = VmHWM). The plain graph is timed,
not the fused-attention form ldm-run opens where the bundle has it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BATCH = 2  # classifier-free guidance: the unconditioned and the prompted half together
SEED = 1


def export_unet(folder: str, out: str) -> None:
    from ldm_edge.export.bundle import ExportOptions, model_dims
    from ldm_edge.export.load import load_model
    from ldm_edge.export.onnx_export import export_component
    from ldm_edge.runtime.bundle.spec import describe
    from ldm_edge.runtime.tasks import task_specs

    model = load_model(folder)
    specs = task_specs(describe(model_dims(model, ExportOptions())), model.task,
                       model.unet_in_channels)
    Path(out).mkdir(parents=True, exist_ok=True)
    export_component(model, specs["unet"], Path(out), height=int(model.defaults["height"]),
                     width=int(model.defaults["width"]))


def _feeds(sess, size: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(SEED)
    lat = size // 8
    shapes = {"sample": (BATCH, 4, lat, lat), "timestep": (), "time_ids": (BATCH, 6)}
    feeds = {}
    for i in sess.get_inputs():
        dtype = np.int64 if "int64" in i.type else np.float32
        shape = shapes.get(i.name) or tuple(BATCH if not isinstance(d, int) else d
                                            for d in i.shape)
        if i.name == "timestep":
            shape = tuple(BATCH if not isinstance(d, int) else d for d in i.shape)
            feeds[i.name] = np.full(shape, 999, dtype=dtype)
        elif i.name == "time_ids":
            feeds[i.name] = np.tile(np.array([size, size, 0, 0, size, size], dtype=dtype), (BATCH, 1))
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def time_unet(onnx_path: str, size: int, calls: int, threads: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    open_s = time.perf_counter() - t0
    feeds = _feeds(sess, size)
    each, cpu = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        c0 = time.process_time()
        sess.run(None, feeds)
        each.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"session_open_s": open_s, "calls_s": each, "calls_cpu_s": cpu}


def time_torch(folder: str, size: int, calls: int, threads: int) -> dict:
    """diffusers' U-Net (PyTorch eager) on the same feeds, as StableDiffusionXLPipeline calls it."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    rng = np.random.default_rng(SEED)
    lat = size // 8
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    open_s = time.perf_counter() - t0
    f = lambda *shape: torch.from_numpy(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
    cond = unet.config.cross_attention_dim
    added = {"text_embeds": f(BATCH, unet.config.projection_class_embeddings_input_dim
                                  - 6 * unet.config.addition_time_embed_dim),
             "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * BATCH, dtype=torch.float32)}
    sample, hidden = f(BATCH, 4, lat, lat), f(BATCH, 77, cond)
    each, cpu = [], []
    with torch.inference_mode():
        for _ in range(calls):
            t0, c0 = time.perf_counter(), time.process_time()
            unet(sample, torch.tensor(999), hidden, added_cond_kwargs=added, return_dict=False)
            each.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"load_s": open_s, "calls_s": each, "calls_cpu_s": cpu}


def child(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS MiB, CPU seconds: user + system) of ``python THIS argv``; on a
    shared machine the CPU seconds say how much of the wall it actually ran."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv])
    _, status, usage = os.wait4(p.pid, 0)
    if status:
        raise SystemExit(f"{argv[0]} failed (status {status})")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="an SDXL diffusers folder (make_sdxl_arch.py)")
    ap.add_argument("--out", required=True, help="where unet.onnx(.data) is written")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--diffusers", action="store_true",
                    help="time diffusers' U-Net (PyTorch eager) on the same inputs instead")
    ap.add_argument("--phase", choices=["export", "time", "torch"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    onnx_path = str(Path(a.out) / "unet.onnx")
    if a.phase == "export":
        return export_unet(a.folder, a.out)
    if a.phase == "time":
        Path(a.out, "time.json").write_text(json.dumps(
            time_unet(onnx_path, a.size, a.calls, a.threads)))
        return
    if a.phase == "torch":
        Path(a.out, "torch.json").write_text(json.dumps(
            time_torch(a.folder, a.size, a.calls, a.threads)))
        return
    res = {"size": a.size, "batch": BATCH, "threads": a.threads}
    common = ["--size", str(a.size), "--calls", str(a.calls), "--threads", str(a.threads)]
    if a.diffusers:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        res["run_wall_s"], res["run_peak_mib"], res["run_cpu_s"] = child(
            [a.folder, "--out", a.out, "--phase", "torch", *common])
        res.update(json.loads(Path(a.out, "torch.json").read_text()))
        print(json.dumps(res))
        return
    if not Path(onnx_path).is_file():
        res["export_s"], res["export_peak_mib"], res["export_cpu_s"] = child([a.folder, "--out", a.out,
                                                         "--phase", "export"])
    res["run_wall_s"], res["run_peak_mib"], res["run_cpu_s"] = child([a.folder, "--out", a.out, "--phase", "time",
                                                    *common])
    res.update(json.loads(Path(a.out, "time.json").read_text()))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
