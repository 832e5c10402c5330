"""Make and verify a component's weights map (runtime/lora/weights_map.py) at export.

Every Linear and Conv2d weight of the diffusers / transformers module is looked up among the
exported graph's float initializers by its bytes, as it is or transposed (the TorchScript
exporter stores a MatMul's weight as W.T under an ``onnx::MatMul_N`` name). A parameter whose
bytes are in no initializer, or whose initializer also holds another parameter, is listed as
``shared``: no LoRA may change it — unless no output of the graph depends on it (found
unreachable from the outputs in PyTorch's autograd graph, on inputs read from the graph's
integer inputs: the text encoders), when it is listed as ``unused`` (a LoRA on it changes
nothing; SDXL's first text encoder drops its last layer). The map is then checked with the runtime's own reader: each
mapped initializer, read from the graph file torch-free, equals its parameter bit for bit —
else the export fails.
"""

from __future__ import annotations

import hashlib
import json
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch

from ldm_edge.runtime.bundle.onnx_scan import graph_io, initializer_dtypes, iter_initializers
from ldm_edge.runtime.errors import ExportError
from ldm_edge.runtime.fsutil import atomic_write_bytes
from ldm_edge.runtime.lora.weights_map import MappedParam, WeightsMap, map_file_name

from .load import LoadedModel

# the components a LoRA may change, and the model attribute (a dotted path) that holds each
MAPPED = {"unet": "unet", "text_encoder": "text_encoder",
          "text_encoder_2": "second_encoder.text_encoder"}  # SDXL's CLIP with projection


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


def _graph_digests(onnx_path: Path) -> dict[str, list[str]]:
    """{digest of the bytes and shape: [initializer names]} of the graph's 2-D and 4-D float32
    initializers, read one at a time by the runtime's reader (SD1.5's U-Net is 3.4 GB)."""
    by_digest: dict[str, list[str]] = {}
    keep = lambda info: info["dtype"] == "float32" and len(info["dims"]) in (2, 4)  # noqa: E731
    for name, a in iter_initializers(onnx_path, keep):
        by_digest.setdefault(_digest(a), []).append(name)
    return by_digest


def _weights(module: torch.nn.Module):
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight is not None:
            yield f"{name}.weight", m.weight.detach().float().cpu().numpy()


def unreachable_params(wrapper: torch.nn.Module, module: torch.nn.Module,
                       onnx_path: Path) -> set[str]:
    """``module``'s parameters that no output of ``wrapper`` (the exported module) depends on:
    the autograd graph of one forward pass, walked from the outputs, never reaches them. Only
    for graphs whose inputs are all integers (token ids); otherwise the empty set."""
    inputs, _ = graph_io(onnx_path)
    if not inputs or any(not dtype.startswith("int") for dtype, _ in inputs.values()):
        return set()
    feeds = [torch.ones([d if isinstance(d, int) and d > 0 else 1 for d in shape],
                         dtype=torch.int64 if dtype == "int64" else torch.int32)
             for dtype, shape in inputs.values()]
    params = dict(module.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            out = wrapper(*feeds)
        reached, todo, seen = set(), [o.grad_fn for o in _flat(out)], set()
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if hasattr(fn, "variable"):
                reached.add(id(fn.variable))
            todo.extend(f for f, _ in fn.next_functions)
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])
    return {n for n, p in params.items() if id(p) not in reached}


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def build_weights_map(module: torch.nn.Module, component: str, onnx_path: Path,
                      unreachable=lambda: set()) -> WeightsMap:
    """``unreachable()``: the parameters no output depends on (asked only when some weight is
    in no initializer)."""
    by_digest = _graph_digests(onnx_path)
    wmap = WeightsMap(component, onnx_path.name)
    holders: dict[str, list[str]] = {}
    dead = None
    for param, w in _weights(module):
        found = [(n, False) for n in by_digest.get(_digest(w), [])]
        if w.ndim == 2:
            found += [(n, True) for n in by_digest.get(_digest(w.T), [])]
        if not found:
            dead = unreachable() if dead is None else dead
        if not found and param in dead:  # pruned: no output depends on it
            wmap.unused.add(param)
            continue
        if len(found) != 1:  # folded away, or several copies: cannot be changed alone
            wmap.shared.add(param)
            continue
        name, transpose = found[0]
        wmap.params[param] = MappedParam(name, transpose, tuple(w.shape))
        holders.setdefault(name, []).append(param)
    for params in holders.values():
        if len(params) > 1:  # equal tensors stored once
            for p in params:
                wmap.shared.add(p)
                del wmap.params[p]
    return wmap


def verify_weights_map(wmap: WeightsMap, module: torch.nn.Module, onnx_path: Path,
                       forms: list[Path] = ()) -> None:
    """Each mapped initializer, read by the runtime's reader, equals its parameter; every
    form of the graph keeps the mapped names. ExportError otherwise."""
    weights = dict(_weights(module))
    by_name = {mp.initializer: (param, mp) for param, mp in wmap.params.items()}
    # one initializer at a time: SDXL's U-Net's are 10 GB, as much again as its torch weights
    for name, got in iter_initializers(onnx_path, lambda info: info["name"] in by_name):
        param, mp = by_name.pop(name)
        if not np.array_equal(got, mp.to_graph(weights[param])):
            raise ExportError(f"{wmap.component}: weights map check failed: {name} "
                              f"is not {param}; nothing was written")
    if by_name:
        raise ExportError(f"{wmap.component}: weights map check failed: {next(iter(by_name))} "
                          f"is not in {onnx_path.name}; nothing was written")
    for form in forms:
        names = initializer_dtypes(form)
        lost = [p.initializer for p in wmap.params.values() if p.initializer not in names]
        if lost:
            raise ExportError(f"{wmap.component}: {form.name} lost weight {lost[0]!r} of the "
                              f"weights map; nothing was written")


def write_weights_map(model: LoadedModel, component: str, onnx_path: Path,
                      forms: list[Path] = ()) -> Path:
    """Build, verify and write ``<component>.weights-map.json`` beside the graph."""
    from .components import wrap

    module = attrgetter(MAPPED[component])(model)
    wmap = build_weights_map(module, component, onnx_path, lambda: unreachable_params(
        wrap(model, component), module, onnx_path))
    verify_weights_map(wmap, module, onnx_path, forms)
    out = onnx_path.parent / map_file_name(component)
    atomic_write_bytes(out, json.dumps(wmap.to_json(), indent=1).encode())
    return out
