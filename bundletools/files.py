"""Bundle file records, torch-free: engines and precision variants are made on devices
(Jetsons) that have no PyTorch, so this must not import the exporter. Manifest edits go
through the typed schema (``ldm_edge.runtime.bundle.schema.edit_manifest``)."""

from __future__ import annotations

from pathlib import Path

from ldm_edge.runtime.bundle.schema import FileRecord
from ldm_edge.runtime.fsutil import sha256_file


def file_record(path: Path, root: Path) -> FileRecord:
    """What the manifest records of one file: its path in the bundle, size and sha256."""
    return FileRecord(path=path.relative_to(root).as_posix(), size=path.stat().st_size,
                      sha256=sha256_file(path))
