"""Reading a graph's external data (the ``.data`` file beside a large graph) into its tensors.

onnx's own loaders (``external_data_helper.load_external_data_for_tensor``,
``numpy_helper.to_array(tensor, folder)``) refuse a data file that has more than one hard
link (onnx 1.23), and bundle files are hard-linked by design: ``ldm-export triton`` links
the graphs into its model repository, and copies made with ``cp -al`` share them. So the
bundle tools read external data here: the location must be a relative path that stays
inside the graph's folder, and offset and length must lie within that file (what onnx's
checks are for); the bytes are then read directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ldm_edge.runtime.errors import BundleError


def _location(tensor) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in tensor.external_data}
    length = info.get("length")
    return info.get("location", ""), int(info.get("offset") or 0), \
        (int(length) if length else None)


def data_file(base_dir: str | Path, location: str) -> Path:
    """The external-data file ``location`` names, refused unless it is inside ``base_dir``."""
    base = Path(base_dir).resolve()
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise BundleError(f"external data location {location!r}: not a file name inside the "
                          f"graph's folder")
    path = (base / rel).resolve()
    if base not in path.parents or not path.is_file():
        raise BundleError(f"external data {location!r} is not a file inside {base_dir}")
    return path


def load_tensor(tensor, base_dir: str | Path) -> None:
    """Move one tensor's external data into it (``raw_data``); a tensor stored inline is left
    as it is."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return
    location, offset, length = _location(tensor)
    path = data_file(base_dir, location)
    size = os.path.getsize(path)
    end = size if length is None else offset + length
    if offset < 0 or end > size:
        raise BundleError(f"{tensor.name}: bytes {offset}..{end} of {location} are past its "
                          f"end ({size} bytes); the graph and its data file do not belong "
                          f"together")
    with open(path, "rb") as fh:
        fh.seek(offset)
        tensor.raw_data = fh.read(end - offset)
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


def load_all(model, base_dir: str | Path) -> None:
    """``load_tensor`` on every initializer of ``model``'s main graph."""
    for t in model.graph.initializer:
        load_tensor(t, base_dir)


def to_array(tensor, base_dir: str | Path) -> np.ndarray:
    """The tensor's values, read from its external data if it has some (``tensor`` itself is
    left as it is)."""
    from onnx import TensorProto, numpy_helper

    if tensor.data_location == TensorProto.EXTERNAL:
        loaded = TensorProto()
        loaded.CopyFrom(tensor)  # no bytes to copy yet: they are in the file
        load_tensor(loaded, base_dir)
        tensor = loaded
    return numpy_helper.to_array(tensor)
