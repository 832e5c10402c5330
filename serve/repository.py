"""``ldm-export triton``: a Triton model repository for a bundle, written atomically.

    REPO/
      text_encoder/ unet/ vae_decoder/ [vae_encoder/]   one model per component
      [controlnet_NAME/]                                (ControlNet NAME: controlnet_NAME)
        config.pbtxt  1/<graph>.onnx | 1/model.plan | 1/model.py
      ldm_pipeline/                                     the sampling loop (Python backend, BLS)
        config.pbtxt  1/model.py  1/bundle/             the bundle's files, linked

Components run on Triton's ``onnxruntime`` backend (the bundle's graph), ``tensorrt_plan``
(the engine ``ldm-export engines`` built) or, where the server has neither, as Python models
running onnxruntime. Files are hard-linked (copied across file systems), never rewritten.

A TensorRT plan loads only in the TensorRT release that built it, on that GPU model. The
writer cannot see the serving container: given its TensorRT version (``--trt-version``) it
refuses engines of another; otherwise it says, as a note, what the engines need.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from ldm_edge.bundletools.staging import staged_dir
from ldm_edge.runtime.backends.choose import interface, pick_precision
from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.errors import BundleError, ExportError, UsageError
from ldm_edge.runtime.remote import PIPELINE_INPUTS, PIPELINE_MODEL, PIPELINE_OUTPUTS

from .limits import ServeLimits
from .pbtxt import UNET_QUEUE_DELAY_US, component_config, model_name, pipeline_config

log = logging.getLogger(__name__)

COMPONENT_KINDS = ("python", "onnxruntime", "tensorrt")
# --trt-version: a release as TensorRT numbers it, at least major.minor.patch (10.3.0, 10.5.0.18)
TRT_RELEASE = re.compile(r"^\d+\.\d+\.\d+(\.\d+)*$")
BUNDLE_DIR = f"{PIPELINE_MODEL}/1/bundle"  # the bundle inside the repository
VERSION = "1"
DYNAMIC_BATCHING = ("unet",)  # the model concurrent requests call at every step

SHIM = '''# Written by `ldm-export triton`. The model is {module} from the ldm-edge package,
# which the server's Python environment must have (pip install ldm-edge).
from {module} import TritonPythonModel  # noqa: F401
'''


def write_repository(bundle, out, *, components: str = "python", precision: str = "fp32",
                     instances: int = 1, limits: ServeLimits | None = None,
                     batch_delay_us: int = UNET_QUEUE_DELAY_US, force: bool = False,
                     trt_version: str | None = None,
                     note: Callable[[str], None] = log.warning) -> Path:
    """Write the repository for ``bundle`` at ``out``; nothing is left at ``out`` on failure.
    ``instances``: copies of ``ldm_pipeline`` (requests served at once); each component has
    one instance, the U-Net's batching the calls of concurrent requests together, waiting up
    to ``batch_delay_us`` for them. ``trt_version``: the serving container's TensorRT, which
    the engines of ``components="tensorrt"`` must have been built with; ``note`` is told what
    the engines need (once the repository is written)."""
    if components not in COMPONENT_KINDS:
        raise UsageError(f"--components {components!r}: use one of {', '.join(COMPONENT_KINDS)}")
    if instances < 1:
        raise UsageError(f"--instances {instances} must be at least 1")
    if trt_version is not None and not TRT_RELEASE.match(trt_version):
        raise UsageError(f"--trt-version {trt_version!r}: give the serving container's TensorRT "
                         f"release as major.minor.patch, e.g. 10.3.0")
    manifest = open_bundle(bundle, verify=True)  # the copies are served unverified
    manifest.variant("unet", precision)  # the U-Net must have the precision asked
    out = Path(out)
    if out.resolve() == manifest.root.resolve() or manifest.root.resolve() in out.resolve().parents:
        raise UsageError(f"write the repository outside the bundle, not at {out}")
    engines = []
    with staged_dir(out, force) as stage:
        link_tree(manifest.root, stage / BUNDLE_DIR)
        for name in manifest.component_names:
            engines += _component(stage, manifest, name, components, precision, batch_delay_us,
                                  trt_version)
        model = stage / PIPELINE_MODEL
        (model / VERSION / "model.py").write_text(SHIM.format(
            module="ldm_edge.serve.pipeline_model"))
        params = {"bundle": BUNDLE_DIR, "components": components, "precision": precision,
                  **(limits or ServeLimits()).to_params()}
        (model / "config.pbtxt").write_text(pipeline_config(
            PIPELINE_MODEL, PIPELINE_INPUTS, PIPELINE_OUTPUTS, instances=instances,
            params=params))
    if engines:
        note(engine_note(engines, trt_version))
    return out


def engine_note(engines: list, trt_version: str | None) -> str:
    """What the linked engines need of the server: their TensorRT release and GPU."""
    built = sorted({f"TensorRT {e.trt_version or '(not recorded)'} on {e.device_name}"
                    + (f" (compute capability {e.compute_capability})"
                       if e.compute_capability else "") for e in engines})
    if trt_version:
        return (f"the tensorrt_plan models' TensorRT matches the container's {trt_version}; "
                f"they load only on the GPU model they were built on: {'; '.join(built)}")
    return (f"the tensorrt_plan models load only in a Triton whose TensorRT is the release that "
            f"built them, on that GPU model: {'; '.join(built)}; build the engines inside the "
            f"serving container, or give --trt-version to have its release checked")


def same_release(built: str | None, given: str) -> bool:
    """Whether TensorRT ``built`` (an engine's) is the release ``given`` names, compared over
    the parts ``given`` has: 10.3.0 names 10.3.0.30 (JetPack's) too."""
    have, want = re.findall(r"\d+", str(built or "")), re.findall(r"\d+", given)
    return bool(have) and [int(x) for x in have[:len(want)]] == [int(x) for x in want]


def link_tree(src: Path, dest: Path) -> None:
    """Every file under ``src`` at the same place under ``dest``: a hard link, or a copy
    where the two are on different file systems."""
    for folder, _, files in os.walk(src):
        target = dest / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            link_or_copy(Path(folder) / f, target / f)


def link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _component(stage: Path, manifest: Manifest, name: str, kind: str, precision: str,
               batch_delay_us: int, trt_version: str | None = None) -> list:
    """Write one component's model; returns the engine records it linked (tensorrt)."""
    spec, io_map = interface(manifest.component(name))
    prec = pick_precision(manifest, name, precision)
    model = model_name(name)
    folder = stage / model / VERSION
    folder.mkdir(parents=True)
    filename, engines = None, []
    if kind == "onnxruntime":
        filename = _link_graph(manifest, name, prec, folder)
    elif kind == "tensorrt":
        engine = _link_engine(manifest, name, prec, folder, trt_version)
        filename, engines = "model.plan", [engine]
    else:
        (folder / "model.py").write_text(SHIM.format(module="ldm_edge.serve.component_model"))
        io_map = {}  # the Python model speaks our names
    params = ({"bundle": BUNDLE_DIR, "precision": prec, "component": name} if kind == "python"
              else {})
    (stage / model / "config.pbtxt").write_text(component_config(
        model, spec, kind=kind, graph_names=io_map, filename=filename, instances=1,
        dynamic_batching=name in DYNAMIC_BATCHING, params=params, queue_delay_us=batch_delay_us))
    return engines


def _link_graph(manifest: Manifest, name: str, precision: str, folder: Path) -> str:
    """The variant's graph and its external-data files, as they sit next to each other."""
    variant = manifest.variant(name, precision)
    home = Path(variant.record.file).parent
    for f in variant.record.files:
        rel = Path(f.path).relative_to(home)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(manifest.root / f.path, folder / rel)
    return variant.path.name


def _link_engine(manifest: Manifest, name: str, precision: str, folder: Path,
                 trt_version: str | None = None):
    """Link the component's engine as model.plan; returns its record."""
    engines = [e for e in manifest.component(name).engines if e.precision == precision]
    if not engines:
        raise ExportError(f"{name} has no {precision} TensorRT engine in this bundle; build "
                          f"one with `ldm-export engines BUNDLE --precision {precision}` on the "
                          f"serving GPU, or use --components onnxruntime")
    if trt_version is not None:
        fits = [e for e in engines if same_release(e.trt_version, trt_version)]
        if not fits:
            built = ", ".join(sorted({str(e.trt_version or "(not recorded)") for e in engines}))
            raise BundleError(f"{name}: its {precision} TensorRT engine was built with TensorRT "
                              f"{built}, the serving container has {trt_version}, and a plan "
                              f"loads only in the release that built it; build the engines "
                              f"inside the serving container (`ldm-export engines BUNDLE "
                              f"--precision {precision}`), or use --components onnxruntime")
        engines = fits
    if len(engines) > 1:
        devices = ", ".join(str(e.device_name) for e in engines)
        raise ExportError(f"{name} has {len(engines)} {precision} engines ({devices}); keep "
                          f"the serving GPU's one, or use --components onnxruntime")
    link_or_copy(manifest.root / engines[0].file, folder / "model.plan")
    return engines[0]
