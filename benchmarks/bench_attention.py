"""One self-attention in onnxruntime on the CPU, written three ways, side by side.

    python benchmarks/bench_attention.py [--tokens 4096] [--heads 8] [--head-dim 40]
                                         [--batch 2] [--threads 1] [--repeats 5]

What our U-Net export does today (MatMul -> Softmax -> MatMul: the full score matrix),
ONNX's own ``Attention`` (opset 23) and onnxruntime's ``com.microsoft.MultiHeadAttention``.
SD1.5 at 512² has self-attention over 64x64 = 4096 tokens with 8 heads of 40 channels.
Each form runs in its own process (its peak RSS is its own); the three agree to 1e-4.
Prints median seconds per call, peak RSS, and speed relative to the explicit form.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

FORMS = ("explicit", "onnx-attention", "ms-mha")


def _graph(form: str, b: int, h: int, n: int, d: int):
    import numpy as np
    from onnx import TensorProto, helper

    if form == "ms-mha":  # [batch, tokens, heads * dim]
        shape = [b, n, h * d]
        nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"],
                                  domain="com.microsoft", num_heads=h)]
        opsets, inits = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], []
    else:  # [batch, heads, tokens, dim]
        shape = [b, h, n, d]
        if form == "explicit":
            inits = [helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / np.sqrt(d)])]
            nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                     helper.make_node("MatMul", ["q", "kt"], ["scores"]),
                     helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
                     helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
                     helper.make_node("MatMul", ["probs", "v"], ["y"])]
            opsets = [helper.make_opsetid("", 18)]
        else:
            inits = []
            nodes = [helper.make_node("Attention", ["q", "k", "v"], ["y"])]
            opsets = [helper.make_opsetid("", 23)]
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape) for x in "qkv"]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    graph = helper.make_graph(nodes, form, io, out, initializer=inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10), shape


def _child(a) -> None:
    import statistics
    import time

    import numpy as np

    from ldm_edge.runtime.backends.sessions import SessionFromOnnx

    model, shape = _graph(a.child, a.batch, a.heads, a.tokens, a.head_dim)
    sess = SessionFromOnnx(model.SerializeToString(), threads=a.threads)()
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((a.batch, a.heads, a.tokens, a.head_dim), dtype=np.float32)
               for _ in range(3))
    if a.child == "ms-mha":
        q, k, v = (x.transpose(0, 2, 1, 3).reshape(shape) for x in (q, k, v))
    feeds = {"q": q, "k": k, "v": v}
    y = sess.run(None, feeds)[0]
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    if a.child == "ms-mha":
        y = y.reshape(a.batch, a.tokens, a.heads, a.head_dim).transpose(0, 2, 1, 3)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"median_s": statistics.median(times), "peak_rss_mb": hwm / 1024,
                      "checksum": y[:, :, :16].astype(float).ravel().tolist()}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", choices=FORMS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a)
    import numpy as np

    args = [f"--tokens={a.tokens}", f"--heads={a.heads}", f"--head-dim={a.head_dim}",
            f"--batch={a.batch}", f"--threads={a.threads}", f"--repeats={a.repeats}"]
    res = {}
    for form in FORMS:
        r = subprocess.run([sys.executable, __file__, *args, f"--child={form}"],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{form} failed:\n{r.stderr[-2000:]}")
        res[form] = json.loads(r.stdout.strip().splitlines()[-1])
    ref = np.array(res["explicit"]["checksum"])
    print(f"self-attention, batch {a.batch}, {a.heads} heads x {a.head_dim}, {a.tokens} tokens, "
          f"{a.threads} thread(s), median of {a.repeats}\n")
    print("| form | median s | vs explicit | peak RSS MB | max-abs vs explicit |")
    print("|---|---:|---:|---:|---:|")
    base = res["explicit"]["median_s"]
    for form, r in res.items():
        err = float(np.abs(np.array(r["checksum"]) - ref).max())
        print(f"| {form} | {r['median_s']:.3f} | {base / r['median_s']:.2f}x | "
              f"{r['peak_rss_mb']:.0f} | {err:.1e} |")


if __name__ == "__main__":
    main()
