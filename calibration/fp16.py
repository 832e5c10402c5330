"""FP16 graphs with FP32 islands, decided by running.

Each component's FP32 graph is rewritten to FP16 (inputs and outputs stay FP32, so the
runtime's feeds do not change), run on inputs captured from the bundle's own FP32
sampling loop, and compared with FP32. If it misses the bar, more of it stays FP32:
normalisations, then softmax too; a component that still misses stays FP32 entirely
(recorded as such). The U-Net's sinusoidal timestep embedding is always FP32: in FP16,
``t * freq`` for t near 1000 loses the phase of its high-frequency terms.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ldm_edge.bundletools.files import file_record
from ldm_edge.bundletools.forms import add_fused_forms
from ldm_edge.bundletools.quality import control_quality, end_to_end_psnr, schedulers_to_check

# fp16.save_graph: the tests save to_fp16's graphs with it
from ldm_edge.bundletools.save import save_graph  # noqa: F401
from ldm_edge.bundletools.task_inputs import labels
from ldm_edge.bundletools.variant_txn import VariantTransaction
from ldm_edge.runtime.backends.sessions import SessionFromOnnx
from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.bundle.schema import (BundleManifest, QualityRecord, VariantRecord,
                                            read_manifest_json)
from ldm_edge.runtime.bundle.spec import TINY_VAE
from ldm_edge.runtime.compare import compare
from ldm_edge.runtime.errors import ExportError, first_line
from ldm_edge.runtime.tasks import takes_prompt

from .capture import capture, default_prompts

log = logging.getLogger(__name__)

# Islands, from fewest to most FP32 ops. A level is accepted when every captured sample
# meets FP16_MIN_COSINE; FP16's 11-bit mantissa alone gives cosines of ~0.99999 on these
# graphs, so 0.9995 flags overflow/underflow damage while accepting ordinary rounding.
ISLAND_LEVELS = (
    ("base", ()),
    ("norms", ("InstanceNormalization", "LayerNormalization", "GroupNormalization",
               "ReduceMean", "Pow", "Sqrt")),
    ("norms+softmax", ("InstanceNormalization", "LayerNormalization", "GroupNormalization",
                       "ReduceMean", "Pow", "Sqrt", "Softmax")),
)
FP16_MIN_COSINE = 0.9995
# substrings of node names. The VQ decoder's nearest-code look-up (export/components.py):
# in FP16 its distances round enough to pick neighbouring codes, a whole latent cell off
VQ_LOOKUP = "/vq_lookup/"
ALWAYS_FP32_NODES = ("/time_proj/", VQ_LOOKUP)
# Samples per component for the check; the U-Net's are spread over the trajectory.
MAX_SAMPLES = 6


def constants_to_initializers(proto) -> None:
    """Constant nodes become initializers, so the converter can tell which feed FP32-only
    inputs (e.g. Resize scales) and leave those alone."""
    import onnx

    keep = []
    for node in proto.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            proto.graph.initializer.append(t)
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def to_fp16(fp32_path: Path, block_ops: tuple):
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from ldm_edge.bundletools.external_data import load_all

    # Types of every intermediate value are needed to place the casts around islands.
    # Infer them on the graph without its weights (small even for a 3 GB U-Net), then
    # load the weights: the whole model is never serialised in memory.
    proto = onnx.load(str(fp32_path), load_external_data=False)
    constants_to_initializers(proto)
    proto = onnx.shape_inference.infer_shapes(proto)
    load_all(proto, Path(fp32_path).parent)  # onnx's loader refuses hard-linked data files
    nodes = [n.name for n in proto.graph.node if any(s in n.name for s in ALWAYS_FP32_NODES)]
    # disable_shape_infer: shape inference serialises the model, impossible above 2 GB
    out = convert_float_to_float16(
        proto, keep_io_types=True, disable_shape_infer=True,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(block_ops), node_block_list=nodes)
    keep_chain_fp32(out, VQ_LOOKUP)
    return out


def keep_chain_fp32(proto, marker: str) -> None:
    """The converter passes every value between two blocked nodes through FP16 and back (a
    Cast pair); for the nodes named with ``marker`` feed each such consumer the FP32 value
    itself. The VQ look-up's squared norms of latents overflow FP16 otherwise."""
    from onnx import TensorProto

    nodes = list(proto.graph.node)
    made_by = {o: n for n in nodes for o in n.output}
    users: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def cast_to(n, t) -> bool:
        return n is not None and n.op_type == "Cast" and any(
            a.name == "to" and a.i == t for a in n.attribute)

    rewired = 0
    for n in nodes:
        up = made_by.get(n.input[0]) if n.input else None
        if not (cast_to(n, TensorProto.FLOAT) and cast_to(up, TensorProto.FLOAT16)):
            continue
        after = users.get(n.output[0], [])
        if after and all(marker in u.name for u in after):
            for u in after:
                u.input[:] = [up.input[0] if i == n.output[0] else i for i in u.input]
            rewired += 1
    if rewired:  # graphs without the marker (every SD graph) are left exactly as they were
        _drop_unused_casts(proto)


