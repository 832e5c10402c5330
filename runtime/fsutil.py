"""Atomic writes and hashing: a half-written file is never mistaken for a whole one."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def default_mode() -> int:
    """What open() would give a new file under the current umask (mkstemp makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, default_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def cache_dir() -> Path:
    """ldm-edge's per-user cache: $LDM_EDGE_CACHE, else $XDG_CACHE_HOME/ldm-edge, else
    ~/.cache/ldm-edge. Everything in it can be deleted at any time."""
    root = os.environ.get("LDM_EDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldm-edge")
    return Path(root)


def sha256_cached(path: str | os.PathLike) -> str:
    """sha256 of ``path``, remembered per (file, size, mtime, ctime, inode): a file that is
    rewritten, even to the same size and with its mtime put back, gets a new ctime and is
    hashed again. Saves re-reading a 3.4 GB U-Net at every start (4.4 s here). The cache
    is best effort: where it cannot be read or written, the file is simply hashed."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    cache_file = cache_dir() / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    digest = sha256_file(real)
    cache = {k: v for k, v in (cache.items() if isinstance(cache, dict) else ())
             if not k.startswith(real + "|")}
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file, cache)
    except OSError:
        pass
    return digest
