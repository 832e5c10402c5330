"""Read facts from an ONNX model without the onnx package and without loading weights: a
small walk over the protobuf wire format.

* ``external_locations``: the external-data files a model points at. Lets the manifest
  reader refuse a graph whose weights live outside the bundle before any backend opens it
  (onnxruntime 1.32 refuses such paths too; other backends may not). Covers initializers
  of the main graph and of subgraphs, and tensors in node attributes.
* ``graph_io``: the main graph's inputs and outputs with element type and shape, so that
  reading an Optimum folder does not open a multi-GB graph once just to learn them.
"""

from __future__ import annotations

import mmap
from pathlib import Path

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12
_TENSOR_NAME = 8
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_TYPE_ELEM, _TENSOR_TYPE_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2
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


def _fields(buf, pos: int, end: int, values: bool = False):
    """Yield (field number, payload start, payload end) for each field of the message in
    ``buf[pos:end]``; start is None for scalar fields. Offsets only: nothing is copied.
    ``values``: for varint fields yield (field, None, value) instead."""
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, None, (value if values else None)
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


def _text(buf, s: int, e: int) -> str:
    return bytes(buf[s:e]).decode("utf-8", "replace")


def _value_info(buf, a: int, b: int) -> tuple[str, tuple[str, list]]:
    """(name, (dtype, shape)) of a ValueInfoProto; a dim is an int, its symbolic name, or
    None when unknown (as onnxruntime's session metadata reports them)."""
    name, dtype, shape = "", "unknown", []
    for field, s, e in _fields(buf, a, b):
        if field == _VALUE_NAME and s is not None:
            name = _text(buf, s, e)
        elif field == _VALUE_TYPE and s is not None:
            for tf, ts, te in _fields(buf, s, e):
                if tf != _TYPE_TENSOR or ts is None:
                    continue
                for f, fs, fe in _fields(buf, ts, te, values=True):
                    if f == _TENSOR_TYPE_ELEM and fs is None:
                        dtype = _ELEM_TYPES.get(fe, f"elem_type {fe}")
                    elif f == _TENSOR_TYPE_SHAPE and fs is not None:
                        for df, ds, de in _fields(buf, fs, fe):
                            if df == _SHAPE_DIM and ds is not None:
                                shape.append(_dim(buf, ds, de))
    return name, (dtype, shape)


def _dim(buf, a: int, b: int):
    dim = None
    for f, s, v in _fields(buf, a, b, values=True):
        if f == _DIM_VALUE and s is None:
            dim = v - (1 << 64) if v >= 1 << 63 else v  # int64 on the wire
        elif f == _DIM_PARAM and s is not None:
            dim = _text(buf, s, v)
    return dim


# onnx.TensorProto.DataType -> numpy-style names
_ELEM_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
               7: "int64", 8: "string", 9: "bool", 10: "float16", 11: "float64",
               12: "uint32", 13: "uint64", 16: "bfloat16"}


def _open_model(path: str | Path):
    f = open(path, "rb")
    try:
        if Path(path).stat().st_size == 0:
            raise ScanError("empty file")
        return f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except BaseException:
        f.close()
        raise


def external_locations(path: str | Path) -> list[str]:
    """Distinct external-data locations named by the model at ``path``."""
    f, mm = _open_model(path)
    with f, mm:
        out: list[str] = []
        for field, s, e in _fields(mm, 0, len(mm)):
            if field == _MODEL_GRAPH and s is not None:
                _graph_locations(mm, s, e, out)
        return sorted(set(out))


def graph_io(path: str | Path) -> tuple[dict, dict]:
    """({input: (dtype, shape)}, {output: (dtype, shape)}) of the model's main graph, in
    graph order. Inputs that are also initializers (IR < 4 models list them) are left out,
    as onnxruntime leaves them out of ``get_inputs()``."""
    f, mm = _open_model(path)
    with f, mm:
        graph = None
        for field, s, e in _fields(mm, 0, len(mm)):
            if field == _MODEL_GRAPH and s is not None:
                graph = (s, e)
        if graph is None:
            raise ScanError("no graph in the file")
        inputs, outputs, initializers = {}, {}, set()
        for field, s, e in _fields(mm, *graph):
            if s is None:
                continue
            if field == _GRAPH_INPUT:
                name, io = _value_info(mm, s, e)
                inputs[name] = io
            elif field == _GRAPH_OUTPUT:
                name, io = _value_info(mm, s, e)
                outputs[name] = io
            elif field == _GRAPH_INITIALIZER:
                initializers.update(_text(mm, fs, fe) for f, fs, fe in _fields(mm, s, e)
                                    if f == _TENSOR_NAME and fs is not None)
        return {k: v for k, v in inputs.items() if k not in initializers}, outputs


# -- initializers (LoRA: the base weights the deltas are added to) -------------------------------
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_INT32_DATA = 1, 2, 4, 5
_TENSOR_RAW_DATA, _TENSOR_DATA_LOCATION = 9, 14
_EXT_KEYS = ("location", "offset", "length")


