"""The merged weights a backend opens a graph with, while LoRAs are active.

``LoraWeights`` belongs to a pipeline: it reads each targeted base weight from the FP32
graph once (and keeps it), so switching LoRAs re-reads nothing from the bundle; for each
component it gives a ``GraphWeights``: {initializer name: merged array} in the dtype the
opened graph stores it in (FP16 variants take the FP32 merge cast to FP16), which names are
external data (onnxruntime takes those through ``add_external_initializers``, the rest
through ``add_initializer``), and a key for the onnxruntime graph cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.onnx_scan import ScanError, initializer_dtypes, read_initializers
from .files import LoraError, LoraSet
from .weights_map import WeightsMap, read_weights_map

log = logging.getLogger(__name__)

# components a LoRA may change (the ones the exporter maps)
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_NP = {"float32": np.float32, "float16": np.float16}


@dataclass
class GraphWeights:
    """Merged initializers for one component, made for whichever graph file it opens."""

    component: str
    wmap: WeightsMap
    merged32: dict = field(repr=False)  # initializer -> float32 merged value (graph layout)
    key: str  # identifies the LoRA set's effect (graph cache)
    fp32_graph: Path | None = None  # the FP32 graph (INT8 re-quantisation reads its biases)

    def for_graph(self, path: str | Path) -> tuple[dict, set]:
        """({initializer: array in the graph's dtype}, {names stored as external data}); an
        INT8 graph gets its quantised weights re-quantised (runtime/lora/int8.py)."""
        try:
            table = initializer_dtypes(path)
        except (OSError, ScanError) as e:
            raise LoraError(f"{self.component}: cannot read {Path(path).name} to apply the "
                            f"LoRA ({e})")
        values = self.merged32
        if any(n not in table for n in values) and any(k.endswith("/int8") for k in table):
            from .int8 import requantise

            values = requantise(path, self.fp32_graph, values, self.component)
        out, external = {}, set()
        for name, value in values.items():
            if name not in table:
                raise LoraError(f"{self.component}: {Path(path).name} has no weight "
                                f"{name!r} (the graph was rewritten after export); re-export "
                                f"the bundle")
            dtype, ext = table[name]
            if dtype not in _NP and np.asarray(value).dtype != np.dtype(dtype):
                raise LoraError(f"{self.component}: weight {name!r} is {dtype} in "
                                f"{Path(path).name}; LoRA needs float32 or float16 weights")
            out[name] = np.ascontiguousarray(value.astype(_NP.get(dtype, value.dtype), copy=False))
            if ext:
                external.add(name)
        return out, external


class LoraWeights:
    def __init__(self, manifest):
        self.manifest = manifest
        self._maps: dict[str, WeightsMap] = {}
        self._base: dict[tuple, np.ndarray] = {}

    def maps(self) -> dict[str, WeightsMap]:
        """The weights maps of the components the bundle has (errors for an old bundle)."""
        for comp in LORA_COMPONENTS:
            if comp not in self._maps and self.manifest.has(comp):
                self._maps[comp] = read_weights_map(self.manifest, comp)
        return self._maps

    def load(self, loras) -> LoraSet | None:
        """The LoraSet of ``loras`` [(path, scale)] matched to this bundle; None for none."""
        loras = list(loras or [])
        return LoraSet(loras, self.maps()) if loras else None

    def graph_weights(self, lora_set: LoraSet | None, component: str) -> GraphWeights | None:
        """What ``component`` opens with, or None when no active LoRA changes it."""
        if lora_set is None or component not in lora_set.components():
            return None
        wmap = self._maps[component]
        deltas = lora_set.deltas(component)
        base = self._bases(component, wmap, deltas)
        merged = {}
        for param, d in deltas.items():
            mp = wmap.params[param]
            merged[mp.initializer] = base[mp.initializer] + mp.to_graph(d)
        return GraphWeights(component, wmap, merged, lora_set.key(component),
                            self.manifest.variant(component, "fp32").path)

    def _bases(self, component: str, wmap: WeightsMap, deltas: dict) -> dict:
        """Base values (float32, graph layout) of the initializers ``deltas`` touch."""
        path = self.manifest.variant(component, "fp32").path
        names = [wmap.params[p].initializer for p in deltas]
        todo = [n for n in names if (component, n) not in self._base]
        if todo:
            try:
                got = read_initializers(path, todo)
            except (OSError, ScanError) as e:
                raise LoraError(f"{component}: cannot read the base weights from "
                                f"{path.name} ({e}); re-export the bundle")
            for n in todo:
                self._base[(component, n)] = got[n].astype(np.float32)
        return {n: self._base[(component, n)] for n in names}


def check_lora_precision(component: str, precision: str, backend: str) -> None:
    """onnxruntime and OpenVINO re-quantise an INT8 graph's merged weights; TensorRT engines
    cannot be refitted with quantised weights: refused in one line."""
    if precision == "int8" and backend == "tensorrt":
        raise LoraError(f"--lora with --precision int8 is not supported on the tensorrt backend "
                        f"({component}'s engine holds quantised weights that are not refitted); "
                        f"use --backend onnxruntime, or fp32/fp16 engines")

