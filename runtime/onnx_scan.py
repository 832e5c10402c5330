"""List the external-data files an ONNX model points at, without the onnx package and
without loading weights: a small walk over the protobuf wire format.

Lets the manifest reader refuse a graph whose weights live outside the bundle before any
backend opens it (onnxruntime 1.32 refuses such paths too; other backends may not).
Covers initializers of the main graph and of subgraphs, and tensors in node attributes.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_TENSOR_EXTERNAL_DATA = 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class ScanError(ValueError):
    pass


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ScanError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ScanError("varint too long")


def _fields(buf, pos: int, end: int):
    """Yield (field number, payload start, payload end) for each field of the message in
    ``buf[pos:end]``; start is None for scalar fields. Offsets only: nothing is copied."""
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield field, None, None
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield field, None, None
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ScanError("field runs past the end of the file (truncated?)")
            yield field, pos, pos + n
            pos += n
        else:
            raise ScanError(f"unsupported wire type {wire}")
    if pos != end:
        raise ScanError("message runs past its end")


def _tensor_locations(buf, a: int, b: int, out: list) -> None:
    for field, s, e in _fields(buf, a, b):
        if field == _TENSOR_EXTERNAL_DATA and s is not None:
            entry = {f: bytes(buf[fs:fe]).decode("utf-8", "replace")
                     for f, fs, fe in _fields(buf, s, e) if fs is not None}
            if entry.get(_ENTRY_KEY) == "location":
                out.append(entry.get(_ENTRY_VALUE, ""))


def _graph_locations(buf, a: int, b: int, out: list) -> None:
    for field, s, e in _fields(buf, a, b):
        if s is None:
            continue
        if field == _GRAPH_INITIALIZER:
            _tensor_locations(buf, s, e, out)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            for f, fs, fe in _fields(buf, s, e):
                if f in (_SPARSE_VALUES, _SPARSE_INDICES) and fs is not None:
                    _tensor_locations(buf, fs, fe, out)
        elif field == _GRAPH_NODE:
            for f, fs, fe in _fields(buf, s, e):
                if f == _NODE_ATTRIBUTE and fs is not None:
                    _attribute_locations(buf, fs, fe, out)


def _attribute_locations(buf, a: int, b: int, out: list) -> None:
    for field, s, e in _fields(buf, a, b):
        if s is None:
            continue
        if field in (_ATTR_T, _ATTR_TENSORS):
            _tensor_locations(buf, s, e, out)
        elif field in (_ATTR_G, _ATTR_GRAPHS):
            _graph_locations(buf, s, e, out)


def external_locations(path: str | Path) -> list[str]:
    """Distinct external-data locations named by the model at ``path``."""
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            raise ScanError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            out: list[str] = []
            for field, s, e in _fields(mm, 0, len(mm)):
                if field == _MODEL_GRAPH and s is not None:
                    _graph_locations(mm, s, e, out)
            return sorted(set(out))