def _packed_varints(buf, s: int, e: int) -> list[int]:
    out, pos = [], s
    while pos < e:
        v, pos = _varint(buf, pos)
        out.append(v)
    return out


def _initializer_info(buf, a: int, b: int) -> dict:
    """name, dtype, dims and where the data is: ("raw", start, end), ("float", start, end),
    ("int32", start, end) inline, or ("external", location, offset, length)."""
    info = {"name": "", "dtype": "unknown", "dims": [], "data": None}
    ext = {}
    for field, s, e in _fields(buf, a, b, values=True):
        if field == _TENSOR_NAME and s is not None:
            info["name"] = _text(buf, s, e)
        elif field == _TENSOR_DATA_TYPE and s is None:
            info["dtype"] = _ELEM_TYPES.get(e, f"elem_type {e}")
        elif field == _TENSOR_DIMS:
            info["dims"] += _packed_varints(buf, s, e) if s is not None else [e]
        elif field == _TENSOR_RAW_DATA and s is not None:
            info["data"] = ("raw", s, e)
        elif field in (_TENSOR_FLOAT_DATA, _TENSOR_INT32_DATA) and s is not None:
            info["data"] = ("float" if field == _TENSOR_FLOAT_DATA else "int32", s, e)
        elif field == _TENSOR_EXTERNAL_DATA and s is not None:
            entry = {f: _text(buf, fs, fe) for f, fs, fe in _fields(buf, s, e) if fs is not None}
            ext[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
    if ext:
        info["data"] = ("external", ext.get("location", ""), int(ext.get("offset", 0) or 0),
                        int(ext["length"]) if ext.get("length") else None)
    return info


def read_initializers(path: str | Path, names) -> dict:
    """{name: numpy array} for the main-graph initializers of the model at ``path`` named in
    ``names`` (float32 or float16; inline or in external-data files beside the model).
    Raises ScanError for a name the graph lacks or a layout this reader does not know."""
    wanted = set(names)
    out = dict(iter_initializers(path, lambda info: info["name"] in wanted))
    missing = wanted - set(out)
    if missing:
        raise ScanError(f"the graph has no initializer {sorted(missing)[0]!r}")
    return out


def iter_initializers(path: str | Path, keep):
    """(name, numpy array) of each main-graph initializer for which ``keep(info)`` is true
    (``info``: name, dtype, dims), one at a time: a multi-GB graph is never held whole."""
    f, mm = _open_model(path)
    with f, mm:
        infos = []
        for field, s, e in _fields(mm, 0, len(mm)):
            if field == _MODEL_GRAPH and s is not None:
                infos += [i for gf, gs, ge in _fields(mm, s, e)
                          if gf == _GRAPH_INITIALIZER and gs is not None
                          for i in [_initializer_info(mm, gs, ge)] if keep(i)]
        for info in infos:
            d = info["data"]
            blob = None if d is None or d[0] == "external" else bytes(mm[d[1]:d[2]])
            yield info["name"], _array(path, info, blob)


def _array(path, info: dict, blob):
    import numpy as np

    dtype = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1"),
             "uint8": np.dtype("u1"), "int32": np.dtype("<i4")}.get(info["dtype"])
    if dtype is None or info["data"] is None:
        raise ScanError(f"initializer {info['name']!r} is {info['dtype']}, which this reader "
                        f"does not read")
    kind = info["data"][0]
    if kind == "external":
        _, loc, offset, length = info["data"]
        count = int(np.prod(info["dims"], dtype=np.int64))
        blob = read_external(Path(path).parent, loc, offset,
                             length if length is not None else count * dtype.itemsize)
        kind = "raw"
    if kind == "raw":
        arr = np.frombuffer(blob, dtype=dtype)
    elif kind == "float":
        arr = np.frombuffer(blob, dtype="<f4").astype(dtype)
    elif dtype == np.dtype("<f2"):  # float16 stored as int32 values, one per element (varints)
        arr = np.array(_packed_varints(blob, 0, len(blob)), dtype=np.uint16).view(dtype)
    else:  # int8/uint8/int32 as int32 values (varints, packed; negatives as 64-bit)
        vals = [v - (1 << 64) if v >= 1 << 63 else v for v in _packed_varints(blob, 0, len(blob))]
        arr = np.array(vals, dtype=np.int64).astype(dtype)
    return arr.reshape(info["dims"]).copy()


def read_external(folder: str | Path, location: str, offset: int, length: int | None) -> bytes:
    """The bytes of one external-data entry (``length`` None: to the end of the file), read
    directly: onnx's own loader refuses a data file with several hard links, and bundles
    link theirs (``ldm-export triton``, ``cp -al``). What its checks guard is held here: the
    location is a file name inside ``folder``, and offset and length lie within that file."""
    base = Path(folder).resolve()
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise ScanError(f"external data location {location!r}: not a file name inside the "
                        f"graph's folder")
    path = (base / rel).resolve()
    if base not in path.parents or not path.is_file():
        raise ScanError(f"external data {location!r} is not a file inside {folder}")
    size = path.stat().st_size
    end = size if length is None else offset + length
    if offset < 0 or end > size:
        raise ScanError(f"bytes {offset}..{end} of {location} are past its end ({size} "
                        f"bytes); the graph and its data file do not belong together")
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(end - offset)


