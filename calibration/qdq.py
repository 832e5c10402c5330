"""Which U-Net layers INT8 may touch, and the graph with explicit QuantizeLinear /
DequantizeLinear nodes around them (QDQ format, run by onnxruntime's fused int8 kernels).

Per quantised layer: the activation input gets Q/DQ (int8, per-tensor, asymmetric), the
weight is stored as int8 (per output channel, symmetric) behind a DequantizeLinear, a
Conv/Gemm bias as int32 with scale ``x_scale * w_scale``. A Conv's output gets Q/DQ too:
onnxruntime fuses Conv into QLinearConv only with a quantised output; a MatMul with an
unquantised output becomes MatMulIntegerToFloat, which is as fast and loses less.
``build(..., int32_bias=False)`` leaves biases float: TensorRT's form (trt_form.py).

``build(..., switchable=True)`` makes a graph for the sensitivity sweep instead: every
fake-quantisation sits behind ``Where(flag[unit], quantised, float)`` with the flags a
graph input, so one session measures any subset of units quantised.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import numpy as np

QUANT_OPS = ("Conv", "MatMul", "Gemm")
# Kept in float by rule (substrings of a layer's scope name), with the reason recorded:
# the time embedding's sinusoid and MLP feed every block (an error there shifts the whole
# noise prediction; SDXL's added embedding of the pooled text and time ids joins it),
# conv_in / conv_out touch the latents directly, shortcut convs carry the residual path,
# norm_out precedes conv_out.
SENSITIVE_SCOPES = (
    ("time embedding", ("/time_proj/", "/time_embedding/", "/time_emb_proj/",
                        "/add_time_proj/", "/add_embedding/")),
    ("conv_in", ("/conv_in/",)),
    ("conv_out", ("/conv_out/",)),
    ("shortcut conv", ("/conv_shortcut/",)),
    ("norm_out", ("/norm_out/", "/conv_norm_out/")),
)
# One sensitivity unit per layer while there are at most this many quantised layers,
# else one per module (a resnet, an attention/transformer, a sampler): keeps the sweep
# (one U-Net run per unit and sample) and the greedy keep-list short for SD-size U-Nets.
MAX_SWEEP_LAYERS = 40
_MODULE = re.compile(r"^(resnets|attentions|downsamplers|upsamplers)\.\d+$")
FLAGS_INPUT = "int8_unit_flags"
ACT_LEVELS = 255  # int8 steps across an activation's range
WEIGHT_MAX = 127  # symmetric int8 weights use -127..127
# 7-bit weights (-63..63) for CPUs without VNNI: onnxruntime's u8 x s8 kernels there sum
# pairs of products in 16 bits (VPMADDUBSW), and 2 x 255 x 63 = 32130 fits where
# 2 x 255 x 127 = 64770 saturates (onnxruntime's quantization guide: reduce_range).
WEIGHT_BITS = (7, 8)
UNSUPPORTED_LAYOUT = "unsupported weight layout"  # a reason a layer stays float


@dataclass
class Layer:
    node: str  # node name in the graph
    scope: str  # module path of the layer, e.g. /unet/down_blocks.0/resnets.0/conv1/Conv
    op: str
    act: str  # activation input tensor
    weight: str  # initializer
    axis: int  # per-channel axis of the weight
    bias: str | None
    out: str | None  # output tensor to quantise (Conv only)
    unit: str = ""


def _module_path(dotted: str) -> list[str]:
    """'unet.down_blocks.0.resnets.0.conv1' -> ['unet', 'down_blocks.0', 'resnets.0', 'conv1']."""
    dotted = re.sub(r"\.?__dict__\['_modules'\]\['([^']+)'\]", r".\1", dotted).strip(".")
    parts = []
    for p in dotted.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        elif p:
            parts.append(p)
    return parts


def scope_name(node, weight: str | None = None) -> str:
    """The node's module path, as TorchScript names nodes (/unet/down_blocks.0/.../Conv);
    the dynamo exporter keeps it in metadata (name scopes); failing both, the weight's name
    (``a.b.weight``)."""
    if "/" in node.name:
        return node.name
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [s for s in ast.literal_eval(p.value) if s]
            except (ValueError, SyntaxError):
                break
            if len(scopes) >= 2:  # the last entry names the op itself
                return "/" + "/".join(_module_path(scopes[-2])) + "/" + node.op_type
    if weight and "." in weight:
        return "/" + "/".join(_module_path(weight.rsplit(".", 1)[0])) + "/" + node.op_type
    return "/" + node.name


def _initializer_producer(graph) -> dict:
    """Tensor -> initializer name, through Identity chains (shared weights)."""
    src = {t.name: t.name for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Identity" and n.input[0] in src:
            src[n.output[0]] = src[n.input[0]]
    return src


def analyse(graph) -> tuple[list[Layer], dict[str, list[str]]]:
    """Quantisable layers, and the float-kept nodes by reason."""
    const = _initializer_producer(graph)
    dims = {t.name: list(t.dims) for t in graph.initializer}
    uses = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.output:
        uses[o.name] = uses.get(o.name, 0) + 1
    layers, excluded = [], {}
    for n in graph.node:
        if n.op_type == "Softmax":
            excluded.setdefault("softmax", []).append(n.name)
        if n.op_type not in QUANT_OPS:
            continue
        found = _layer(n, const, dims, uses)
        if isinstance(found, Layer):
            layers.append(found)
        else:
            excluded.setdefault(found, []).append(n.name)
    per_layer = len(layers) <= MAX_SWEEP_LAYERS
    for ly in layers:
        ly.unit = ly.scope.rsplit("/", 1)[0] if per_layer else module_of(ly.scope)
    return layers, excluded


def _layer(n, const: dict, dims: dict, uses: dict) -> Layer | str:
    """Conv/MatMul/Gemm node ``n`` as a quantisable Layer, or why it stays float.
    ``const``: tensor -> initializer; ``dims``: initializer shapes; ``uses``: consumers."""
    w = const.get(n.input[1]) if len(n.input) > 1 else None
    scope = scope_name(n, w)
    if w is None:
        return "activation x activation matmul"
    rule = next((r for r, subs in SENSITIVE_SCOPES if any(s in scope for s in subs)), None)
    if rule:
        return rule
    layout = _weight_layout(n, w, const, dims, uses)
    if isinstance(layout, str):
        return layout
    axis, bias = layout
    return Layer(n.name, scope, n.op_type, n.input[0], w, axis, bias,
                 n.output[0] if n.op_type == "Conv" else None)


def _weight_layout(n, w: str, const: dict, dims: dict,
                   uses: dict) -> tuple[int, str | None] | str:
    """(per-channel axis of weight ``w``, bias initializer or None) of a layer the int8
    kernels take, or why it stays float."""
    attrs = {a.name: a for a in n.attribute}
    bias = const.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if n.op_type == "MatMul":
        if len(dims[w]) != 2 or n.input[0] in const:
            return UNSUPPORTED_LAYOUT
        return 1, None
    if n.op_type == "Gemm":
        if any(attrs[k].f != 1.0 for k in ("alpha", "beta") if k in attrs) or \
                (attrs.get("transA") and attrs["transA"].i):
            return UNSUPPORTED_LAYOUT
        if bias is not None and len(dims[bias]) != 1:
            return UNSUPPORTED_LAYOUT
        return (0 if (attrs.get("transB") and attrs["transB"].i) else 1), bias
    if attrs.get("group") and attrs["group"].i != 1:
        return UNSUPPORTED_LAYOUT  # depthwise/grouped: not in SD U-Nets
    if uses.get(n.output[0], 0) != 1:
        # onnxruntime fuses Q/DQ + Conv into QLinearConv only when the output's
        # Q/DQ has one consumer; otherwise the layer would pay INT8's error at
        # FP32 speed (TorchScript's proj_in, downsamplers: <3% of SD's FLOPs)
        return "conv output with several consumers (no int8 kernel)"
    return 0, bias


def module_of(scope: str) -> str:
    parts = scope.split("/")
    for i, p in enumerate(parts):
        if _MODULE.match(p):
            return "/".join(parts[: i + 1])
    return "/".join(parts[:-2]) or scope  # e.g. /unet/conv_in/Conv -> /unet


def act_qparams(lo: float, hi: float) -> tuple[np.float32, np.int8]:
    """int8 scale and zero point for [lo, hi] (widened to contain 0)."""
    from .ranges import MIN_RANGE

    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if lo == -hi:  # a symmetric range (TensorRT's only kind): zero point 0, -127..127
        return np.float32(max(hi, MIN_RANGE / 2) / WEIGHT_MAX), np.int8(0)
    if hi - lo < MIN_RANGE:
        hi = lo + MIN_RANGE
    scale = np.float32((hi - lo) / ACT_LEVELS)
    zp = int(np.clip(np.round(-128 - lo / float(scale)), -128, 127))
    return scale, np.int8(zp)


def weight_qparams(w: np.ndarray, axis: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel symmetric int8 weights (``bits`` 7: within -63..63) and their scales; the
    runtime's LoRA re-quantisation uses the same function (runtime/lora/int8.py)."""
    from ldm_edge.runtime.lora.int8 import weight_qparams as symmetric

    return symmetric(w, axis, 2 ** (bits - 1) - 1)


