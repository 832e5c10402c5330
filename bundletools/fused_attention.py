"""Rewrite each attention of an exported graph into one ``com.microsoft.MultiHeadAttention``.

The TorchScript exporter writes ``scaled_dot_product_attention`` (diffusers' U-Net ``attn1`` /
``attn2`` and the VAE's mid-block attention) as::

    q [B,S,H*D] -> Reshape [B,-1,H,D] -> Transpose (0,2,1,3) -> Mul s ─┐
    k [B,L,H*D] -> Reshape [B,-1,H,D] -> Transpose (0,2,3,1) -> Mul s ─┴ MatMul -> Softmax(-1) ─┐
    v [B,L,H*D] -> Reshape [B,-1,H,D] -> Transpose (0,2,1,3) ───────────────────────────────── MatMul
        -> Transpose (0,2,1,3) -> Reshape [B,-1,H*D] -> out

with ``s = sqrt(c / sqrt(D))`` computed from q's shape (``c`` is 1 unless a scale was given).
onnxruntime's CPU kernel for ``MultiHeadAttention`` is a tiled (flash) attention that never
holds the [S, L] score matrix (benchmarks/bench_attention.py: 1.31× faster, 7.7× smaller for one
SD1.5 self-attention at 512²). Only this exact pattern is rewritten; anything else (CLIP's masked
attention, a pattern with other consumers in the middle) is left alone, and the caller checks
the result against the plain graph (``forms.py``). numpy + onnx only; weights are not touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MHA_DOMAIN = "com.microsoft"
# |c - 1| below this: the factor is the default 1/sqrt(D), written without a scale attribute
SCALE_EPS = 1e-6


@dataclass
class Attention:
    """One matched attention: the tensors MultiHeadAttention reads and writes, its heads and
    scale (None: the default 1/sqrt(head size)), and the nodes it replaces."""

    name: str  # the Softmax node's name
    q: str
    k: str
    v: str
    out: str
    num_heads: int
    scale: float | None
    replaced: list  # the chain's nodes; the last, Reshape(out), is where the new node goes


class _Graph:
    """Producer / consumer look-ups and constant values of one GraphProto."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}
        self._init = {t.name: t for t in graph.initializer}
        self._np = numpy_helper

    def node(self, tensor: str, op: str):
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None

    def sole_consumer(self, tensor: str, op: str):
        users = self.consumers.get(tensor, [])
        if len(users) != 1 or tensor in self.outputs or users[0].op_type != op:
            return None
        return users[0]

    def const(self, tensor: str):
        """The value of a Constant node or an initializer with its data inline, else None."""
        if tensor in self._init:
            t = self._init[tensor]
            return None if t.data_location == 1 else self._np.to_array(t)
        n = self.node(tensor, "Constant")
        if n is None:
            return None
        for a in n.attribute:
            if a.name == "value":
                return self._np.to_array(a.t)
            if a.name in ("value_float", "value_int"):
                return np.array(a.f if a.name == "value_float" else a.i)
            if a.name in ("value_floats", "value_ints"):
                return np.array(list(a.floats) or list(a.ints))
        return None


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _transpose_of_reshape(g: _Graph, tensor: str, perm: list):
    """(Reshape node, Transpose node) when ``tensor`` is Transpose(perm) of Reshape, else None."""
    t = g.node(tensor, "Transpose")
    if t is None or list(_attr(t, "perm", [])) != perm:
        return None
    r = g.node(t.input[0], "Reshape")
    return None if r is None else (r, t)


def _split_heads(g: _Graph, reshape) -> int | None:
    """H when the Reshape's target shape is [B, -1, H, D] with H a constant, else None."""
    shape = g.const(reshape.input[1])
    if shape is not None:
        return int(shape[2]) if shape.size == 4 and shape[1] == -1 else None
    cat = g.node(reshape.input[1], "Concat")
    if cat is None or len(cat.input) != 4:
        return None
    minus_one, heads = g.const(cat.input[1]), g.const(cat.input[2])
    if minus_one is None or heads is None or minus_one.size != 1 or heads.size != 1:
        return None
    return int(heads.reshape(-1)[0]) if int(minus_one.reshape(-1)[0]) == -1 else None


