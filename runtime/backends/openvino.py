"""OpenVINO backend: the same ONNX graphs, compiled for the CPU by OpenVINO.

On a CPU with BF16 support OpenVINO's default inference precision is BF16; on the Intel
Sapphire Rapids machine this project measures on that was slower than FP32 and less
accurate (max-abs 0.04 on the SD1.5 U-Net), so every graph is compiled with
``INFERENCE_PRECISION_HINT = "f32"``: OpenVINO may not lower the graph's float work below
what the graph itself says. ``tests/parity/test_openvino.py`` checks the picture against
onnxruntime's; docs/benchmarks.md has its speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..bundle.spec import ComponentSpec
from ..errors import BundleError, first_line
from ..lora.files import LoraError
from .base import Backend

log = logging.getLogger(__name__)


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, spec: ComponentSpec, path: str | Path, *, threads: int = 0,
                 io_map: dict | None = None, precision: str = "fp32", lora=None):
        super().__init__(spec, precision=precision)
        import openvino as ov

        self.io_map = dict(io_map or {})
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            model = core.read_model(str(path))
            if lora is not None:  # LoRA: the merged weights replace the graph's constants
                _replace_constants(model, lora.for_graph(path)[0], spec.name)
            self.compiled = core.compile_model(model, "CPU", config)
        except LoraError:
            raise
        except Exception as e:
            msg = first_line(e)
            raise BundleError(f"{spec.name}: OpenVINO cannot load {Path(path).name} ({msg})")
        self.request = self.compiled.create_infer_request()
        self._outputs = [self.compiled.output(self.io_map.get(n, n)) for n in spec.output_names]

    def _run(self, feeds, bound):
        inputs = {self.io_map.get(k, k): np.ascontiguousarray(v)
                  for k, v in self._with_bound(feeds, bound).items()}
        result = self.request.infer(inputs)
        return {n: np.array(result[o], copy=True) for n, o in zip(self.spec.output_names, self._outputs)}

    def close(self):
        super().close()
        self.request = None
        self.compiled = None


def _replace_constants(model, weights: dict, label: str) -> None:
    """Swap each Constant whose tensor name is an initializer in ``weights`` for a new
    Constant holding the merged value (OpenVINO's ONNX reader names constants after them)."""
    from openvino import op

    done = set()
    for node in model.get_ops():
        if node.get_type_name() != "Constant":
            continue
        names = node.output(0).get_names()
        hit = next((n for n in names if n in weights), None)
        if hit is None:
            continue
        done.add(hit)
        new = op.Constant(np.ascontiguousarray(weights[hit]))
        new.output(0).set_names(set(names))
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
    missing = sorted(set(weights) - done)
    if missing:
        raise LoraError(f"{label}: OpenVINO's reading of the graph has no constant "
                        f"{missing[0]!r} to put the LoRA weights in")
