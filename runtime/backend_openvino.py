"""OpenVINO backend: the same ONNX graphs, compiled for the CPU by OpenVINO.

On a CPU with BF16 support OpenVINO's default inference precision is BF16; on the Intel
Sapphire Rapids machine this project measures on that was slower than FP32 and less
accurate (max-abs 0.04 on the SD1.5 U-Net), so every graph is compiled with
``INFERENCE_PRECISION_HINT = "f32"``: OpenVINO may not lower the graph's float work below
what the graph itself says. ``tests/parity/test_openvino.py`` checks the picture against
onnxruntime's; the README's benchmark section has its speed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .backend_base import Backend
from .errors import BundleError, first_line
from .spec import ComponentSpec

log = logging.getLogger(__name__)


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, spec: ComponentSpec, path: str | Path, *, threads: int = 0,
                 io_map: dict | None = None, precision: str = "fp32"):
        super().__init__(spec, precision=precision)
        import openvino as ov

        self.io_map = dict(io_map or {})
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(str(path), "CPU", config)
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
