"""``ldm_pipeline``: the sampling loop as a Triton Python-backend model.

Its inputs are ``ldm-run``'s options (runtime/remote.py ``PIPELINE_INPUTS``), resolved and
checked by the same ``resolve_request`` ``ldm-run`` uses, then the server's limits; a refused
request gets a 400 with the one line ``ldm-run`` prints, and the model goes on serving. The
loop is ``runtime/pipeline.py``'s, its components called through BLS (serve/bls.py).
Outputs: the uint8 images and, per image, the parameters its PNG records (JSON).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from ldm_edge.runtime.errors import UsageError, first_line
from ldm_edge.runtime.remote import PIPELINE_INPUTS

from .bls import RequestCancelled, ServedPipeline
from .component_model import model_parameters, repository_bundle
from .limits import ServeLimits

log = logging.getLogger("ldm_edge.serve")
DEFAULT_INIT_NAME = "init-image"


def _scalar(value: np.ndarray):
    return value.reshape(-1)[0].item()


def _texts(value: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]


def read_inputs(request, pb_utils) -> dict:
    """The request's inputs that were sent, as Python values."""
    out = {}
    for name, (kind, _) in PIPELINE_INPUTS.items():
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            continue
        a = t.as_numpy()
        if name == "init_image":
            out[name] = bytes(a.reshape(-1)[0]) if a.size else b""
        elif kind == "BYTES":
            try:
                texts = _texts(a)
            except UnicodeDecodeError:
                raise UsageError(f"{name} is not UTF-8 text")
            out[name] = texts if name in ("prompt", "negative_prompt") else texts[0]
        else:
            if a.size != 1:
                raise UsageError(f"{name} must be one value, got {a.size}")
            out[name] = _scalar(a)
    return out


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.limits = ServeLimits.from_params(params)
        self.pipe = ServedPipeline(repository_bundle(args, params), kind=params["components"],
                                   precision=params.get("precision", "fp32"))

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            try:
                responses.append(self._generate(request, pb_utils))
            except RequestCancelled:
                log.warning("ldm_pipeline: request cancelled by its client")
                err = pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
            except UsageError as e:
                err = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=err))
            except Exception as e:  # noqa: BLE001 - a 500 with one line; the model goes on
                log.warning("ldm_pipeline: %s: %s", type(e).__name__, first_line(e))
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(first_line(e))))
        return responses

    def _generate(self, request, pb_utils):
        given = read_inputs(request, pb_utils)
        if "prompt" not in given:
            raise UsageError("give at least one prompt")
        init = given.get("init_image")
        self.limits.check_early(given["prompt"], given.get("negative_prompt"), init)
        with tempfile.TemporaryDirectory(prefix="ldm-serve-") as tmp:
            init_path = None
            if init is not None:
                name = Path(given.get("init_image_name") or DEFAULT_INIT_NAME).name
                init_path = Path(tmp) / (name or DEFAULT_INIT_NAME)
                init_path.write_bytes(init)
            try:
                req = self._resolve(given, init_path)
            except UsageError as e:  # say the client's file name, not the server's copy
                if init_path is None:
                    raise
                raise UsageError(str(e).replace(str(init_path),
                                                given.get("init_image_name") or DEFAULT_INIT_NAME))
        self.limits.check(req)

        def progress(done, total):
            if request.is_cancelled():
                raise RequestCancelled
        result = self.pipe(request=req, progress=progress)
        params = [json.dumps(result.metadata(i), ensure_ascii=False, default=str).encode()
                  for i in range(result.images.shape[0])]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("images", np.ascontiguousarray(result.images)),
            pb_utils.Tensor("parameters", np.array(params, dtype=np.object_))])

    def _resolve(self, given: dict, init_path):
        negs = given.get("negative_prompt")
        return self.pipe.request(
            prompt=given["prompt"], negative_prompt=negs[0] if negs and len(negs) == 1 else negs,
            num_inference_steps=given.get("steps"), guidance_scale=given.get("guidance_scale"),
            scheduler=given.get("scheduler"), height=given.get("height"),
            width=given.get("width"), num_images_per_prompt=given.get("num_images", 1),
            seed=given.get("seed"), init_image=None if init_path is None else str(init_path),
            strength=given.get("strength"))

    def finalize(self):
        self.pipe.close()
