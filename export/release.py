"""Keep a full-size export inside the machine's memory (SDXL's U-Net is 10.3 GB in FP32).

A *large* component (weights over ``EXTERNAL_DATA_THRESHOLD``, the size whose graph gets an
external ``.data`` file) is never held twice: its check computes the PyTorch outputs first,
then *parks* the module's weights in a memory-mapped file (clean file pages the kernel may drop,
not a second copy) before onnxruntime opens the graph; once the last component that uses a
large module is written, the module is *released* to the meta device (config kept, weights
gone). Small components go the way they always went.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import tempfile
from pathlib import Path

import torch

from ldm_edge.bundletools.save import EXTERNAL_DATA_THRESHOLD

log = logging.getLogger(__name__)

GIB = 2**30


def _status_gib(field: str) -> float:
    """A memory line of /proc/self/status in GiB; 0.0 where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def memory_note() -> str:
    """``RSS x GiB, peak y GiB`` of this process, for the export's log lines."""
    return f"RSS {_status_gib('VmRSS'):.1f} GiB, peak {_status_gib('VmHWM'):.1f} GiB"


def trim() -> None:
    """Collect garbage and hand freed heap pages back to the system: glibc keeps freed blocks
    below its mmap threshold (up to 32 MB, most weight tensors) in the heap otherwise."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def is_large(module: torch.nn.Module) -> bool:
    return weight_bytes(module) > EXTERNAL_DATA_THRESHOLD


def park(module: torch.nn.Module, folder: Path) -> None:
    """Move the module's weights into a memory-mapped file in ``folder`` (deleted at once: the
    mapping keeps it until the weights go); the module still runs and reads its weights."""
    with tempfile.TemporaryDirectory(prefix=".parked-", dir=folder) as tmp:
        path = Path(tmp) / "weights.pt"
        torch.save(module.state_dict(), path)
        state = torch.load(path, mmap=True, weights_only=True)
        module.load_state_dict(state, assign=True)
        del state
    trim()
    log.info("weights parked in a mapped file (%s)", memory_note())


def component_module(model, name: str) -> torch.nn.Module | None:
    """The model's module that component ``name`` is exported from."""
    if name == "text_encoder_2":
        return getattr(model.second_encoder, "text_encoder", None)
    if name.endswith("_tiny"):
        return model.tiny_vae
    attr = {"vae_decoder": "vae", "vae_encoder": "vae"}.get(name, name)
    return getattr(model, attr, None)


def release_finished(model, name: str, order: list[str]) -> None:
    """After component ``name`` of ``order`` is written: release its module to the meta
    device when it is large and no later component of ``order`` is exported from it."""
    module = component_module(model, name)
    if module is None or not is_large(module):
        return
    later = order[order.index(name) + 1:] if name in order else []
    if any(component_module(model, n) is module for n in later):
        return
    module.to("meta")
    trim()
    log.info("%s: PyTorch weights released (%s)", name, memory_note())
