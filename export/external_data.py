"""Gather a large graph's weights into one ``<name>.onnx.data`` file without loading them.

``torch.onnx.export`` writes a graph over 2 GB with its weights outside the protobuf (the
TorchScript exporter: one file per tensor; dynamo: one file). Re-saving it with ``onnx.save``
would first load every weight (a second copy of a 10 GB U-Net beside the torch model), so the
tensors are copied file to file here, a chunk at a time, and only the graph (kilobytes to a
few MB) is loaded and rewritten with the new locations.
"""

from __future__ import annotations

from pathlib import Path

# tensors at least this big go to the .data file; smaller ones stay in the graph, as
# onnx.save_model's size_threshold=1024 in onnx_export._finalise leaves them
INLINE_LIMIT = 1024
# copy in 64 MiB pieces: few system calls, and a buffer that is nothing beside the weights
COPY_CHUNK = 64 * 2**20


def _tensors(graph):
    """Every TensorProto of ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def _copy(src: Path, offset: int, length: int | None, out) -> int:
    with open(src, "rb") as f:
        f.seek(offset)
        left = length if length is not None else src.stat().st_size - offset
        n = 0
        while left:
            piece = f.read(min(COPY_CHUNK, left))
            if not piece:
                raise OSError(f"{src.name}: external data ends {left} bytes early")
            out.write(piece)
            n += len(piece)
            left -= len(piece)
    return n


def _append(tensor, base: Path, out) -> int | None:
    """Append ``tensor``'s bytes to ``out``; None where it stays in the graph."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        return _copy(base / info.location, int(info.offset or 0),
                     int(info.length) if info.length else None, out)
    if tensor.data_location != onnx.TensorProto.EXTERNAL and len(tensor.raw_data) >= INLINE_LIMIT:
        out.write(tensor.raw_data)
        return len(tensor.raw_data)
    return None


def gather_external_data(raw: Path, dest: Path) -> list[Path]:
    """Write ``dest`` and ``dest.data`` from the exported ``raw`` graph and its external files;
    return both paths. Peak memory: the graph without weights plus one chunk."""
    import onnx

    proto = onnx.load(str(raw), load_external_data=False)
    data = dest.with_name(dest.name + ".data")
    offset = 0
    with open(data, "wb") as out:
        for tensor in _tensors(proto.graph):
            n = _append(tensor, raw.parent, out)
            if n is None:
                continue
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data.name), ("offset", offset), ("length", n)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += n
    onnx.save_model(proto, str(dest))
    onnx.checker.check_model(str(dest))
    return [dest, data]
