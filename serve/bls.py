"""The pipeline's components called through Triton (BLS): ``runtime/pipeline.py``'s own loop,
with each component's backend replaced by a call to the served model of that name.

Runs inside the Triton Python-backend stub (``triton_python_backend_utils`` is importable
only there); everything else is the runtime's.
"""

from __future__ import annotations

import numpy as np

from ldm_edge.runtime.backends.base import Backend
from ldm_edge.runtime.backends.choose import interface, pick_precision
from ldm_edge.runtime.errors import LdmEdgeError
from ldm_edge.runtime.pipeline import Pipeline

from .pbtxt import BATCH_DIM, batched, model_name


class ComponentCallError(LdmEdgeError):
    """A component model failed inside the server."""


class RequestCancelled(Exception):
    """The client cancelled the request; the loop stops at the next step."""


class BlsBackend(Backend):
    """One component as a served model. ``io_map``: our tensor name -> the served model's
    (the graph's own names for the onnxruntime and tensorrt backends)."""

    def __init__(self, spec, *, model: str, name: str, precision: str, io_map: dict):
        super().__init__(spec, precision=precision)
        self.model, self.name, self.io_map = model, name, dict(io_map)
        # a batched [batch] input (the timestep) is declared [batch, 1] and reshaped by Triton
        self._column = {t.name for t in spec.inputs
                        if batched(spec) and tuple(t.shape) == (BATCH_DIM,)}

    def _run(self, feeds, bound):
        import triton_python_backend_utils as pb_utils

        feeds = self._with_bound(feeds, bound)
        tensors = [pb_utils.Tensor(self.io_map.get(k, k),
                                   np.ascontiguousarray(v[:, None] if k in self._column else v))
                   for k, v in feeds.items()]
        outs = self.spec.output_names
        request = pb_utils.InferenceRequest(
            model_name=self.model, inputs=tensors,
            requested_output_names=[self.io_map.get(o, o) for o in outs])
        response = request.exec()
        if response.has_error():
            raise ComponentCallError(f"{self.model} failed: {response.error().message()}")
        return {o: pb_utils.get_output_tensor_by_name(response, self.io_map.get(o, o)).as_numpy()
                for o in outs}


class ServedPipeline(Pipeline):
    """``Pipeline`` whose components are the repository's models. ``kind``: how the
    components run (onnxruntime, tensorrt or python); python components run onnxruntime."""

    def __init__(self, bundle, *, kind: str, precision: str = "fp32"):
        self.kind = kind
        super().__init__(bundle, backend="onnxruntime", precision=precision, verify=False,
                         components=self._served_component)

    def _served_component(self, manifest, name: str, options, lora) -> BlsBackend:
        """The served model ``name``, called through BLS (a LoRA is the server's business)."""
        spec, io_map = interface(manifest.component(name))
        return BlsBackend(spec, model=model_name(name),
                          precision=pick_precision(manifest, name, options["precision"]),
                          name="tensorrt" if self.kind == "tensorrt" else "onnxruntime",
                          io_map={} if self.kind == "python" else io_map)
