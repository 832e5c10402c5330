"""Trace one component to ONNX and check it against PyTorch in onnxruntime.

Exporter: the TorchScript tracer (``dynamo=False``) first — on this machine it was about
twice as fast as the dynamo exporter and, traced at a latent size that is *not* a
multiple of the U-Net's overall down-sampling factor, it records the up-sampling
sizes from the skip connections, so one graph serves every multiple of 8 pixels.
The dynamo exporter is the fallback (``exporter="dynamo"`` forces it). Either way the
graph is checked at two shapes before it is accepted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ldm_edge.bundletools.save import EXTERNAL_DATA_THRESHOLD
from ldm_edge.runtime.backends.sessions import SessionFromOnnx
from ldm_edge.runtime.bundle.spec import ComponentSpec
from ldm_edge.runtime.compare import Comparison, compare
from ldm_edge.runtime.errors import ExportError, first_line  # noqa: F401 (re-exported)

from .components import reference, run_torch_all, sample_inputs, wrap
from .load import LoadedModel
from .release import is_large, memory_note, park, trim

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# FP32 export vs PyTorch: the same math in another order. Differences come from
# summation order in conv/matmul (~1e-7 relative per op); 1e-4 absolute (plus 1e-5 of
# the output's largest magnitude, for text hidden states of size ~10-100) leaves room
# for deep graphs at 512^2 (SD1.5's VAE measured 7e-5 here) and still fails any wrong op.
EXPORT_ATOL = 1e-4
EXPORT_RTOL = 1e-5
EXPORT_MIN_COSINE = 0.99999
# The VAE's graphs at a large model's own size add up more of it: the SDXL-architecture decoder
# (random weights) at 1024x768 measured max-abs 7.5e-4 on outputs up to ~3 (2.5e-4 of the
# largest), mean-abs 5e-5, cosine 1.0000000. 5e-4 of the largest magnitude leaves twice that;
# a wrong op still fails here and on the cosine, which is not relaxed.
VAE_EXPORT_RTOL = 5e-4
RTOL_OF = {"vae_decoder": VAE_EXPORT_RTOL, "vae_encoder": VAE_EXPORT_RTOL}
# a large component (SDXL's U-Net) is traced at most this many pixels a side: the trace's size
# fixes nothing in the graph (dynamic axes; the check runs at the model's own size), and a trace
# at 1024^2 would run a full-size batch-2 forward pass for nothing but time and memory
LARGE_TRACE_SIZE = 256


def _trace_inputs(model: LoadedModel, spec: ComponentSpec, height: int, width: int):
    """Batch 2 and, for the U-Net, a latent size off the down-sampling grid (see module doc)."""
    f = model.vae_scale_factor
    if spec.name == "unet":
        factor = 2 ** int(getattr(model.unet, "num_upsamplers", 0))
        h = height // f
        if factor > 1 and h % factor == 0:
            height += f  # one latent row more: no longer a multiple of `factor`
    feeds = sample_inputs(spec, model, 2, height, width, seed=1)
    return tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_component(model: LoadedModel, spec: ComponentSpec, out_dir: Path, *, height: int,
                     width: int, opset: int = DEFAULT_OPSET, exporter: str = "auto") -> list[Path]:
    """Write ``<name>.onnx`` (and ``<name>.onnx.data`` when large) into ``out_dir``."""
    module = wrap(model, spec.name)
    large = _param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    if large:
        height, width = min(height, LARGE_TRACE_SIZE), min(width, LARGE_TRACE_SIZE)
    args = _trace_inputs(model, spec, height, width)
    order = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"],
             "dynamo": ["dynamo"]}[exporter]
    errors = []
    for kind in order:
        scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=out_dir))
        try:
            raw = scratch / f"{spec.name}.onnx"
            _torch_export(module, args, raw, spec, opset, dynamo=(kind == "dynamo"))
            files = _finalise(raw, out_dir / f"{spec.name}.onnx", large)
            log.info("%s: exported with the %s exporter (%s)", spec.name, kind, memory_note())
            return files
        except OSError:
            raise  # disk full, permissions: not the exporter's fault, no point retrying
        except Exception as e:  # an exporter failure: try the next one
            errors.append(f"{kind}: {first_line(e, 300)}")
            log.warning("%s: %s exporter failed: %s", spec.name, kind, errors[-1])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            trim()
    raise ExportError(f"{spec.name}: export failed ({'; '.join(errors)})")


def _torch_export(module, args, path: Path, spec: ComponentSpec, opset: int, dynamo: bool) -> None:
    kwargs = dict(input_names=spec.input_names, output_names=spec.output_names,
                  opset_version=opset, dynamic_axes=spec.dynamic_axes(), dynamo=dynamo)
    if dynamo:
        kwargs["external_data"] = True
    sink = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), **kwargs)


def _finalise(raw: Path, dest: Path, large: bool) -> list[Path]:
    """Re-save with all weights inline (small) or in one ``.data`` file (large: copied file
    to file, never loaded — export/external_data.py)."""
    import onnx

    from .external_data import gather_external_data

    for stale in (dest, dest.with_name(dest.name + ".data")):
        stale.unlink(missing_ok=True)
    if large:
        return gather_external_data(raw, dest)
    proto = onnx.load(str(raw), load_external_data=True)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(dest))
    return [dest]


def check_inputs_read(onnx_path: Path, spec: ComponentSpec) -> None:
    """ExportError naming each input of ``spec`` the graph lacks or never reads: a traced
    module that ignored an input (diffusers skips an LCM U-Net's guidance embedding when
    ``timestep_cond`` is not passed) draws another picture, and the check against the same
    module would not see it."""
    from ldm_edge.runtime.bundle.onnx_scan import graph_io, graph_nodes

    inputs, _ = graph_io(onnx_path)
    read = {i for n in graph_nodes(onnx_path) for i in n["inputs"]}
    unread = [t for t in spec.input_names if t not in inputs or t not in read]
    if unread:
        raise ExportError(f"{spec.name}: the exported graph does not read {', '.join(unread)} "
                          f"(traced without it); nothing was written")


def check_shapes(model: LoadedModel, spec: ComponentSpec) -> list[tuple[int, int, int]]:
    """(batch, height, width) in pixels for the self-check: batch 1 square at the
    model's default size, batch 2 non-square — two shapes prove the dynamic axes."""
    f = model.vae_scale_factor
    h = int(model.defaults.get("height", 64))
    w = int(model.defaults.get("width", 64))
    w2 = max(f, (w * 3 // 4) // f * f)
    if w2 == w:
        w2 = w + f
    return [(1, h, w), (2, h, w2)]


def check_component(model: LoadedModel, spec: ComponentSpec, onnx_path: Path,
                    shapes=None) -> list[Comparison]:
    """Run the graph in onnxruntime and PyTorch on the same inputs at each shape; every
    output is compared (an SDXL text encoder's pooled embeddings too)."""
    cases = _torch_references(model, spec, shapes or check_shapes(model, spec), onnx_path.parent)
    sess = SessionFromOnnx(onnx_path)()
    log.info("%s: onnxruntime session open (%s)", spec.name, memory_note())
    results = []
    for (b, h, w), feeds, refs in cases:
        outs = sess.run(spec.output_names, feeds)
        for name, out, ref in zip(spec.output_names, outs, refs):
            label = f"{spec.name} b{b} {h}x{w}" + (f" {name}" if len(refs) > 1 else "")
            rtol = RTOL_OF.get(spec.name, EXPORT_RTOL)
            results.append(compare(out, ref, label, atol=EXPORT_ATOL, rtol=rtol,
                                   min_cosine=EXPORT_MIN_COSINE))
    del sess, cases
    trim()
    log.info("%s: checked in onnxruntime, session closed (%s)", spec.name, memory_note())
    return results


def _torch_references(model: LoadedModel, spec: ComponentSpec, shapes, scratch: Path) -> list:
    """[((b, h, w), feeds, PyTorch outputs)] at each shape, all computed before onnxruntime
    opens the graph; a large module's weights are then parked (export/release.py), so the
    torch weights and the session's never sit in memory side by side."""
    module = reference(model, spec.name)
    cases = []
    for i, (b, h, w) in enumerate(shapes):
        feeds = sample_inputs(spec, model, b, h, w, seed=10 + i)
        cases.append(((b, h, w), feeds, run_torch_all(module, spec, feeds)))
    log.info("%s: PyTorch reference outputs computed (%s)", spec.name, memory_note())
    if is_large(module):
        park(module, scratch)
    del module
    trim()
    return cases


def worst(results: list[Comparison]) -> Comparison:
    return max(results, key=lambda r: (not bool(r), r.max_abs))
