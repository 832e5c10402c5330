"""``ldm_pipeline``: the sampling loop as a Triton Python-backend model.

Its inputs are ``ldm-run``'s options, named by ldm-run's field table (runtime/fields.py, the
``Wire`` of each row): read back as option values, resolved and checked by the same
``Pipeline.request`` with the same keywords ``ldm-run`` gives it, then the server's limits;
a refused request gets a 400 with the one line ``ldm-run`` prints, and the model goes on
serving. A sent file (init image, mask) is written to a file of the client's name, so the
PNG records the same source and a refusal names the client's file, not the server's copy.
The loop is ``runtime/pipeline.py``'s, its components called through BLS (serve/bls.py).
Outputs: the uint8 images and, per image, the parameters its PNG records (JSON).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from ldm_edge.runtime.errors import UsageError, first_line
from ldm_edge.runtime.fields import BY_OPTION, SERVED, request_keywords

from .bls import RequestCancelled, ServedPipeline
from .component_model import model_parameters, repository_bundle
from .limits import ServeLimits

log = logging.getLogger("ldm_edge.serve")
# a sent file's name, kept only as its last part and only when it can name a file here
MAX_NAME_BYTES = 200


def _texts(value: np.ndarray, name: str) -> list[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]
    except UnicodeDecodeError:
        raise UsageError(f"{name} is not UTF-8 text") from None


def _one(values: list, name: str):
    if len(values) != 1:
        raise UsageError(f"{name} must be one value, got {len(values)}")
    return values[0]


def read_inputs(request, pb_utils) -> tuple[dict, dict]:
    """(option values, files) of what was sent, by ldm-run option name; a file as
    (the client's name for it or None, its bytes)."""
    given, files = {}, {}
    for f in SERVED:
        t = pb_utils.get_input_tensor_by_name(request, f.wire.name)
        if t is None:
            continue
        a = t.as_numpy()
        if f.file:
            t_name = pb_utils.get_input_tensor_by_name(request, f.name_input)
            name = (None if t_name is None else
                    _one(_texts(t_name.as_numpy(), f.name_input), f.name_input))
            files[f.option] = (name, bytes(_one(a.reshape(-1).tolist(), f.wire.name)))
        elif f.files_in_values:  # --control NAME:IMAGE[:SCALE], each image's bytes beside
            given[f.option], files[f.option] = _values_with_files(f, a, request, pb_utils)
        elif f.wire.datatype == "BYTES":
            texts = _texts(a, f.wire.name)
            given[f.option] = texts if f.many else _one(texts, f.wire.name)
        elif f.wire.dims != (1,):  # a pair (SDXL's sizes): checked by the request
            given[f.option] = tuple(a.reshape(-1).tolist())
        else:
            given[f.option] = _one(a.reshape(-1).tolist(), f.wire.name)
    return given, files


def _values_with_files(f, values: np.ndarray, request, pb_utils) -> tuple[list, list]:
    """(the values as sent, [(the client's name for each file, its bytes)]), a file per value
    in the values' order (``--control NAME:IMAGE[:SCALE]``, the image's bytes in ``files_input``)."""
    from ldm_edge.runtime.control import parse_control_arg

    texts = _texts(values, f.wire.name)
    t = pb_utils.get_input_tensor_by_name(request, f.files_input)
    blobs = [] if t is None else [bytes(b) for b in t.as_numpy().reshape(-1).tolist()]
    if len(blobs) != len(texts):
        raise UsageError(f"{f.wire.name}: {len(texts)} values and {len(blobs)} "
                         f"{f.files_input} files; send one file per value")
    return texts, [(str(parse_control_arg(v)[1]), b) for v, b in zip(texts, blobs)]


def _file_name(sent: str | None, default: str) -> str:
    """The last part of the client's file name, or ``default`` where it cannot name a file."""
    base = Path(sent or "").name
    if base in ("", ".", "..") or "\x00" in base or len(base.encode()) > MAX_NAME_BYTES:
        return default
    return base


def write_files(folder: Path, files: dict) -> dict:
    """Each sent file in a folder of its own under ``folder``, by its client's name:
    option -> (its path here, the client's name for it); for an option whose values name
    files (``--control``), a list of those, one per value."""
    out = {}
    for option, sent_files in files.items():
        default = BY_OPTION[option].wire.name.replace("_", "-")
        many = isinstance(sent_files, list)
        written = []
        for k, (sent, data) in enumerate(sent_files if many else [sent_files]):
            path = folder / option / (str(k) if many else "") / _file_name(sent, default)
            path.parent.mkdir(parents=True)
            path.write_bytes(data)
            written.append((path, sent or default))
        out[option] = written if many else written[0]
    return out


def _with_written(given: dict, written: dict) -> dict:
    """The option values with the server's copies of the sent files: a file option's path;
    each ``--control`` value as (name, the copy, scale)."""
    from ldm_edge.runtime.control import parse_control_arg

    out = dict(given)
    for option, w in written.items():
        if isinstance(w, list):
            out[option] = [(name, str(path), scale) for (name, _, scale), (path, _)
                           in zip(map(parse_control_arg, given[option]), w)]
        else:
            out[option] = str(w[0])
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
        given, files = read_inputs(request, pb_utils)
        self._check_early(given, files)
        with tempfile.TemporaryDirectory(prefix="ldm-serve-") as tmp:
            written = write_files(Path(tmp), files)
            try:
                req = self.pipe.request(**request_keywords(_with_written(given, written),
                                                           SERVED))
            except UsageError as e:  # say the client's file names, not the server's copies
                msg = str(e)
                for w in written.values():
                    for path, sent in (w if isinstance(w, list) else [w]):
                        msg = msg.replace(str(path), sent)
                raise UsageError(msg) from None
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

    def _check_early(self, given: dict, files: dict) -> None:
        """The server's limits on what was sent, before anything is decoded."""
        negs = given.get("negative_prompt")
        self.limits.check_early(given.get("prompts") or [], negs, None)
        for option, sent_files in files.items():
            for _, data in (sent_files if isinstance(sent_files, list) else [sent_files]):
                if len(data) > self.limits.max_init_bytes:
                    raise UsageError(f"{BY_OPTION[option].flag} of {len(data)} bytes is over "
                                     f"this server's limit of {self.limits.max_init_bytes}")

    def finalize(self):
        self.pipe.close()
