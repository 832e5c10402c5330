"""Which ONNX initializer holds which PyTorch parameter: what applying a LoRA needs.

The exporter names few initializers after their parameters: a ``Linear`` traced as a
``MatMul`` gets its weight transposed under a name like ``onnx::MatMul_2641``. So at export
each Linear/Conv weight of the U-Net and the text encoder is found in the graph by value
(as it is, or transposed), every match is checked to be equal, and the result is written
beside the graph as ``<component>.weights-map.json`` (recorded in the manifest as the
component's ``weights_map`` file, so it is hashed like every other file):

    {"format": 1, "component": "unet", "graph": "unet.onnx",
     "params": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
                {"initializer": "onnx::MatMul_2641", "transpose": true, "shape": [32, 32]}, ...},
     "shared": [...]}

Parameter names are the diffusers / transformers module's own (no wrapper prefix).
``shared`` lists parameters whose initializer also holds another parameter (the exporter
keeps one copy of equal tensors): changing one would change both, so no LoRA may touch them.
``unused`` (optional) lists parameters that no output of the graph depends on (the exporter
found them unreachable in PyTorch's autograd graph: SDXL's first text encoder returns the
penultimate hidden state, so its last layer is dead): a LoRA on them changes nothing.
Pure python: the exporter writes it (export/weights_map.py), the runtime reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import BundleError

MAP_FORMAT = 1


def map_file_name(component: str) -> str:
    return f"{component}.weights-map.json"


@dataclass(frozen=True)
class MappedParam:
    initializer: str
    transpose: bool  # the initializer holds W.T (a Linear exported as MatMul)
    shape: tuple  # the PyTorch parameter's shape

    def to_graph(self, w: np.ndarray) -> np.ndarray:
        """A value in the parameter's layout -> the initializer's layout."""
        return np.ascontiguousarray(w.T) if self.transpose else w


@dataclass
class WeightsMap:
    component: str
    graph: str
    params: dict[str, MappedParam] = field(default_factory=dict)
    shared: set[str] = field(default_factory=set)
    unused: set[str] = field(default_factory=set)

    def to_json(self) -> dict:
        return {"format": MAP_FORMAT, "component": self.component, "graph": self.graph,
                "params": {k: {"initializer": p.initializer, "transpose": p.transpose,
                               "shape": list(p.shape)} for k, p in sorted(self.params.items())},
                "shared": sorted(self.shared), "unused": sorted(self.unused)}

    @classmethod
    def from_json(cls, d, what: str) -> "WeightsMap":
        try:
            if d["format"] != MAP_FORMAT:
                raise BundleError(f"{what} has format {d['format']!r}, which this ldm-edge does "
                                  f"not read; re-export the bundle")
            params = {str(k): MappedParam(str(v["initializer"]), bool(v["transpose"]),
                                          tuple(int(x) for x in v["shape"]))
                      for k, v in d["params"].items()}
            return cls(str(d["component"]), str(d["graph"]), params, set(d.get("shared", [])),
                       set(d.get("unused", [])))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{what} is malformed ({type(e).__name__}); re-export the bundle")

    @cached_property
    def modules(self) -> set[str]:
        """Module names whose weight is mapped, shared or unused (``...attn1.to_q``)."""
        return {p.rsplit(".", 1)[0] for p in (*self.params, *self.shared, *self.unused)}

    @cached_property
    def flat_modules(self) -> dict[str, str]:
        """{module name with dots as underscores (kohya's): module name}."""
        return {m.replace(".", "_"): m for m in self.modules}


def read_weights_map(manifest, component: str) -> WeightsMap:
    """The component's weights map, or a one-line error saying to re-export once."""
    from ..bundle.manifest import safe_member
    from .files import LoraError

    rec = manifest.component(component).weights_map
    if rec is None:
        raise LoraError(f"this bundle was exported before LoRA support: its {component} has no "
                        f"weights map; re-export it once with `ldm-export onnx` to use --lora")
    path = safe_member(manifest.root, rec.path, f"{component} weights map")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{component} weights map {rec.path} is damaged "
                          f"({type(e).__name__}); re-export the bundle")
    return WeightsMap.from_json(data, f"{component} weights map {rec.path}")