def _merges_heads(g: _Graph, reshape) -> bool:
    """The Reshape's target shape has three entries: [B, -1, H*D]."""
    shape = g.const(reshape.input[1])
    if shape is not None:
        return shape.size == 3
    cat = g.node(reshape.input[1], "Concat")
    return cat is not None and len(cat.input) == 3


def _factor(g: _Graph, tensor: str, head_src: set, depth: int = 0):
    """``tensor`` as c * D**p (D: the head size, read as the last dim of q's shape): (c, p),
    or None when it is anything else."""
    if depth > 12:
        return None
    value = g.const(tensor)
    if value is not None:
        return (float(value.reshape(-1)[0]), 0.0) if value.size == 1 else None
    n = g.producer.get(tensor)
    if n is None or n.domain not in ("", "ai.onnx"):
        return None
    if n.op_type in ("Cast", "Identity"):
        return _factor(g, n.input[0], head_src, depth + 1)
    if n.op_type == "Sqrt":
        f = _factor(g, n.input[0], head_src, depth + 1)
        return None if f is None or f[0] < 0 else (math.sqrt(f[0]), f[1] / 2)
    if n.op_type in ("Mul", "Div"):
        a, b = (_factor(g, i, head_src, depth + 1) for i in n.input)
        if a is None or b is None or (n.op_type == "Div" and b[0] == 0):
            return None
        return (a[0] * b[0], a[1] + b[1]) if n.op_type == "Mul" else (a[0] / b[0], a[1] - b[1])
    if n.op_type == "Slice":  # Slice(Shape(q), [-1], [big]): q's last dim, D
        shape = g.node(n.input[0], "Shape")
        starts = g.const(n.input[1]) if len(n.input) > 1 else None
        ok = (shape is not None and shape.input[0] in head_src and starts is not None
              and starts.size == 1 and int(starts.reshape(-1)[0]) in (-1, 3) and len(n.input) <= 4)
        return (1.0, 1.0) if ok else None
    return None


def _scaled(g: _Graph, tensor: str, transposed: str, head_src: set):
    """(factor) when ``tensor`` is ``transposed`` * factor (or ``transposed`` itself)."""
    if tensor == transposed:
        return (1.0, 0.0)
    mul = g.node(tensor, "Mul")
    if mul is None or transposed not in mul.input:
        return None
    other = mul.input[1] if mul.input[0] == transposed else mul.input[0]
    return _factor(g, other, head_src)


