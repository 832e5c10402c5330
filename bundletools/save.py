"""Save an ONNX graph into a bundle: inline when small, weights in one ``.data`` file when
the protobuf would pass its 2 GiB limit."""

from __future__ import annotations

from pathlib import Path

# protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def save_graph(proto, dest: Path) -> list[Path]:
    """Write ``proto`` to ``dest`` (and ``dest.data`` when large); return the files written."""
    import onnx

    data = dest.with_name(dest.name + ".data")
    for stale in (dest, data):
        stale.unlink(missing_ok=True)
    size = sum(len(t.raw_data) for t in proto.graph.initializer)
    if size > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [dest, data]
    onnx.save_model(proto, str(dest))
    return [dest]
