"""What this CPU is, as far as onnxruntime's choice of kernels goes.

Two facts: ``cpu_identity()`` (model and feature flags; the ORT graph cache keys its entries
with it) and ``int8_kernels()``, which of onnxruntime's two families of x86 INT8 kernels runs
here. With VNNI (AVX512-VNNI or AVX-VNNI) the u8 x s8 dot products accumulate straight into
int32. Without it (AVX2-only CPUs such as AMD EPYC up to Zen 3, AVX-512 CPUs before Cascade
Lake) MLAS uses VPMADDUBSW, whose 16-bit pair sums saturate, so the same Q/DQ graph draws a
measurably different picture there (onnxruntime's quantization guide; PITFALLS.md measured
it). Quality figures of INT8 are therefore per kind, and say which.
"""

from __future__ import annotations

import platform
from pathlib import Path

VNNI = "vnni"
NO_VNNI = "no-vnni"
NOT_X86 = "not-x86"


def _proc_cpuinfo() -> tuple[str, str]:
    """(model name, feature flags) from /proc/cpuinfo; empty strings where it is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", ""
    model = flags = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "CPU part") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = " ".join(sorted(value.split()))
    return model, flags


def cpu_identity() -> str:
    """The CPU model and feature flags: what decides which kernels and layouts onnxruntime
    picks. Falls back to the platform's processor name where /proc/cpuinfo is missing."""
    model, flags = _proc_cpuinfo()
    if not (model or flags):
        return f"{platform.machine()}|{platform.processor()}"
    return f"{platform.machine()}|{model}|{flags}"


def int8_kernels() -> str:
    """``"vnni"``, ``"no-vnni"`` or ``"not-x86"``: which INT8 kernels onnxruntime uses here.

    Read from CPUID through numpy's own dispatch table (what the process really gets, also
    under an emulator that hides features /proc/cpuinfo still lists), plus /proc/cpuinfo's
    ``avx_vnni`` flag, which numpy does not report."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return NOT_X86
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    if features.get("AVX512VNNI") and features.get("AVX512BW"):
        return VNNI
    if features.get("AVX2") and "avx_vnni" in _proc_cpuinfo()[1].split():
        return VNNI
    return NO_VNNI


def cpu_summary() -> dict:
    """What a measured INT8 figure records of the CPU it was measured on."""
    model = _proc_cpuinfo()[0] or platform.processor()
    return {"machine": platform.machine(), "model": model, "int8_kernels": int8_kernels()}
