"""``ldm-run --server URL``: one request to a served ``ldm_pipeline`` over KServe v2 HTTP.

The wire format is KServe's v2 inference protocol as Triton speaks it, with Triton's
binary-data extension for the init image (in) and the images (out), so a 512² picture is not
sent as a JSON list of numbers. Standard library only: the lean runtime gains no dependency.

``PIPELINE_INPUTS`` is the served model's interface, written once: the Triton model
repository writer (serve/repository.py) builds the model's config.pbtxt from it.
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

PIPELINE_MODEL = "ldm_pipeline"
# input name -> (KServe datatype, dims). All but the prompt are optional: a missing one takes
# the bundle's default, as a missing ldm-run option does. FP64 for the floats: ldm-run reads
# them as Python floats, and the PNG records them as they were given.
PIPELINE_INPUTS = {
    "prompt": ("BYTES", [-1]),
    "negative_prompt": ("BYTES", [-1]),
    "steps": ("INT32", [1]),
    "guidance_scale": ("FP64", [1]),
    "scheduler": ("BYTES", [1]),
    "seed": ("UINT64", [1]),
    "height": ("INT32", [1]),
    "width": ("INT32", [1]),
    "num_images": ("INT32", [1]),
    "init_image": ("BYTES", [1]),  # the image file's bytes, as ldm-run would read them
    "init_image_name": ("BYTES", [1]),  # its file name, recorded in the PNG
    "strength": ("FP64", [1]),
}
# images: uint8 [n, H, W, 3]; parameters: one JSON text per image, what its PNG records
PIPELINE_OUTPUTS = {"images": ("UINT8", [-1, -1, -1, 3]), "parameters": ("BYTES", [-1])}
NUMPY_OF = {"INT32": np.int32, "UINT64": np.uint64, "FP64": np.float64, "UINT8": np.uint8}
# a generation can take minutes on a CPU; the client waits this long for the answer
DEFAULT_TIMEOUT_S = 3600.0


@dataclass
class RemoteResult:
    images: np.ndarray  # uint8 [n, H, W, 3]
    parameters: list[dict]  # per image: what its PNG records

    def metadata(self, index: int) -> dict:
        return self.parameters[index]


def request_inputs(*, prompts, negative_prompt=None, steps=None, guidance_scale=None,
                   scheduler=None, seed=None, height=None, width=None, num_images=None,
                   init_image: bytes | None = None, init_image_name: str | None = None,
                   strength=None) -> dict:
    """The pipeline's named inputs for these ldm-run options (None: not sent)."""
    given = {"prompt": list(prompts), "negative_prompt": negative_prompt, "steps": steps,
             "guidance_scale": guidance_scale, "scheduler": scheduler, "seed": seed,
             "height": height, "width": width, "num_images": num_images,
             "init_image": init_image, "init_image_name": init_image_name,
             "strength": strength}
    out = {}
    for name, value in given.items():
        if value is None:
            continue
        kind, _ = PIPELINE_INPUTS[name]
        if kind == "BYTES":
            items = value if isinstance(value, list) else [value]
            out[name] = [v if isinstance(v, bytes) else str(v).encode() for v in items]
        else:
            out[name] = np.asarray([value], dtype=NUMPY_OF[kind])
    return out


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


# ldm-run options that say how this machine computes, or that only a local run can take:
# with --server they are refused rather than silently ignored (name -> its default)
LOCAL_ONLY = {"latents_path": (None, "--latents"), "backend": ("auto", "--backend"),
              "device": ("auto", "--device"), "precision": ("fp32", "--precision"),
              "threads": (0, "--threads"), "ort_cache": (None, "--ort-cache"),
              "low_memory": (False, "--low-memory"), "vae_tiling": (False, "--vae-tiling"),
              "vae_tile_size": (None, "--vae-tile-size"), "no_verify": (False, "--no-verify"),
              "loras": ((), "--lora")}


def check_local_only(options: dict) -> None:
    for key, (default, flag) in LOCAL_ONLY.items():
        if options.get(key, default) != default:
            raise UsageError(f"{flag} is for a local run; the server decides how it computes "
                             f"(drop {flag} or --server)")


def served_inputs(*, prompts, negative_prompt, steps, guidance_scale, scheduler, seed, height,
                  width, num_images, init_image, strength) -> dict:
    """ldm-run's options as the pipeline's inputs; the init image travels as its file's bytes."""
    from . import validate

    if seed is not None:
        validate.seed(seed)  # a UINT64 cannot carry what the server would refuse anyway
    data = None
    if init_image is not None:
        try:
            data = open(init_image, "rb").read()
        except FileNotFoundError:
            raise UsageError(f"--init-image {init_image} not found") from None
        except OSError as e:
            raise UsageError(f"--init-image {init_image} cannot be read ({e.strerror})") from None
    return request_inputs(prompts=prompts, negative_prompt=negative_prompt, steps=steps,
                          guidance_scale=guidance_scale, scheduler=scheduler, seed=seed,
                          height=height, width=width, num_images=num_images, init_image=data,
                          init_image_name=init_image, strength=strength)
