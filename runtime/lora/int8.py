"""LoRA on an INT8 U-Net: the merged weights re-quantised the way ``ldm-export int8`` quantised
the base ones (calibration/qdq.py), with the bundle's own activation scales.

In the INT8 graph a quantised layer ``node`` reads its weight ``W`` as
``W/<node>/int8`` (int8, per output channel, symmetric) with ``W/<node>/scale`` behind a
DequantizeLinear (``axis``), and a Conv/Gemm bias ``B`` as ``B/<node>/int32`` with scale
``x_scale * w_scale``, ``x_scale`` being the scale of the activation's Q/DQ in front of the
layer. For each merged weight: new per-channel scales and int8 values (7-bit when the base
weights were, ``--weight-bits 7``), the bias re-quantised with the new scales (its float value
comes from the FP32 graph: a LoRA does not change biases), so the bias scale stays exactly
``x_scale * w_scale`` and onnxruntime keeps fusing the layer into its integer kernel. Weights
the INT8 graph keeps in float are replaced as in FP32. Activation ranges are not re-measured:
the picture's PSNR against FP32 with the same LoRA says what that costs (``ldm-run
--check-lora-int8`` prints it for INT8 + LoRA).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle.onnx_scan import ScanError, graph_nodes, initializer_dtypes, read_initializers
from .files import LoraError

# the largest |q| of 7-bit weights (calibration/qdq.py WEIGHT_BITS): base weights within it
# were quantised with --weight-bits 7, and the merged ones are kept there too
SEVEN_BIT_MAX = 63


def weight_qparams(w: np.ndarray, axis: int, wmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8 values within ±wmax and their scales: the one definition,
    used by ``ldm-export int8`` (calibration/qdq.py) and the LoRA re-quantisation."""
    red = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=red)
    scale = np.where(amax > 0, amax / wmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -wmax, wmax).astype(np.int8)
    return q, scale


def requantise(int8_graph: Path, fp32_graph: Path, merged: dict, component: str) -> dict:
    """{initializer: new value} of the INT8 graph for ``merged`` {FP32 initializer: float32
    value in the graph's layout}."""
    try:
        return _requantise(Path(int8_graph), Path(fp32_graph), merged)
    except (OSError, ScanError, KeyError) as e:
        raise LoraError(f"{component} (int8): cannot re-quantise the LoRA weights "
                        f"({type(e).__name__}: {e}); use --precision fp32 or fp16")


def _requantise(int8_graph: Path, fp32_graph: Path, merged: dict) -> dict:
    table = initializer_dtypes(int8_graph)
    nodes = graph_nodes(int8_graph)
    producer = {o: n for n in nodes for o in n["outputs"]}
    by_name = {n["name"]: n for n in nodes}
    out, plans = {}, []
    for w, value in merged.items():
        if table.get(w, ("",))[0] in ("float32", "float16"):
            out[w] = value  # kept in float by the INT8 rules
            continue
        quantised = [k for k in table if k.startswith(w + "/") and k.endswith("/int8")]
        if not quantised:
            raise KeyError(f"no weight {w!r}, float or int8")
        plans += [(w, value, k[len(w) + 1:-len("/int8")]) for k in quantised]
    need = {f"{w}/{node}/int8" for w, _, node in plans}
    biases = {}  # (w, node) -> (bias name, activation scale name)
    for w, _, node in plans:
        layer = by_name[node]
        if len(layer["inputs"]) > 2 and layer["inputs"][2].endswith(f"/{node}/dq"):
            act_scale = producer[layer["inputs"][0]]["inputs"][1]
            bias = layer["inputs"][2][:-len(f"/{node}/dq")]
            biases[(w, node)] = (bias, act_scale)
            need.add(act_scale)
    old = read_initializers(int8_graph, sorted(need))
    float_bias = read_initializers(fp32_graph, sorted({b for b, _ in biases.values()}))
    for w, value, node in plans:
        axis = producer[f"{w}/{node}/dq"]["ints"].get("axis", 1)
        wmax = SEVEN_BIT_MAX if np.abs(old[f"{w}/{node}/int8"]).max() <= SEVEN_BIT_MAX else 127
        q, scale = weight_qparams(np.asarray(value, np.float32), axis, wmax)
        out[f"{w}/{node}/int8"], out[f"{w}/{node}/scale"] = q, scale
        if (w, node) in biases:
            bias, act_scale = biases[(w, node)]
            bs = (np.float32(old[act_scale]) * scale).astype(np.float32)
            b = float_bias[bias].astype(np.float64)
            out[f"{bias}/{node}/int32"] = np.clip(np.round(b / bs), -2**31, 2**31 - 1).astype(np.int32)
            out[f"{bias}/{node}/scale"] = bs
    return out
