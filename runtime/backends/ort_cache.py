"""A disk cache of the graphs onnxruntime optimises for this CPU, on by default.

Opening the SD1.5 U-Net with every graph optimisation costs 8.7 s (2 threads) on this
machine, in each new process. onnxruntime can save the graph it ends up with; opened again
with optimisation off, that graph opens in 1.3 s and computes the same numbers at the same
speed (`python benchmarks/bench_ort_cache.py BUNDLE`). The saved graph is only valid for the
onnxruntime version and CPU that made it, and it is a second copy of the weights (3.3 GB for
SD1.5), so it lives in the user's cache (``runtime.fsutil.cache_dir()/ort-graphs``), keyed by
the graph files' sha256, the onnxruntime version and the CPU. ``ldm-run --no-ort-cache``,
``Pipeline(ort_cache=False)`` or ``LDM_EDGE_ORT_CACHE=0`` turn it off.

An entry is written into a hidden folder and renamed into place once onnxruntime has
written it whole; ``entry.json`` records the file sizes and is checked on every use. A
damaged or unloadable entry is deleted and made again; a cache that cannot be written
(read-only, disk full) is skipped with a warning, never an error. The cache is kept under
``LDM_EDGE_ORT_CACHE_MAX_GB`` (the least recently used entries go first), and an entry is
not written where it would leave the disk less than ``FREE_MARGIN_BYTES``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from ..cpu import cpu_identity
from ..fsutil import atomic_write_json, cache_dir, sha256_cached

log = logging.getLogger(__name__)

ENV = "LDM_EDGE_ORT_CACHE"
SUBDIR = "ort-graphs"
MODEL, DATA, ENTRY = "model.onnx", "model.onnx.data", "entry.json"
CACHE_FORMAT = 1  # bump when the layout of an entry changes
# Initializers at least this big go to the one external-data file; smaller ones stay in the
# graph (a > 2 GB graph cannot be one protobuf).
EXTERNAL_MIN_BYTES = 1024
# A staged entry untouched this long belongs to a process that died: writing the SD1.5
# U-Net's entry takes under a minute here.
STALE_S = 3600


# The cache's size bound, GB (10**9 bytes; LDM_EDGE_ORT_CACHE_MAX_GB): room for the SDXL
# U-Net's FP32 entry (10.3 GB) with SD1.5's FP32, FP16 and INT8 U-Nets (3.3 + 1.7 + 0.9 GB)
# and their text encoders and VAEs beside it.
MAX_GB_ENV = "LDM_EDGE_ORT_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
# An entry is not written where it would leave less than this free on the cache's disk: a
# default-on cache must never be what fills a small device's disk.
FREE_MARGIN_BYTES = 2 * 2**30
# labels of the graphs this process stored (ldm-run says so once, after its run)
STORED: list[str] = []


def wanted() -> bool:
    """On unless $LDM_EDGE_ORT_CACHE says 0, false, no or off."""
    return os.environ.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


def max_bytes() -> int:
    try:
        gb = float(os.environ.get(MAX_GB_ENV, DEFAULT_MAX_GB))
    except ValueError:
        log.warning("%s=%r is not a number; using %g", MAX_GB_ENV, os.environ[MAX_GB_ENV],
                    DEFAULT_MAX_GB)
        gb = DEFAULT_MAX_GB
    return int(max(gb, 0.0) * 1e9)


def entry_key(graph_files: list[Path], ort_version: str, level: str = "all") -> str:
    """Key of the optimised form of the graph made of ``graph_files`` (graph first, then its
    external data): their sha256 (remembered per file), onnxruntime, the CPU, the level."""
    h = hashlib.sha256()
    for part in [str(CACHE_FORMAT), ort_version, cpu_identity(), level]:
        h.update(part.encode() + b"\0")
    for f in graph_files:
        h.update(sha256_cached(f).encode() + b"\0")
    return h.hexdigest()[:40]


def graph_files(path: Path) -> list[Path]:
    """The graph at ``path`` and the external-data files it names. Raises OSError
    or onnx_scan.ScanError for a file that cannot be read."""
    from ..bundle.onnx_scan import external_locations

    path = Path(path)
    return [path] + [path.parent / loc for loc in external_locations(path)]


def graph_key(path: Path, files: list[Path] | None = None) -> str:
    """``entry_key`` of the graph at ``path`` (its ``graph_files``, when not given), for the
    onnxruntime installed here."""
    import onnxruntime as ort

    return entry_key(files or graph_files(path), ort.__version__)


class GraphCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / SUBDIR

    def lookup(self, key: str) -> Path | None:
        """The cached graph for ``key`` when its entry is whole; a damaged one is removed."""
        folder = self.root / key
        if not folder.is_dir():
            return None
        try:
            entry = json.loads((folder / ENTRY).read_text())
            whole = all((folder / name).stat().st_size == size
                        for name, size in entry["sizes"].items())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            whole = False
        if not whole:
            log.warning("onnxruntime graph cache: entry %s is incomplete; making it again", key)
            self.remove(key)
            return None
        try:
            os.utime(folder / ENTRY)  # used now: the last to go when the cache is trimmed
        except OSError:
            pass
        return folder / MODEL

    def room_for(self, nbytes: int) -> bool:
        """Whether an entry of about ``nbytes`` leaves FREE_MARGIN_BYTES free on the disk
        and fits the cache's bound at all."""
        if nbytes > max_bytes():
            return False
        probe = self.root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            return shutil.disk_usage(probe).free >= nbytes + FREE_MARGIN_BYTES
        except OSError:
            return False

    def trim(self, keep: str) -> None:
        """Remove the least recently used entries (not ``keep``) until the cache is within
        its bound."""
        entries = []
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
                entries.append(((folder / ENTRY).stat().st_mtime, size, folder))
            except OSError:
                continue
        total, bound = sum(e[1] for e in entries), max_bytes()
        for _, size, folder in sorted(entries, key=lambda e: e[0]):
            if total <= bound:
                break
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)
                total -= size

    def stage(self, key: str) -> Path:
        """A new hidden folder to let onnxruntime write the optimised graph into. Folders
        left by a process killed while writing (older than STALE_S) are removed first."""
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in self.root.glob(".*.partial"):
            try:
                if now - old.stat().st_mtime > STALE_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        folder = self.root / f".{key}.{uuid.uuid4().hex[:8]}.partial"
        folder.mkdir()
        return folder

    def commit(self, key: str, staged: Path) -> Path | None:
        """Record the sizes and rename the staged folder into place; None if it could not be."""
        try:
            sizes = {p.name: p.stat().st_size for p in staged.iterdir() if p.is_file()}
            if MODEL not in sizes:
                raise OSError("onnxruntime wrote no optimised graph")
            atomic_write_json(staged / ENTRY, {"format": CACHE_FORMAT, "sizes": sizes})
            final = self.root / key
            if final.exists():  # another process got there first
                shutil.rmtree(staged, ignore_errors=True)
            else:
                os.replace(staged, final)
            return final / MODEL
        except OSError as e:
            log.warning("onnxruntime graph cache: could not store the optimised graph (%s)", e)
            shutil.rmtree(staged, ignore_errors=True)
            return None

    def remove(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)