def build(proto, layers: list[Layer], ranges: dict, quantize: set[str], *,
          switchable: bool = False, base_dir: str = "", weight_bits: int = 8,
          int32_bias: bool = True):
    """A copy of ``proto`` with the layers whose unit is in ``quantize`` in Q/DQ (all
    layers behind flags when ``switchable``). ``ranges``: tensor -> (lo, hi). ``proto``
    may leave its weights in external data (in ``base_dir``): only the weights being
    quantised are read, one at a time. ``int32_bias`` False: biases stay float (TensorRT's
    form: its parser dequantizes no INT32; onnxruntime needs them to fuse QLinearConv)."""
    import onnx
    from onnx import helper

    g = onnx.ModelProto()
    g.CopyFrom(proto)
    graph = g.graph
    writer = _QdqWriter(graph, layers, ranges, switchable, base_dir, weight_bits)
    writer.int32_bias = int32_bias
    chosen = {ly.node: ly for ly in layers if switchable or ly.unit in quantize}
    nodes = []
    for n in graph.node:
        ly = chosen.get(n.name)
        nodes += [n] if ly is None else writer.rewrite(n, ly)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(writer.new_inits)
    used = {i for n in graph.node for i in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    if switchable:
        graph.input.append(helper.make_tensor_value_info(FLAGS_INPUT, onnx.TensorProto.BOOL,
                                                         [len(writer.units)]))
    return g, writer.units


class _QdqWriter:
    """One ``build``'s Q/DQ nodes and initializers, and what it has made so far."""

    def __init__(self, graph, layers: list[Layer], ranges: dict, switchable: bool,
                 base_dir: str, weight_bits: int):
        self.ranges, self.switchable = ranges, switchable
        self.base_dir, self.weight_bits = base_dir, weight_bits
        self.weights = {t.name: t for t in graph.initializer}
        self.units = sorted({ly.unit for ly in layers})
        self.new_inits = []
        self.made = {}  # (tensor, unit or "") -> its fake-quantised name
        self.flags = {}  # unit -> its flag (switchable)
        self.shared = {}  # activation -> Q/DQ pairs made for its consumers
        self.used_scale = {}  # fake-quantised tensor -> its scale
        self.int32_bias = True  # False: biases left float (build's int32_bias)

    def rewrite(self, n, ly: Layer) -> list:
        """``n`` with its inputs (and a Conv's output) in Q/DQ: the nodes that replace it."""
        pre, post = [], []
        n.input[0] = self.activation(ly, pre)
        ws = self.weight(n, ly, pre)
        if ly.bias is not None and self.int32_bias:
            self.bias(n, ly, ws, pre)
        if ly.out is not None:
            y = ly.out
            n.output[0] = f"{y}/float"
            self.made[(y, ly.unit if self.switchable else "")] = y
            self.fake_quant(y, n.output[0], y, ly.unit, post)
        return pre + [n] + post

    def activation(self, ly: Layer, out: list) -> str:
        """The layer's activation input, fake-quantised."""
        if self.switchable:
            key = (ly.act, ly.unit)
            if key not in self.made:
                self.made[key] = self.fake_quant(ly.act, ly.act, f"{ly.act}/{ly.unit}/int8",
                                                 ly.unit, out)
            return self.made[key]
        if (ly.act, "") in self.made:  # the output of a quantised Conv: already Q/DQ
            return self.made[(ly.act, "")]
        # One Q/DQ pair per consumer: onnxruntime fuses DQ -> MatMul/Conv only when the Q
        # has one consumer, and merges identical Q nodes; a scale 1 ulp apart per
        # consumer (a 1e-7 relative change) keeps them apart (to_q/to_k/to_v).
        k = self.shared.get(ly.act, 0)
        self.shared[ly.act] = k + 1
        return self.fake_quant(ly.act, ly.act, f"{ly.act}/int8/{k}", ly.unit, out, nudge=k)

    def weight(self, n, ly: Layer, out: list) -> np.ndarray:
        """Per-channel int8 weight behind a DequantizeLinear; returns its scales."""
        from ldm_edge.bundletools import external_data

        w = external_data.to_array(self.weights[ly.weight], self.base_dir).astype(np.float32)
        wq, ws = weight_qparams(w, ly.axis, self.weight_bits)
        n.input[1] = self.dequantized(f"{ly.weight}/{ly.node}", "int8", wq, ws, ly.axis,
                                      ly.unit, ly.weight, out)
        return ws

    def bias(self, n, ly: Layer, ws: np.ndarray, out: list) -> None:
        """int32 bias with scale x_scale * w_scale, behind a DequantizeLinear."""
        from ldm_edge.bundletools import external_data

        xs = self.used_scale.get(n.input[0]) or act_qparams(*self.ranges[ly.act])[0]
        b = external_data.to_array(self.weights[ly.bias], self.base_dir).astype(np.float64)
        bs = (np.float32(xs) * ws).astype(np.float32)
        bq = np.clip(np.round(b / bs), -2**31, 2**31 - 1).astype(np.int32)
        n.input[2] = self.dequantized(f"{ly.bias}/{ly.node}", "int32", bq, bs, 0, ly.unit,
                                      ly.bias, out)

    def dequantized(self, name: str, kind: str, q: np.ndarray, scale: np.ndarray, axis: int,
                    unit: str, flt: str, out: list) -> str:
        """Initializers ``name/<kind>``, ``name/scale``, ``name/zp`` (zeros) into a
        DequantizeLinear along ``axis``; the tensor that replaces float ``flt``."""
        from onnx import helper

        self.const(f"{name}/{kind}", q)
        s = self.const(name + "/scale", scale)
        z = self.const(name + "/zp", np.zeros(scale.shape, q.dtype))
        out.append(helper.make_node("DequantizeLinear", [f"{name}/{kind}", s, z],
                                    [name + "/dq"], axis=axis))
        return self.switch(unit, name + "/dq", flt, name + "/sel", out)

    def fake_quant(self, tensor: str, src: str, dst: str, unit: str, out: list,
                   nudge: int = 0) -> str:
        """Q/DQ of ``src`` with ``tensor``'s range (scale ``nudge`` ulps up) as ``dst``."""
        from onnx import helper

        s, z = act_qparams(*self.ranges[tensor])
        for _ in range(nudge):
            s = np.nextafter(s, np.float32(np.inf))
        self.used_scale[dst] = s
        s, z = self.const(f"{dst}/act_scale", s), self.const(f"{dst}/act_zp", z)
        q = f"{dst}/q"
        deq = dst if not self.switchable else f"{dst}/dq"
        out += [helper.make_node("QuantizeLinear", [src, s, z], [q]),
                helper.make_node("DequantizeLinear", [q, s, z], [deq])]
        return self.switch(unit, deq, src, dst, out)

    def switch(self, unit: str, quant: str, flt: str, dst: str, out: list) -> str:
        """``quant``, or (switchable) ``dst`` = Where(flag[unit], quant, flt)."""
        from onnx import helper

        if not self.switchable:
            return quant
        out.append(helper.make_node("Where", [self.flag(unit, out), quant, flt], [dst]))
        return dst

    def flag(self, unit: str, out: list) -> str:
        from onnx import helper

        if unit not in self.flags:
            i = self.units.index(unit)
            idx = self.const(f"{FLAGS_INPUT}/{i}", np.int64(i))
            self.flags[unit] = f"{FLAGS_INPUT}/{unit}"
            out.append(helper.make_node("Gather", [FLAGS_INPUT, idx], [self.flags[unit]]))
        return self.flags[unit]

    def const(self, name: str, arr) -> str:
        from onnx import numpy_helper

        self.new_inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name
