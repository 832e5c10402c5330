"""``ldm-run --server URL``: one request to a served ``ldm_pipeline`` over KServe v2 HTTP.

The wire format is KServe's v2 inference protocol as Triton speaks it, with Triton's
binary-data extension for the files (in: the init image, the mask) and the images (out), so
a 512² picture is not sent as a JSON list of numbers. Standard library only: the lean
runtime gains no dependency.

``PIPELINE_INPUTS`` is the served model's interface, derived from ldm-run's field table
(runtime/fields.py): the Triton model repository writer (serve/repository.py) builds the
model's config.pbtxt from it, and the pipeline model reads what it names.
"""

from __future__ import annotations

import json
import struct
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .fields import SERVED, pipeline_inputs

PIPELINE_MODEL = "ldm_pipeline"
# input name -> (KServe datatype, dims). All are optional: a missing one takes the bundle's
# default, as a missing ldm-run option does.
PIPELINE_INPUTS = pipeline_inputs()
# images: uint8 [n, H, W, 3]; parameters: one JSON text per image, what its PNG records
PIPELINE_OUTPUTS = {"images": ("UINT8", [-1, -1, -1, 3]), "parameters": ("BYTES", [-1])}
NUMPY_OF = {"INT32": np.int32, "UINT64": np.uint64, "FP64": np.float64, "UINT8": np.uint8,
            "BOOL": np.bool_}
# a generation can take minutes on a CPU; the client waits this long for the answer
DEFAULT_TIMEOUT_S = 3600.0


@dataclass
class RemoteResult:
    images: np.ndarray  # uint8 [n, H, W, 3]
    parameters: list[dict]  # per image: what its PNG records

    def metadata(self, index: int) -> dict:
        return self.parameters[index]


def request_inputs(**options) -> dict:
    """The pipeline's named inputs for these ldm-run option values, by option name
    (``prompts=["a cat"], steps=4, init_image="photo.png"``); None or no prompts: not sent.
    A file option is a path: its bytes are sent, with the path as its name."""
    unknown = set(options) - {f.option for f in SERVED}
    if unknown:
        raise TypeError(f"not an ldm-run option the server takes: {', '.join(sorted(unknown))}")
    out = {}
    for f in SERVED:
        value = options.get(f.option)
        if value is None or (f.many and not isinstance(value, str) and not len(value)):
            continue
        if f.file:
            out[f.wire.name] = [_read_file(f.flag, value)]
            out[f.name_input] = [str(value).encode()]
        elif f.files_in_values:  # --control NAME:IMAGE[:SCALE]: each image's bytes beside it
            from .control import parse_control_arg

            values = [value] if isinstance(value, str) else list(value)
            out[f.wire.name] = _wire_value(f, values)
            out[f.files_input] = [_read_file(f"{f.flag} image", parse_control_arg(v)[1])
                                  for v in values]
        else:
            out[f.wire.name] = _wire_value(f, value)
    return out


def _wire_value(f, value):
    """One option's value as its input: a list of bytes (BYTES) or a numpy array."""
    kind = f.wire.datatype
    if kind == "BYTES":
        items = list(value) if f.many and not isinstance(value, str) else [value]
        return [v if isinstance(v, bytes) else str(v).encode() for v in items]
    dtype = NUMPY_OF[kind]
    values = list(value) if f.wire.dims != (1,) else [value]  # a pair: SDXL's sizes
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        for v in values:
            if not info.min <= v <= info.max:
                raise UsageError(f"{f.flag} {v} is out of range: the server takes it as "
                                 f"{kind}, {info.min} to {info.max}")
    return np.asarray(values, dtype=dtype)


def _read_file(flag: str, path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path} not found") from None
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be read ({e.strerror})") from None


def _bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's binary BYTES layout: each element as a little-endian uint32 length + bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def encode_request(inputs: dict) -> tuple[bytes, int]:
    """(body, JSON header length) of an inference request; every input travels as binary."""
    header, blobs = {"inputs": [], "outputs": []}, []
    for name, value in inputs.items():
        kind, _ = PIPELINE_INPUTS[name]
        blob = _bytes_tensor(value) if kind == "BYTES" else np.ascontiguousarray(value).tobytes()
        header["inputs"].append({"name": name, "shape": [len(value)], "datatype": kind,
                                 "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header["outputs"] = [{"name": "images", "parameters": {"binary_data": True}},
                         {"name": "parameters", "parameters": {"binary_data": False}}]
    text = json.dumps(header).encode()
    return text + b"".join(blobs), len(text)


def decode_response(body: bytes, header_length: int | None) -> RemoteResult:
    text = body if header_length is None else body[:header_length]
    header = json.loads(text)
    offset = 0 if header_length is None else header_length
    outputs = {}
    for out in header.get("outputs", []):
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            raw = body[offset:offset + size]
            offset += size
            outputs[out["name"]] = np.frombuffer(raw, dtype=NUMPY_OF[out["datatype"]]).reshape(
                out["shape"])
        else:
            outputs[out["name"]] = out["data"]
    images, params = outputs.get("images"), outputs.get("parameters")
    if images is None or params is None:
        raise UsageError("the server's answer has no images; is it an ldm-serve pipeline?")
    return RemoteResult(np.asarray(images, dtype=np.uint8),
                        [json.loads(p) for p in params])


def infer_url(server: str) -> str:
    """``http://host:port`` (or ``host:port``) -> the pipeline's v2 infer endpoint."""
    url = server if "://" in server else f"http://{server}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--server {server!r} is not an http://HOST:PORT address")
    return f"{url.rstrip('/')}/v2/models/{PIPELINE_MODEL}/infer"


def generate(server: str, inputs: dict, timeout: float = DEFAULT_TIMEOUT_S) -> RemoteResult:
    """Send one request; a refused one comes back as the server's one-line UsageError."""
    url = infer_url(server)
    body, header_length = encode_request(inputs)
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length)})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
            length = resp.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as e:
        raise UsageError(_server_error(e)) from None
    except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"cannot reach the server at {server} ({reason}); is `ldm-serve` "
                         f"running there?") from None
    return decode_response(data, None if length is None else int(length))


def _server_error(e: urllib.error.HTTPError) -> str:
    """The server's message (the pipeline's one line, or Triton's own)."""
    try:
        msg = json.loads(e.read() or b"{}").get("error", "")
    except (ValueError, AttributeError):
        msg = ""
    if e.code == 404:
        return f"the server has no {PIPELINE_MODEL} model ({msg or 'not found'}); serve a " \
               f"bundle with `ldm-serve BUNDLE`"
    first = msg.strip().splitlines()[0] if msg.strip() else f"HTTP {e.code}"
    return first if e.code == 400 else f"the server failed: {first}"


def served_inputs(options: dict) -> dict:
    """ldm-run's option values (by name, as click gives them) as the pipeline's inputs;
    files travel as their bytes."""
    from . import validate

    if options.get("seed") is not None:
        validate.seed(options["seed"])  # a UINT64 cannot carry what the server would refuse
    return request_inputs(**{f.option: options.get(f.option) for f in SERVED})
