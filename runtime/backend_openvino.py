"""OpenVINO backend: the same ONNX graphs, compiled for the CPU by OpenVINO.

Measured on this project's 2-core CPU (shared/PITFALLS.md), OpenVINO in FP32 was the
fastest FP32 path; its default precision there is BF16, which was slower and less
accurate, so FP32 is asked for explicitly unless the graph itself is FP16/INT8.
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
                 io_map: dict | None = None, precision_hint: str = "f32",
                 precision: str = "fp32"):
        super().__init__(spec, precision=precision)
        import openvino as ov

        self.io_map = dict(io_map or {})
        config = {"INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY"}
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
