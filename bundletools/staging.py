"""Write a bundle folder atomically: build it in a hidden sibling, rename it into place.

A crash or a failed check never leaves something at ``out`` that loads as a bundle, and a
previous bundle is replaced only once the new one is whole (survives ``kill -9``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from ldm_edge.runtime.errors import ExportError


@contextlib.contextmanager
def staged_dir(out: Path, force: bool):
    """Yield a fresh hidden folder next to ``out``; on success it replaces ``out``."""
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_stages(out)
        stage = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
    except OSError as e:
        raise ExportError(f"cannot write next to {out}: {e.strerror or e}")
    try:
        yield stage
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise ExportError(f"disk full while writing {out}; nothing was written — free space "
                              f"and rerun") from None
        raise ExportError(f"cannot write {out}: {e.strerror or e}; nothing was written") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale_stages(out: Path) -> None:
    """Clean up after an export that was killed (its process is gone): a previous bundle
    it had moved aside is put back if nothing replaced it; half-built folders go."""
    for leftover in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = leftover.name.rpartition("-")
        if not (kind.endswith(".partial") or kind.endswith(".old")) or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        if kind.endswith(".old") and not out.exists():
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