def match_attention(g: _Graph, softmax) -> Attention | None:
    """The attention around one Softmax node, or None when it is not exactly the pattern."""
    if softmax.op_type != "Softmax" or _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    scores = g.node(softmax.input[0], "MatMul")
    mix = g.sole_consumer(softmax.output[0], "MatMul")
    if scores is None or mix is None or mix.input[0] != softmax.output[0]:
        return None
    q_side, k_side = scores.input
    q_mul, k_mul = g.node(q_side, "Mul"), g.node(k_side, "Mul")
    q_t = next((i for i in (q_mul.input if q_mul else [q_side])
                if _transpose_of_reshape(g, i, [0, 2, 1, 3])), None)
    k_t = next((i for i in (k_mul.input if k_mul else [k_side])
                if _transpose_of_reshape(g, i, [0, 2, 3, 1])), None)
    if q_t is None or k_t is None:
        return None
    q_r, q_tr = _transpose_of_reshape(g, q_t, [0, 2, 1, 3])
    k_r, k_tr = _transpose_of_reshape(g, k_t, [0, 2, 3, 1])
    v_pair = _transpose_of_reshape(g, mix.input[1], [0, 2, 1, 3])
    if v_pair is None:
        return None
    v_r, v_tr = v_pair
    heads = {_split_heads(g, r) for r in (q_r, k_r, v_r)}
    if len(heads) != 1 or None in heads or min(heads) < 1:
        return None
    merge_t = g.sole_consumer(mix.output[0], "Transpose")
    if merge_t is None or list(_attr(merge_t, "perm", [])) != [0, 2, 1, 3]:
        return None
    merge_r = g.sole_consumer(merge_t.output[0], "Reshape")
    if merge_r is None or not _merges_heads(g, merge_r):
        return None
    head_src = {q_t, q_r.output[0]}
    fq, fk = _scaled(g, q_side, q_t, head_src), _scaled(g, k_side, k_t, head_src)
    if fq is None or fk is None:
        return None
    c, p = fq[0] * fk[0], fq[1] + fk[1]
    if p == -0.5 and abs(c - 1) <= SCALE_EPS:
        scale = None  # MultiHeadAttention's default, 1/sqrt(D)
    elif p == 0:
        scale = c
    else:
        return None  # c/sqrt(D) with c != 1 would need D, which the graph computes at run time
    chain = [m for m in (q_mul, k_mul) if m is not None]
    chain += [q_r, q_tr, k_r, k_tr, v_r, v_tr, scores, softmax, mix, merge_t, merge_r]
    return Attention(softmax.name or softmax.output[0], q_r.input[0], k_r.input[0], v_r.input[0],
                     merge_r.output[0], heads.pop(), scale, chain)


def find_attention(graph) -> tuple[list[Attention], int]:
    """(the matched attentions, the number of Softmax nodes) of a GraphProto."""
    g = _Graph(graph)
    softmaxes = [n for n in graph.node if n.op_type == "Softmax"]
    found = [m for m in (match_attention(g, s) for s in softmaxes) if m is not None]
    return found, len(softmaxes)


def fuse_attention(model, num_heads: int | None = None) -> tuple[int, int]:
    """Rewrite ``model`` (a ModelProto, changed in place) and return (fused, Softmax nodes).
    ``num_heads`` overrides what the graph says (the tests' deliberately broken rewrite)."""
    from onnx import helper

    graph = model.graph
    found, softmaxes = find_attention(graph)
    if not found:
        return 0, softmaxes
    new_nodes = {}
    for m in found:
        attrs = {"num_heads": num_heads or m.num_heads}
        if m.scale is not None:
            attrs["scale"] = float(m.scale)
        new_nodes[id(m.replaced[-1])] = helper.make_node(
            "MultiHeadAttention", [m.q, m.k, m.v], [m.out], name=f"{m.name}/MultiHeadAttention",
            domain=MHA_DOMAIN, **attrs)
    # each MultiHeadAttention takes the place of its output Reshape (the order stays
    # topological); the rest of the chain goes once nothing else reads it
    nodes = [new_nodes.get(id(n), n) for n in graph.node]
    _drop_dead(graph, nodes, {i for m in found for i in m.replaced[-1].input})
    if not any(o.domain == MHA_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MHA_DOMAIN, 1))
    return len(found), softmaxes


def _drop_dead(graph, nodes: list, seeds: set) -> None:
    """Put ``nodes`` into ``graph``, less those left without a consumer by the rewrite (the
    head-size arithmetic of the replaced chains), starting from the tensors in ``seeds``."""
    consumers: dict[str, int] = {}
    for n in nodes:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    producer = {o: n for n in nodes for o in n.output}
    keep_out = {o.name for o in graph.output}
    dead, todo, seen = set(), list(seeds), set(seeds)
    while todo:
        n = producer.get(todo.pop())
        if n is None or id(n) in dead:
            continue
        if any(consumers.get(o, 0) or o in keep_out for o in n.output):
            continue
        dead.add(id(n))
        for i in n.input:
            consumers[i] -= 1
            todo.append(i)
            seen.add(i)
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in dead)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used and t.name in seen]:
        graph.initializer.remove(t)
