"""A component as a Triton Python-backend model running onnxruntime: for servers without
Triton's onnxruntime backend (the ``nvidia-pytriton`` wheel's has only the Python backend).

It opens the component as ``ldm-run`` does (``open_backend`` on the repository's copy of the
bundle), so it computes what ``ldm-run`` computes. Requests that Triton's dynamic batcher
hands over together are run as one batch (the Python backend does not concatenate them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ldm_edge.runtime.backends.choose import interface, open_backend
from ldm_edge.runtime.bundle.opener import open_bundle


def model_parameters(args: dict) -> dict:
    """The config's ``parameters`` as plain strings."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def repository_bundle(args: dict, params: dict) -> Path:
    """The repository's copy of the bundle (``bundle``: relative to the repository root)."""
    return Path(args["model_repository"]).parent / params["bundle"]


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.name = params.get("component", args["model_name"])  # controlnet/NAME's key
        manifest = open_bundle(repository_bundle(args, params), verify=False)
        self.backend = open_backend(manifest, self.name, backend="onnxruntime",
                                    precision=params.get("precision", "fp32"))
        self.spec, _ = interface(manifest.component(self.name))

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        feeds = [{t.name: self._input(pb_utils, r, t) for t in self.spec.inputs} for r in requests]
        sizes = [next(iter(f.values())).shape[0] for f in feeds]
        try:
            joined = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
            out = self.backend.run(joined)
        except Exception as e:  # noqa: BLE001 - each request gets the one-line reason
            err = pb_utils.TritonError(f"{self.name}: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=err) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(k, np.ascontiguousarray(v[start:start + n]))
                       for k, v in out.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    @staticmethod
    def _input(pb_utils, request, t) -> np.ndarray:
        """The tensor at the spec's rank (a [batch] input arrives as [batch, 1])."""
        a = pb_utils.get_input_tensor_by_name(request, t.name).as_numpy()
        return a.reshape(a.shape[:len(t.shape)]) if a.ndim > len(t.shape) else a

    def finalize(self):
        self.backend.close()
