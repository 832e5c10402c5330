"""The GPU install extras (pyproject.toml) each bring one CUDA major, never a mix.

Two tiers. Offline: the pins, read from pyproject.toml, admit the releases of their CUDA major
and refuse the others (release numbers from PyPI's metadata, below). Network (the tests named
``..._on_pypi``): ``pip install --dry-run --report`` resolves each extra, with the base
dependencies, against the package index as ``pip install 'ldm-edge[EXTRA]'`` would, and every
package and version it picks belongs to that CUDA major. Where the index cannot be reached
they skip, saying so; nothing is installed and, but for a few small source archives, only
metadata is fetched (a few seconds here).

TensorRT's ``tensorrt-cu1x-libs`` on PyPI are stub source archives (wheel-stub) whose metadata
exists only inside the real wheel on NVIDIA's index (pypi.nvidia.com, GBs): the dry run would
download it to build them. The network tests hand pip a tiny local wheel of that name and
exact version instead, so the libraries' own dependencies are not seen; their name and
version are still checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = {"trt-cu12": 12, "trt-cu13": 13, "gpu-cu12": 12, "gpu-cu13": 13}
# the packages that carry a CUDA major, per extra
PINNED = {"trt-cu12": ("tensorrt-cu12", "cuda-python"),
          "trt-cu13": ("tensorrt-cu13", "cuda-python"),
          "gpu-cu12": ("onnxruntime-gpu",), "gpu-cu13": ("onnxruntime-gpu",)}
# onnxruntime-gpu releases by the CUDA major of their build, from their metadata on PyPI
# (`pip install --dry-run --no-deps --report R onnxruntime-gpu==V`, Requires-Dist of the
# [cuda] extra): 1.21-1.26 pin nvidia-cuda-runtime-cu12 ~=12.0, 1.27-1.31 CUDA 13 ones
ORT_BUILDS = {12: SpecifierSet(">=1.21,<1.27"), 13: SpecifierSet(">=1.27")}
ORT_CUDA12 = ("1.21.0", "1.23.2", "1.26.0")
ORT_CUDA13 = ("1.27.0", "1.31.1")
ORT_OTHER = ("1.18.1", "1.20.2")  # no CUDA pins in their metadata: left out of both extras
# (releases an extra must admit, releases it must refuse): TensorRT 10.x for CUDA 12 from 10.3
# (JetPack 6.1's, MIN_TRT_VERSION), tensorrt-cu13 from its first release, 10.13.2; the major
# of cuda-python is its CUDA major
RELEASES = {
    12: {"tensorrt-cu12": (("10.3.0", "10.16.1.11"), ("10.2.0", "11.4.0.106")),
         "cuda-python": (("12.0.0", "12.9.10"), ("11.8.7", "13.0.0", "13.4.4")),
         "onnxruntime-gpu": (ORT_CUDA12, ORT_CUDA13 + ORT_OTHER)},
    13: {"tensorrt-cu13": (("10.13.2.6", "11.4.0.106"), ()),
         "cuda-python": (("13.0.0", "13.4.4"), ("12.9.10", "14.0.0")),
         "onnxruntime-gpu": (ORT_CUDA13, ORT_CUDA12 + ORT_OTHER)},
}
INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
# pip's words for an index it could not reach (then skip, not fail)
UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish|Temporary failure in name "
                         r"resolution|Network is unreachable|ConnectTimeout|ReadTimeout|"
                         r"ProxyError|Max retries exceeded|SSLError")
# one dry run takes 2-10 s here (metadata only); a slower one is a slow network, not a bug
PIP_TIMEOUT_S = 120
STUB_LIBS = re.compile(r"^tensorrt([-_.]cu\d+)?[-_.]libs$")
# tensorrt -> tensorrt_cu13 -> tensorrt_cu13_libs: the deepest chain of TensorRT's packages
TENSORRT_LEVELS = 3
# PyPI's CUDA library wheels: CUDA 12's carry a -cu12 suffix, CUDA 13's mostly none
CUDA_LIBRARY = re.compile(r"^nvidia-(cuda|cu|nvjitlink|nvtx|nccl|npp)")


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def extras() -> dict[str, list[str]]:
    return pyproject()["optional-dependencies"]


def base_dependencies() -> list[str]:
    return pyproject()["dependencies"]


# -- offline: the pins ----------------------------------------------------------------------
@pytest.mark.parametrize("extra", EXTRAS)
def test_each_extra_pins_its_cuda_major(extra):
    reqs = {Requirement(r).name: Requirement(r) for r in extras()[extra]}
    major = EXTRAS[extra]
    assert set(PINNED[extra]) <= set(reqs), (extra, sorted(reqs))
    for name in PINNED[extra]:
        admitted, refused = RELEASES[major][name]
        spec = reqs[name].specifier
        assert [v for v in admitted if v not in spec] == [], (extra, name, str(spec))
        assert [v for v in refused if v in spec] == [], (extra, name, str(spec))
    other = "cu13" if major == 12 else "cu12"
    assert not [n for n in reqs if other in n], (extra, sorted(reqs))
    assert "tensorrt" not in reqs  # the unsuffixed one follows the newest CUDA


def test_trt_extras_bring_a_polygraphy_that_drives_tensorrt_11():
    for extra in ("trt-cu12", "trt-cu13"):
        poly = [Requirement(r) for r in extras()[extra] if r.startswith("polygraphy")]
        assert len(poly) == 1 and "0.49.23" not in poly[0].specifier
        assert "0.49.24" in poly[0].specifier


def test_no_extra_leaves_the_cuda_major_to_the_resolver():
    """`trt` and `gpu` are gone: unpinned, they resolved to CUDA 13 on a CUDA 12 machine; every
    extra naming a CUDA-bound package is one of the four."""
    assert not {"trt", "gpu"} & set(extras())
    for name, reqs in extras().items():
        for r in map(Requirement, reqs):
            if r.name in ("onnxruntime-gpu", "cuda-python") or r.name.startswith("tensorrt"):
                assert name in EXTRAS, (name, str(r))


# -- network: what pip resolves ---------------------------------------------------------------
def cuda_major_problems(packages: list[tuple[str, str]], major: int) -> list[str]:
    """What in the resolved (name, version) list belongs to another CUDA major."""
    bad = []
    for name, version in packages:
        n, v = name.lower().replace("_", "-"), Version(version)
        suffix = re.search(r"-cu(\d+)(-|$)", n)
        if suffix and int(suffix.group(1)) != major:
            bad.append(f"{name} {version}: CUDA {suffix.group(1)}")
        elif CUDA_LIBRARY.match(n) and not suffix and major == 12:
            bad.append(f"{name} {version}: an unsuffixed CUDA library wheel (CUDA 13's)")
        elif n in ("cuda-python", "cuda-bindings") and v.major != major:
            bad.append(f"{name} {version}: CUDA {v.major}")
        elif n.startswith("tensorrt") and major == 12 and v.major != 10:
            bad.append(f"{name} {version}: TensorRT {v.major} (CUDA 12 gets 10.x)")
        elif n == "onnxruntime-gpu" and version not in ORT_BUILDS[major]:
            bad.append(f"{name} {version}: not a CUDA {major} build")
    return bad


def test_the_check_names_a_mixed_stack():
    """Negative control: what the unpinned names resolved to, seen by the CUDA 12 check."""
    mixed = [("tensorrt_cu13", "11.4.0.106"), ("cuda-python", "13.4.4"),
             ("cuda-bindings", "13.5.0"), ("onnxruntime-gpu", "1.31.1"),
             ("nvidia-cuda-runtime", "13.0.96"), ("nvidia-cudnn-cu13", "9.13.0.50"),
             ("tensorrt-cu12", "11.4.0.106"), ("polygraphy", "0.53.6")]
    assert len(cuda_major_problems(mixed, 12)) == 7
    assert cuda_major_problems([("tensorrt_cu12", "10.16.1.11"), ("cuda-python", "12.9.10"),
                                ("onnxruntime-gpu", "1.26.0"), ("numpy", "2.4.6")], 12) == []
    assert cuda_major_problems([("onnxruntime-gpu", "1.26.0")], 13) != []


def index_reachable() -> str | None:
    """None when the package index answers; else why not."""
    try:
        with urllib.request.urlopen(f"{INDEX}/cuda-python/", timeout=15) as r:
            r.read(64)
        return None
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{INDEX} cannot be reached ({e})"


def dry_run(requirements: list[str], report: Path, *options: str) -> dict:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--quiet", "--retries", "1", "--timeout", "30", "--report", str(report),
           *options, *requirements]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip took over {PIP_TIMEOUT_S} s to resolve against {INDEX} (slow network)")
    if r.returncode != 0 and UNREACHABLE.search(r.stdout + r.stderr):
        pytest.skip(f"{INDEX} could not be reached by pip: "
                    f"{UNREACHABLE.search(r.stdout + r.stderr).group(0)}")
    assert r.returncode == 0, (" ".join(cmd), r.stderr[-3000:])
    return json.loads(report.read_text())


def stub_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel with nothing in it but its name and version, for pip to read."""
    dist = re.sub(r"[-.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: "
                                       f"{version}\nSummary: test stand-in\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
                                    "true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def resolve(extra: str, tmp_path: Path) -> list[tuple[str, str]]:
    """(name, version) of every package `pip install 'ldm-edge[extra]'` would install but
    ldm-edge itself, TensorRT's library stubs stood in for as the module docstring says."""
    reqs = base_dependencies() + extras()[extra]
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    # which library stubs (and versions) TensorRT's packages pin, level by level (the
    # unsuffixed `tensorrt` pins `tensorrt_cu13`, which pins the stub)
    trt = [r for r in extras()[extra] if Requirement(r).name.startswith("tensorrt")]
    for level in range(TENSORRT_LEVELS):
        if not trt:
            break
        items = dry_run(trt, tmp_path / f"trt{level}.json", "--no-deps")["install"]
        deps = [Requirement(d) for i in items for d in i["metadata"].get("requires_dist") or []]
        deps = [d for d in deps if d.marker is None and d.name.startswith("tensorrt")]
        for dep in deps:
            pins = [s.version for s in dep.specifier if s.operator == "=="]
            if STUB_LIBS.match(dep.name) and pins:
                stub_wheel(stubs, dep.name, pins[0])
        trt = [str(d) for d in deps if not STUB_LIBS.match(d.name)]
    report = dry_run(reqs, tmp_path / "all.json", "--find-links", str(stubs))
    return [(i["metadata"]["name"], i["metadata"]["version"]) for i in report["install"]]


@pytest.mark.network
@pytest.mark.parametrize("extra", EXTRAS)
def test_extra_resolves_to_one_cuda_major_on_pypi(extra, tmp_path):
    why = index_reachable()
    if why:
        pytest.skip(why)
    t0 = time.perf_counter()
    packages = resolve(extra, tmp_path)
    names = {n.lower().replace("_", "-") for n, _ in packages}
    shown = [f"{n} {v}" for n, v in packages if re.match(r"(tensorrt|cuda|onnx|nvidia)", n)]
    print(f"{extra}: {len(packages)} packages in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(shown))
    assert cuda_major_problems(packages, EXTRAS[extra]) == []
    want = {"trt-cu12": "tensorrt-cu12", "trt-cu13": "tensorrt-cu13",
            "gpu-cu12": "onnxruntime-gpu", "gpu-cu13": "onnxruntime-gpu"}[extra]
    assert want in names, sorted(names)
    if extra.startswith("trt"):
        assert {"cuda-python", "polygraphy", f"{want}-libs", f"{want}-bindings"} <= names
