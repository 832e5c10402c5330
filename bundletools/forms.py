"""Forms of a graph: the ``ort-mha`` form of a variant, made, checked and recorded.

The form is the variant's graph with every attention rewritten into onnxruntime's
``MultiHeadAttention`` (``fused_attention.py``), saved beside it as ``<name>.ort-mha.onnx``;
a large graph's weights stay in the plain graph's ``.data`` file, which both read. It is
run against the plain graph in onnxruntime at two shapes (batch 1 square at the bundle's
default size, batch 2 non-square, as the export check does) on sampled inputs and written
only when it matches; the comparison is recorded in the manifest
(``VariantRecord.forms["ort-mha"]``). The onnxruntime backend opens it on the CPU and CUDA
providers; TensorRT and OpenVINO read the plain graph.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldm_edge.runtime.compare import Comparison, compare, summarise
from ldm_edge.runtime.errors import BundleError, first_line
from ldm_edge.runtime.schema import BundleManifest, FormRecord, VariantRecord, edit_manifest, read_manifest_json
from ldm_edge.runtime.sessions import SessionFromOnnx
from ldm_edge.runtime.spec import ComponentSpec

from .files import file_record
from .fused_attention import fuse_attention
from .save import save_graph

log = logging.getLogger(__name__)

FORM = "ort-mha"
# The components whose graphs have attention the rewrite is for (the text encoder's is masked).
ATTENTION_COMPONENTS = ("unet", "vae_decoder", "vae_encoder")
CHECK_REFERENCE = "plain graph, onnxruntime CPU, sampled inputs"
# Form vs plain graph: the same math in another order, so FP32 is held to the export check's
# tolerances (export/onnx_export.py EXPORT_ATOL, EXPORT_RTOL, EXPORT_MIN_COSINE, copied:
# bundletools does not import the exporter). INT8: attention stays float, but a last-bit
# difference at its output moves a few values across a rounding boundary of the next
# QuantizeLinear (one int8 step, ~1 % of that tensor's range), which the rest of the graph
# carries: tiny SD1 measured max-abs 2.7e-2 and cosine 0.99959 (outputs ~0.65); so only the
# direction is held, to 0.999 (one head instead of the graph's measured 0.9953). FP16:
# the plain graph rounds scores and probabilities to FP16 (2^-11 ≈ 5e-4 relative) where the
# fused kernel does not; tiny SD1 measured 5e-4 (U-Net, outputs ~0.6) and 6e-4 (VAE decoder,
# ~3.7) max-abs, so 4 FP16 steps relative to the output's size plus 2e-3 absolute.
TOLERANCE = {
    "fp32": {"atol": 1e-4, "rtol": 1e-5, "min_cosine": 0.99999},
    "int8": {"atol": None, "rtol": 0.0, "min_cosine": 0.999},
    "fp16": {"atol": 2e-3, "rtol": 2e-3, "min_cosine": 0.99999},
}
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


def check_form(plain: Path, form: Path, spec: ComponentSpec, precision: str,
               shapes: list, factor: int, threads: int = 0) -> list[Comparison]:
    """The form's output against the plain graph's, in onnxruntime on the CPU, at ``shapes``."""
    a = SessionFromOnnx(plain, threads=threads)()
    b = SessionFromOnnx(form, threads=threads)()
    tol = TOLERANCE.get(precision, TOLERANCE["fp32"])
    out = []
    for i, (n, h, w) in enumerate(shapes):
        feeds = sample_feeds(a, spec, n, h, w, factor, seed=20 + i)
        name = a.get_outputs()[0].name
        ref, got = a.run([name], feeds)[0], b.run([name], feeds)[0]
        out.append(compare(got, ref, f"{spec.name} b{n} {h}x{w}", **tol))
    return out


def make_form(root: Path, spec: ComponentSpec, variant: VariantRecord, precision: str, *,
              height: int, width: int, factor: int, num_heads: int | None = None,
              threads: int = 0) -> FormRecord | None:
    """Write, check and describe the ``ort-mha`` form of one variant in bundle folder ``root``.
    None (nothing left on disk) when the graph has no attention to fuse or the form fails its
    check (logged with why). ``num_heads`` overrides the graph's (the tests' broken rewrite)."""
    import onnx

    root = Path(root)
    plain = root / variant.file
    proto = onnx.load(str(plain), load_external_data=False)
    fused, softmaxes = fuse_attention(proto, num_heads=num_heads)
    log.info("%s (%s): %d of %d Softmax nodes were attention in the fusable pattern",
             spec.name, precision, fused, softmaxes)
    if not fused:
        return None
    dest = root / form_name(variant.file)
    written = save_graph(proto, dest)
    del proto
    try:
        results = check_form(plain, dest, spec, precision,
                             check_shapes(height, width, factor), factor, threads)
    except Exception as e:  # a graph onnxruntime refuses is a failed check too
        results, why = [], first_line(e, 200)
    else:
        why = None if all(results) else str(max(results, key=lambda r: (not bool(r), r.max_abs)))
    if why is not None:
        for p in written:
            p.unlink(missing_ok=True)
        log.warning("%s (%s): the %s form does not match the plain graph (%s); not written",
                    spec.name, precision, FORM, why)
        return None
    data = [f for f in variant.files if f.path != variant.file]  # weights shared with the plain graph
    return FormRecord(file=dest.relative_to(root).as_posix(),
                      files=[file_record(p, root) for p in written] + data,
                      fused_attention=fused,
                      check={**summarise(results, CHECK_REFERENCE), "softmax_nodes": softmaxes})


def add_fused_forms(bundle: str | Path, precision: str = "fp32", components=None,
                    threads: int = 0) -> dict[str, FormRecord | None]:
    """Add the ``ort-mha`` form to each ``precision`` variant of ``bundle`` that has attention;
    return component -> its form record (None: no attention, or it failed its check). The
    forms' files are written first, the manifest last (atomically)."""
    root = Path(bundle)
    manifest = read_manifest_json(root)
    made = {}
    for name in components or ATTENTION_COMPONENTS:
        comp = manifest.components.get(name)
        if comp is None or precision not in comp.variants:
            continue
        made[name] = make_form(root, comp.spec, comp.variants[precision], precision,
                               threads=threads, **default_size(manifest))

    def record(m: BundleManifest):
        for name, form in made.items():
            forms = m.components[name].variants[precision].forms
            if form is not None:
                forms[FORM] = form
            else:
                forms.pop(FORM, None)

    if any(f is not None for f in made.values()):
        edit_manifest(root, record)
    return made


def default_size(m: BundleManifest) -> dict:
    """The check's default size from the manifest: its defaults, else the smallest size."""
    factor = int(m.vae_scale_factor)
    lowest = int((m.dims or {}).get("min_size", 8 * factor))
    d = m.defaults or {}
    h, w = int(d.get("height", lowest)), int(d.get("width", lowest))
    if h % factor or w % factor:
        raise BundleError(f"manifest defaults {h}x{w} are not multiples of {factor}")
    return {"height": h, "width": w, "factor": factor}