def initializer_dtypes(path: str | Path) -> dict[str, tuple[str, bool]]:
    """{name: (dtype, stored as external data)} of every main-graph initializer (no data read)."""
    out = {}
    f, mm = _open_model(path)
    with f, mm:
        for field, s, e in _fields(mm, 0, len(mm)):
            if field == _MODEL_GRAPH and s is not None:
                for gf, gs, ge in _fields(mm, s, e):
                    if gf == _GRAPH_INITIALIZER and gs is not None:
                        info = _initializer_info(mm, gs, ge)
                        external = info["data"] is not None and info["data"][0] == "external"
                        out[info["name"]] = (info["dtype"], external)
    return out


def patched_model(path: str | Path, weights: dict) -> bytes:
    """The bytes of the model at ``path`` with the inline data of each initializer named in
    ``weights`` overwritten by that array (same dtype and size: LoRA's merged weights), for
    onnxruntime to open from memory; the file is not changed. (onnxruntime's
    ``add_initializer`` is not enough: its NCHWc layout pass still packs a Conv's original
    weight.) Raises ScanError for a name the graph lacks or stores other than as raw data."""
    import numpy as np

    data = bytearray(Path(path).read_bytes())
    places = {}
    for field, s, e in _fields(data, 0, len(data)):
        if field == _MODEL_GRAPH and s is not None:
            for gf, gs, ge in _fields(data, s, e):
                if gf == _GRAPH_INITIALIZER and gs is not None:
                    info = _initializer_info(data, gs, ge)
                    if info["name"] in weights:
                        places[info["name"]] = info
    for name, value in weights.items():
        info = places.get(name)
        if info is None or info["data"] is None or info["data"][0] != "raw":
            raise ScanError(f"initializer {name!r} is not stored inline as raw data")
        _, a, b = info["data"]
        blob = np.ascontiguousarray(value).astype(np.asarray(value).dtype.newbyteorder("<")).tobytes()
        if len(blob) != b - a:
            raise ScanError(f"initializer {name!r} has {b - a} bytes, the new value {len(blob)}")
        data[a:b] = blob
    return bytes(data)


# -- nodes (LoRA on INT8: which DequantizeLinear feeds which layer) -------------------------------
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP = 1, 2, 3, 4
_ATTR_NAME, _ATTR_I = 1, 3


def graph_nodes(path: str | Path) -> list[dict]:
    """The main graph's nodes: {"name", "op", "inputs", "outputs", "ints": {attribute: int}}
    (integer attributes only), without reading any weights."""
    f, mm = _open_model(path)
    with f, mm:
        out = []
        for field, s, e in _fields(mm, 0, len(mm)):
            if field != _MODEL_GRAPH or s is None:
                continue
            for gf, gs, ge in _fields(mm, s, e):
                if gf != _GRAPH_NODE or gs is None:
                    continue
                node = {"name": "", "op": "", "inputs": [], "outputs": [], "ints": {}}
                for nf, ns, ne in _fields(mm, gs, ge):
                    if ns is None:
                        continue
                    if nf == _NODE_INPUT:
                        node["inputs"].append(_text(mm, ns, ne))
                    elif nf == _NODE_OUTPUT:
                        node["outputs"].append(_text(mm, ns, ne))
                    elif nf == _NODE_NAME:
                        node["name"] = _text(mm, ns, ne)
                    elif nf == _NODE_OP:
                        node["op"] = _text(mm, ns, ne)
                    elif nf == _NODE_ATTRIBUTE:
                        name, value = "", None
                        for af, as_, ae in _fields(mm, ns, ne, values=True):
                            if af == _ATTR_NAME and as_ is not None:
                                name = _text(mm, as_, ae)
                            elif af == _ATTR_I and as_ is None:
                                value = ae - (1 << 64) if ae >= 1 << 63 else ae
                        if value is not None:
                            node["ints"][name] = value
                out.append(node)
        return out


def int32_dequantize(path: str | Path) -> list[str]:
    """The DequantizeLinear nodes of the main graph whose quantised input is an INT32
    initializer (onnxruntime's int32 Conv/Gemm biases). TensorRT's ONNX parser refuses them
    (it dequantizes only 8-bit and narrower types), so no graph holding one is handed to it."""
    int32 = {name for name, (dtype, _) in initializer_dtypes(path).items() if dtype == "int32"}
    return [n["name"] or n["outputs"][0] for n in graph_nodes(path)
            if n["op"] == "DequantizeLinear" and n["inputs"] and n["inputs"][0] in int32]
