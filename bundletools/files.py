"""Bundle file records and manifest edits, torch-free: engines and precision variants are
made on devices (Jetsons) that have no PyTorch, so this must not import the exporter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ldm_edge.runtime.fsutil import atomic_write_json, sha256_file
from ldm_edge.runtime.manifest import MANIFEST_NAME


def file_record(path: Path, root: Path) -> dict:
    """What the manifest records of one file: its path in the bundle, size and sha256."""
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size,
            "sha256": sha256_file(path)}


def update_manifest(bundle: str | Path, change: Callable[[dict], None]) -> dict:
    """Read, change and atomically rewrite a bundle's manifest (new files are written first,
    so until this rename the bundle is the old, whole one)."""
    path = Path(bundle) / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    change(manifest)
    atomic_write_json(path, manifest)
    return manifest
