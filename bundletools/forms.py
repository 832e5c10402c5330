"""Forms of a graph: the ``ort-mha`` form of a variant, made, checked and recorded.

The form is the variant's graph with every attention rewritten into onnxruntime's
``MultiHeadAttention`` (``fused_attention.py``), saved beside it as ``<name>.ort-mha.onnx``;
a large graph's weights stay in the plain graph's ``.data`` file, which both read. It is
run against the plain graph in onnxruntime at two shapes (batch 1 square at the bundle's
default size, batch 2 non-square, as the export check does) on sampled inputs and written
only when it matches (an INT8 form: when it is as close to the FP32 graph as the plain INT8
graph is, ``INT8_FORM_ERROR_RATIO``); the comparison is recorded in the manifest
(``VariantRecord.forms["ort-mha"]``). The onnxruntime backend opens it on the CPU and CUDA
providers; TensorRT and OpenVINO read the plain graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldm_edge.runtime.backends.sessions import SessionFromOnnx
from ldm_edge.runtime.bundle.control_spec import level_dims
from ldm_edge.runtime.bundle.schema import (BundleManifest, FormRecord, VariantRecord,
                                            read_manifest_json)
from ldm_edge.runtime.bundle.spec import ComponentSpec
from ldm_edge.runtime.compare import Comparison, compare, summarise
from ldm_edge.runtime.errors import BundleError, first_line

from .files import file_record
from .fused_attention import fuse_attention
from .variant_txn import VariantTransaction

log = logging.getLogger(__name__)

FORM = "ort-mha"
# The components whose graphs have attention the rewrite is for (the text encoder's is masked).
ATTENTION_COMPONENTS = ("unet", "vae_decoder", "vae_encoder")
CHECK_REFERENCE = "plain graph, onnxruntime CPU, sampled inputs"
INT8_CHECK_REFERENCE = ("FP32 graph, onnxruntime CPU, sampled inputs; distance (1 - cosine) held "
                        "to INT8_FORM_ERROR_RATIO x the plain INT8 graph's")
# Form vs plain graph: the same math in another order, so FP32 is held to the export check's
# tolerances (export/onnx_export.py EXPORT_ATOL, EXPORT_RTOL, EXPORT_MIN_COSINE, copied:
# bundletools does not import the exporter). FP16: the plain graph rounds scores and
# probabilities to FP16 (2^-11 ≈ 5e-4 relative) where the fused kernel does not; tiny SD1
# measured 5e-4 (U-Net, outputs ~0.6) and 6e-4 (VAE decoder, ~3.7) max-abs, so 4 FP16 steps
# relative to the output's size plus 2e-3 absolute.
TOLERANCE = {
    "fp32": {"atol": 1e-4, "rtol": 1e-5, "min_cosine": 0.99999},
    "fp16": {"atol": 2e-3, "rtol": 2e-3, "min_cosine": 0.99999},
}
# INT8: attention stays float in both graphs, but a last-bit difference at its output moves
# values across a rounding boundary of the next QuantizeLinear (one int8 step) and the rest of
# the graph carries it, so the form and the plain graph are two equally good roundings of the
# same float math and differ from each other about as much as each differs from FP32 (SD1.5
# architecture, 256²: form vs plain cosine 0.9989, each vs FP32 0.9991). So the form is
# compared with the FP32 graph, on the same inputs as the plain INT8 graph, and its distance
# (1 - cosine) held to this multiple of the plain graph's: measured 0.95-1.03x on the SD1.5
# architecture (5 inputs) and tiny SD1; a wrong rewrite (head count) is far off (its test).
INT8_FORM_ERROR_RATIO = 1.25
# Timesteps are sampled over the training schedule's range.
NUM_TRAIN_TIMESTEPS = 1000


def form_name(plain: str) -> str:
    """``unet.fp16.onnx`` -> ``unet.fp16.ort-mha.onnx``."""
    p = Path(plain)
    return (p.parent / f"{p.stem}.{FORM}{p.suffix}").as_posix()


def check_shapes(height: int, width: int, factor: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) in pixels: batch 1 square-ish at the default size, batch 2 with
    another width (export/onnx_export.py's check_shapes, on the manifest's numbers)."""
    w2 = max(factor, (width * 3 // 4) // factor * factor)
    if w2 == width:
        w2 = width + factor
    return [(1, height, width), (2, height, w2)]


def sample_feeds(session, spec: ComponentSpec, batch: int, height: int, width: int,
                 factor: int, seed: int) -> dict:
    """Random inputs of the shapes ``spec`` gives at this size, in the graph's own dtypes."""
    rng = np.random.default_rng(seed)
    dims = {"batch": batch, "height": height, "width": width,
            "latent_height": height // factor, "latent_width": width // factor}
    dims.update(level_dims(dims["latent_height"], dims["latent_width"]))  # ControlNet residuals
    types = {i.name: i.type for i in session.get_inputs()}
    feeds = {}
    for t in spec.inputs:
        shape = [d if isinstance(d, int) else dims[d] for d in t.shape]
        kind = types.get(t.name, f"tensor({t.dtype})")
        if "int" in kind:
            feeds[t.name] = rng.integers(0, 100, shape).astype(np.int64)
            continue
        dtype = np.float16 if "float16" in kind else np.float32
        x = (rng.uniform(0, NUM_TRAIN_TIMESTEPS - 1, shape) if t.name == "timestep"
             else rng.standard_normal(shape))
        feeds[t.name] = x.astype(dtype)
    return feeds


def _outputs(graph, feeds: list[dict], threads: int = 0) -> list[np.ndarray]:
    """Every output of ``graph`` (a path, or an open session) for each of ``feeds``, joined
    flat in the graph's order: a ControlNet's first residual comes before any attention, so
    a check of it alone would prove nothing about the rewrite."""
    session = graph if hasattr(graph, "run") else SessionFromOnnx(graph, threads=threads)()
    return [np.concatenate([o.ravel() for o in session.run(None, f)]) for f in feeds]


def check_form(plain: Path, form: Path, spec: ComponentSpec, precision: str,
               shapes: list, factor: int, threads: int = 0,
               reference: Path | None = None) -> tuple[list[Comparison], dict]:
    """The form's output against the plain graph's, in onnxruntime on the CPU, at ``shapes``;
    and what the record adds. INT8 (``reference``: the FP32 graph): the form against FP32,
    held to INT8_FORM_ERROR_RATIO x the plain INT8 graph's distance from it."""
    session = SessionFromOnnx(plain, threads=threads)()  # one session in memory at a time
    feeds = [sample_feeds(session, spec, n, h, w, factor, seed=20 + i)
             for i, (n, h, w) in enumerate(shapes)]
    plain_out = _outputs(session, feeds)
    del session
    names = [f"{spec.name} b{n} {h}x{w}" for n, h, w in shapes]
    got = _outputs(form, feeds, threads)
    if precision != "int8":
        tol = TOLERANCE.get(precision, TOLERANCE["fp32"])
        return [compare(g, r, nm, **tol) for g, r, nm in zip(got, plain_out, names)], \
            {"reference": CHECK_REFERENCE}
    if reference is None:
        raise BundleError("an INT8 form is checked against the FP32 graph: none was given")
    ref = _outputs(reference, feeds, threads)
    plain_cos = [compare(p, r).cosine for p, r in zip(plain_out, ref)]
    out = [compare(g, r, nm, min_cosine=1.0 - INT8_FORM_ERROR_RATIO * (1.0 - c))
           for g, r, nm, c in zip(got, ref, names, plain_cos)]
    return out, {"reference": INT8_CHECK_REFERENCE, "plain_cosine": min(plain_cos),
                 "error_ratio": INT8_FORM_ERROR_RATIO}


def make_form(root: Path, spec: ComponentSpec, variant: VariantRecord, precision: str, *,
              height: int, width: int, factor: int, num_heads: int | None = None,
              threads: int = 0, reference: Path | None = None,
              txn: VariantTransaction | None = None) -> FormRecord | None:
    """Write, check and describe the ``ort-mha`` form of one variant in bundle folder ``root``.
    None (nothing left on disk) when the graph has no attention to fuse or the form fails its
    check (logged with why). ``num_heads`` overrides the graph's (the tests' broken rewrite).
    ``reference``: the FP32 graph an INT8 form is measured against (``check_form``).
    ``txn``: the transaction that commits the record (its files are deleted if it does not);
    without one the caller keeps the files (export writes into a staged folder)."""
    import onnx

    root = Path(root)
    txn = txn or VariantTransaction(root)
    plain = root / variant.file
    proto = onnx.load(str(plain), load_external_data=False)
    fused, softmaxes = fuse_attention(proto, num_heads=num_heads)
    log.info("%s (%s): %d of %d Softmax nodes were attention in the fusable pattern",
             spec.name, precision, fused, softmaxes)
    if not fused:
        return None
    dest = root / form_name(variant.file)
    written = txn.save(proto, dest)
    del proto
    try:
        results, extra = check_form(plain, dest, spec, precision,
                                    check_shapes(height, width, factor), factor, threads,
                                    reference)
    except Exception as e:  # a graph onnxruntime refuses is a failed check too
        results, why = [], first_line(e, 200)
    else:
        why = None if all(results) else str(max(results, key=lambda r: (not bool(r), r.max_abs)))
    if why is not None:
        txn.discard(written)
        log.warning("%s (%s): the %s form fails its check (%s); not written",
                    spec.name, precision, FORM, why)
        return None
    data = [f for f in variant.files if f.path != variant.file]  # weights shared with the plain graph
    return FormRecord(file=dest.relative_to(root).as_posix(),
                      files=[file_record(p, root) for p in written] + data,
                      fused_attention=fused,
                      check={**summarise(results, extra.pop("reference")), **extra,
                             "softmax_nodes": softmaxes})


def add_fused_forms(bundle: str | Path, precision: str = "fp32", components=None,
                    threads: int = 0) -> dict[str, FormRecord | None]:
    """Add the ``ort-mha`` form to each ``precision`` variant of ``bundle`` that has attention;
    return component -> its form record (None: no attention, or it failed its check). The
    forms' files are written first, the manifest last (atomically); on an exception the
    files written are deleted (``VariantTransaction``)."""
    root = Path(bundle)
    manifest = read_manifest_json(root)
    made = {}
    with VariantTransaction(root) as txn:
        for name in components or attention_components(manifest):
            comp = manifest.components.get(name)
            if comp is None or precision not in comp.variants:
                continue
            fp32 = comp.variants.get("fp32")
            made[name] = make_form(root, comp.spec, comp.variants[precision], precision,
                                   threads=threads, **default_size(manifest),
                                   reference=root / fp32.file if fp32 else None, txn=txn)

        def record(m: BundleManifest):
            for name, form in made.items():
                forms = m.components[name].variants[precision].forms
                if form is not None:
                    forms[FORM] = form
                else:
                    forms.pop(FORM, None)

        if any(f is not None for f in made.values()):
            txn.commit(edit=record)
    return made


def attention_components(m: BundleManifest) -> list[str]:
    """The bundle's components with attention to fuse: U-Net, VAE, and each ControlNet."""
    return [*ATTENTION_COMPONENTS, *(r.component for r in m.controlnets.values())]


def default_size(m: BundleManifest) -> dict:
    """The check's default size from the manifest: its defaults (schema.DefaultsRecord)."""
    factor = int(m.vae_scale_factor)
    h, w = int(m.defaults.height), int(m.defaults.width)
    if h % factor or w % factor:
        raise BundleError(f"manifest defaults {h}x{w} are not multiples of {factor}")
    return {"height": h, "width": w, "factor": factor}
