"""Read a ``.safetensors`` file with numpy alone (the lean runtime has no ``safetensors``).

The format: 8 bytes, the little-endian length N of a JSON header; the header, mapping each
tensor's name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the
bytes that follow the header) and an optional ``"__metadata__"`` of string pairs; then the
raw little-endian tensor bytes. F32, F16 and BF16 tensors come back as float32 arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# a LoRA's header is a few hundred kB at most; anything this large is not a header
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "F64": np.dtype("<f8")}


class SafetensorsError(ValueError):
    """Not a readable safetensors file; the message says why (without the file's name)."""


def _header(data: bytes) -> tuple[dict, int]:
    if len(data) < 8:
        raise SafetensorsError("it is too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n <= 1 or n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise SafetensorsError("it is not a safetensors file (no valid header)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SafetensorsError("it is not a safetensors file (header is not JSON)")
    if not isinstance(header, dict):
        raise SafetensorsError("it is not a safetensors file (header is not an object)")
    return header, 8 + n


def _tensor(data: bytes, start: int, name: str, info) -> np.ndarray:
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
        raise SafetensorsError(f"tensor {name!r} has a malformed header entry")
    dtype = _DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise SafetensorsError(f"tensor {name!r} is {info.get('dtype')}, not a float type")
    shape = tuple(int(d) for d in info["shape"])
    try:
        a, b = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"tensor {name!r} has no valid data_offsets")
    count = int(np.prod(shape, dtype=np.int64))
    if a < 0 or b < a or start + b > len(data) or b - a != count * dtype.itemsize:
        raise SafetensorsError(f"tensor {name!r} lies outside the file (truncated copy?)")
    raw = np.frombuffer(data, dtype=dtype, count=count, offset=start + a).reshape(shape)
    if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def read_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({name: float32 array}, metadata) of the file at ``path``. Raises OSError when it
    cannot be read and SafetensorsError when it is not a safetensors file of float tensors."""
    data = Path(path).read_bytes()
    header, start = _header(data)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise SafetensorsError("its __metadata__ is not an object")
    return {k: _tensor(data, start, k, v) for k, v in header.items()}, meta


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write float32/float16 arrays as a safetensors file (tests and tools; the reverse of
    ``read_safetensors``)."""
    names = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16"}
    header, blobs, offset = {}, [], 0
    for k, v in tensors.items():
        v = np.ascontiguousarray(v)
        kind = names[v.dtype.newbyteorder("<")]
        b = v.astype(v.dtype.newbyteorder("<")).tobytes()
        header[k] = {"dtype": kind, "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