def _drop_unused_casts(proto) -> None:
    outputs = {o.name for o in proto.graph.output}
    while True:
        used = {i for n in proto.graph.node for i in n.input} | outputs
        dead = [n for n in proto.graph.node
                if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            proto.graph.node.remove(n)


def pick_samples(records: list[dict]) -> list[dict]:
    if len(records) <= MAX_SAMPLES:
        return records
    idx = np.linspace(0, len(records) - 1, MAX_SAMPLES).round().astype(int)
    return [records[i] for i in idx]


def worst_cosine(fp16_path: Path, fp32_path: Path, samples: list[dict]):
    s16, s32 = SessionFromOnnx(fp16_path)(), SessionFromOnnx(fp32_path)()
    results = []
    for i, feeds in enumerate(samples):  # every output (a ControlNet has one per residual)
        for k, (out, ref) in enumerate(zip(s16.run(None, feeds), s32.run(None, feeds))):
            results.append(compare(out, ref, f"sample {i}" + (f" output {k}" if k else ""),
                                   min_cosine=FP16_MIN_COSINE))
    return min(results, key=lambda r: (bool(r), r.cosine))


# the graphs of the model's own VAE (a tiny VAE beside it has its own numerics)
UPCAST_VAE = ("vae_decoder", "vae_encoder")


def convert_component(manifest: Manifest, name: str, samples: list[dict], progress,
                      txn: VariantTransaction) -> VariantRecord | None:
    """Write ``<name>.fp16.onnx`` at the first island level that passes (its files ``txn``'s);
    None (nothing left on disk) if none does."""
    fp32 = manifest.variant(name, "fp32").path
    comp = manifest.component(name)
    feeds = [{comp.graph_name(k): v for k, v in s.items()} for s in samples]
    dest = manifest.root / f"{name}.fp16.onnx"
    for level, ops in ISLAND_LEVELS:
        files = txn.save(to_fp16(fp32, ops), dest)
        try:
            res = worst_cosine(dest, fp32, feeds)
        except Exception as e:  # the converter made a graph onnxruntime rejects
            res = None
            progress(f"{name}: fp16 with islands '{level}': invalid graph ({first_line(e, 160)})")
        else:
            progress(f"{name}: fp16 with islands '{level}': {res}")
        if res:
            return VariantRecord(
                file=dest.relative_to(manifest.root).as_posix(), files=[file_record(p, manifest.root) for p in files],
                islands=level, fp32_nodes=list(ALWAYS_FP32_NODES),
                parity={**res.to_json(), "reference": "onnxruntime fp32", "passed": True,
                        "samples": len(feeds), "min_cosine": FP16_MIN_COSINE})
        txn.discard(files)
    return None


def encoder_samples(manifest: Manifest, records: dict, decoder: str = "vae_decoder") -> list[dict]:
    """Real images for a VAE encoder: the FP32 decoder's outputs on captured latents."""
    dec = SessionFromOnnx(manifest.variant(decoder, "fp32").path)()
    comp = manifest.component(decoder)
    out = []
    for feeds in records.get(decoder, [])[:MAX_SAMPLES]:
        img = dec.run(None, {comp.graph_name(k): v for k, v in feeds.items()})[0]
        out.append({"image": np.clip(img, -1, 1).astype(np.float32)})
    return out


def decoder_inputs_for(manifest: Manifest, calls: list[dict], ran: str, other: str) -> list[dict]:
    """The inputs of one VAE decoder's ``calls`` (``ran``: "vae_decoder" or
    "vae_decoder_tiny") as the other decoder takes the same latents, at its own scaling."""
    s_ran, shift_ran = manifest.schema.vae_scaling(ran != "vae_decoder")
    s_other, shift_other = manifest.schema.vae_scaling(other != "vae_decoder")
    return [{"latent": (((f["latent"] - (shift_ran or 0.0)) * s_ran / s_other)
                        + (shift_other or 0.0)).astype(np.float32)} for f in calls]


def add_vae_samples(manifest: Manifest, records: dict) -> None:
    """Inputs for the VAE graphs the capture run did not call: a bundle with both VAEs (TAESD
    beside the full one) decodes with one, so the other decoder gets the same latents at its
    own scaling; the encoders get real images (``encoder_samples``)."""
    ran = "vae_decoder" if "vae_decoder" in records else "vae_decoder_tiny"
    other = TINY_VAE["vae_decoder"] if ran == "vae_decoder" else "vae_decoder"
    if manifest.has(other):
        records[other] = decoder_inputs_for(manifest, records.get(ran, []), ran, other)
    for encoder in ("vae_encoder", TINY_VAE["vae_encoder"]):
        if manifest.has(encoder):
            records[encoder] = encoder_samples(manifest, records, ran)


def make_fp16(bundle, prompts: list[str] | None = None, steps: int = 10,
              progress=lambda msg: None) -> BundleManifest:
    """Add FP16 variants to ``bundle`` and record their measured quality. As ``make_int8``
    does, the end-to-end check runs through a manifest not yet on disk that names the new
    graphs, and the manifest is written once, at the end: a failure leaves it as it was
    (less a previous FP16 variant, whose files were about to be replaced)."""
    bundle = Path(bundle)
    manifest = open_bundle(bundle)
    # a model that takes no prompt samples without (bundletools/task_inputs.py says with what)
    prompts = labels(manifest.schema, prompts or default_prompts(4))
    progress(f"capturing inputs: FP32 sampling of {len(prompts)} prompts, {steps} steps"
             + (f" (the model takes no prompt: {prompts[0]}, ...)"
                if not takes_prompt(manifest.schema.task) else ""))
    records = capture(bundle, prompts, steps=steps)
    add_vae_samples(manifest, records)
    with VariantTransaction(bundle) as txn:
        txn.forget("fp16")  # its files are about to be replaced
        converted = _convert_all(manifest, records, progress, txn)
        # the model's own sampler only: FP16's error is far below any sampler's sensitivity
        q = end_to_end_psnr(txn.manifest(), "fp16", prompts[:2], steps=steps,
                            schedulers=schedulers_to_check(manifest, ()))
        progress(f"end to end: 8-bit PSNR vs FP32 {q['psnr_db']:.1f} dB, U-Net cosine ≥ "
                 f"{q['unet_cosine_min']:.5f}")
        q["control"] = _with_control(txn, prompts[:2], steps, progress)
        kept = sorted(set(manifest.component_names) - set(converted))
        record = QualityRecord.from_json({**q, "components_kept_fp32": kept}, "quality.fp16")
        txn.commit(quality={"fp16": record})
    # onnxruntime's fused-attention form of each new graph, checked against it (the FP32
    # variants got theirs at export); the recorded quality holds for it within FP16 rounding
    forms = add_fused_forms(bundle, "fp16", components=converted)
    progress("fused-attention forms: " + (", ".join(n for n, f in forms.items() if f) or "none"))
    return read_manifest_json(bundle)


def _with_control(txn: VariantTransaction, prompts: list[str], steps: int,
                  progress) -> dict | None:
    """The FP16 pictures with a ControlNet active vs FP32's (bundletools/quality.py), for a
    bundle with ControlNets."""
    qc = control_quality(txn.manifest(), "fp16", prompts, steps=steps)
    if qc is not None:
        progress(f"with a ControlNet active: 8-bit PSNR vs FP32 {qc['psnr_db']:.1f} dB, U-Net "
                 f"cosine ≥ {qc['unet_cosine_min']:.5f}, ControlNet residuals' cosine ≥ "
                 f"{qc['controlnet_cosine_min']:.5f}")
    return qc


def _convert_all(manifest: Manifest, records: dict, progress, txn: VariantTransaction) -> list[str]:
    """Convert each component (``convert_component``) and put its variant into ``txn``;
    return the names converted. ExportError when the U-Net cannot run in FP16."""
    converted = []
    for name in manifest.component_names:
        if name in UPCAST_VAE and manifest.schema.vae_force_upcast:
            progress(f"{name}: stays FP32 (the model's VAE says force_upcast: SDXL's overflows "
                     f"in FP16; an fp16-fixed VAE says otherwise)")
            continue
        if name not in records:  # a ControlNet no calibration run took (capture.py)
            progress(f"{name}: stays FP32 (no run used it: more ControlNets than every other "
                     f"prompt; give more --num-prompts)")
            continue
        variant = convert_component(manifest, name, pick_samples(records[name]), progress, txn)
        if variant is None and name == "unet":
            raise ExportError("the U-Net does not run in FP16 even with norms and softmax in "
                              "FP32; keep using --precision fp32")
        if variant is None:
            progress(f"{name}: stays FP32 (overflows or loses accuracy in FP16)")
        else:
            txn.put(name, "fp16", variant)
            converted.append(name)
    return converted
