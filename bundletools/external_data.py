"""Reading a graph's external data (the ``.data`` file beside a large graph) into its tensors.

onnx's own loaders (``external_data_helper.load_external_data_for_tensor``,
``numpy_helper.to_array(tensor, folder)``) refuse a data file that has more than one hard
link (onnx 1.23), and bundle files are hard-linked by design: ``ldm-export triton`` links
the graphs into its model repository, and copies made with ``cp -al`` share them. So the
bundle tools read external data with the runtime's reader (``onnx_scan.read_external``:
the location must stay inside the graph's folder, offset and length inside the file).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldm_edge.runtime.bundle.onnx_scan import ScanError, read_external
from ldm_edge.runtime.errors import BundleError


def load_tensor(tensor, base_dir: str | Path) -> None:
    """Move one tensor's external data into it (``raw_data``); a tensor stored inline is left
    as it is."""
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return
    info = {e.key: e.value for e in tensor.external_data}
    length = info.get("length")
    try:
        tensor.raw_data = read_external(base_dir, info.get("location", ""),
                                        int(info.get("offset") or 0),
                                        int(length) if length else None)
    except ScanError as e:
        raise BundleError(f"{tensor.name}: {e}") from None
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
