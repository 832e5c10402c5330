"""ControlNets (diffusers ``ControlNetModel`` folders) into a bundle, each its own checked graph.

``ldm-export onnx SOURCE --controlnet DIR`` exports the U-Net with the ControlNet residuals as
extra inputs (diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``;
fed zeros it gives the plain U-Net's output exactly) and each ControlNet as the component
``controlnet/NAME``; ``ldm-export controlnet BUNDLE DIR`` adds one to a bundle whose U-Net
takes the residuals. The interfaces are runtime/bundle/control_spec.py's; the runtime's side
is runtime/control.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm_edge.bundletools.files import file_record
from ldm_edge.bundletools.forms import FORM, make_form
from ldm_edge.runtime.bundle.control_spec import (CONTROLNET_PREFIX, NAME_PATTERN, Residual,
                                                  controlnet_spec, residual_layout, residuals_of)
from ldm_edge.runtime.bundle.schema import ComponentRecord, ControlNetRecord, VariantRecord
from ldm_edge.runtime.bundle.spec import ComponentSpec
from ldm_edge.runtime.compare import compare, summarise
from ldm_edge.runtime.errors import ExportError, first_line

from .controlnet_modules import AddedControlNetGraph, ControlNetGraph
from .onnx_export import (EXPORT_ATOL, EXPORT_MIN_COSINE, EXPORT_RTOL, _finalise, _torch_export,
                          check_inputs_read, worst)

log = logging.getLogger(__name__)

@dataclass
class LoadedControlNet:
    name: str
    module: object  # diffusers ControlNetModel
    source: str
    sha256: str


def parse_controlnet_arg(arg: str) -> tuple[str, Path]:
    """``DIR`` (named by its folder), ``FILE`` (a single file, named by its stem), or
    ``NAME=DIR`` / ``NAME=FILE``."""
    from .controlnet_single_file import SUFFIXES

    name, sep, path = arg.partition("=")
    if not sep:
        path = Path(arg.rstrip("/"))
        name = path.stem if path.suffix.lower() in SUFFIXES else path.name
    if not NAME_PATTERN.match(name):
        raise ExportError(f"--controlnet {arg}: name {name!r} must be letters, digits, '.', "
                          f"'_' or '-' (give NAME=DIR or NAME=FILE to name it)")
    return name, Path(path)


def load_controlnet(arg: str, *, unet=None, config=None) -> LoadedControlNet:
    """A diffusers ControlNetModel folder (config.json + weights), or a single file in the
    original layout (export/controlnet_single_file.py: its architecture is ``unet``'s, the
    model's diffusers U-Net, or ``config``'s), named; one-line errors."""
    from diffusers import ControlNetModel

    from .controlnet_single_file import is_controlnet_file, load_controlnet_file
    from .model_facts import hash_files

    name, path = parse_controlnet_arg(arg)
    if is_controlnet_file(path):
        module, sha256 = load_controlnet_file(path, unet=unet, config=config)
        return LoadedControlNet(name, module, str(path), sha256)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ExportError(f"--controlnet {path}: not a diffusers ControlNetModel folder "
                          f"(no config.json) nor a .safetensors/.pth/.ckpt file")
    kind = json.loads(cfg.read_text()).get("_class_name")
    if kind != "ControlNetModel":
        raise ExportError(f"--controlnet {path}: config.json is a {kind}, not a ControlNetModel")
    try:
        module = ControlNetModel.from_pretrained(path).eval()
    except Exception as e:  # a damaged folder: diffusers' own words, one line
        raise ExportError(f"--controlnet {path}: cannot load it ({first_line(e)})")
    files = [q for q in path.rglob("*") if q.is_file() and q.suffix in (".json", ".safetensors",
                                                                         ".bin")]
    return LoadedControlNet(name, module, str(path), hash_files(files))


def residuals_for(unet) -> list[Residual]:
    """The residual layout of a diffusers U-Net (its config): SD1/SD2 and SDXL layouts."""
    return residual_layout(unet.config.block_out_channels, unet.config.layers_per_block)


def check_fits(net: LoadedControlNet, unet: ComponentSpec, vae_scale_factor: int) -> None:
    """ExportError unless the ControlNet was made for a U-Net of this architecture: the same
    residuals (channels and levels, one for one), text states and latent channels (an
    inpainting U-Net's mask and masked-image channels are not the ControlNet's: it takes the
    latents alone, the U-Net's output channels)."""
    cfg = net.module.config
    by = {t.name: t for t in unet.inputs}
    _check_added(net, by)
    ours = [(r.channels, r.level) for r in residuals_of(unet)]
    theirs = [(r.channels, r.level) for r in
              residual_layout(cfg.block_out_channels, cfg.layers_per_block)]
    mine = {"residuals": theirs, "cross_attention_dim": int(cfg.cross_attention_dim),
            "in_channels": int(cfg.in_channels)}
    want = {"residuals": ours, "cross_attention_dim": int(by["encoder_hidden_states"].shape[-1]),
            "in_channels": int(unet.outputs[0].shape[1])}
    for key in mine:
        if mine[key] != want[key]:
            raise ExportError(f"ControlNet {net.name} is for another model: its {key} "
                              f"{_short(mine[key])} vs the U-Net's {_short(want[key])} "
                              f"(an SD1 ControlNet on SD2?)")
    stride = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    if stride != vae_scale_factor:
        raise ExportError(f"ControlNet {net.name}: its conditioning embedding scales images by "
                          f"1/{stride}, the VAE by 1/{vae_scale_factor}")


def _check_added(net: LoadedControlNet, by: dict) -> None:
    """An SDXL ControlNet ("text_time") on an SDXL U-Net only, of the same pooled-text and
    time-id widths; SD1/SD2 ones on the others. Global-pool (shuffle) ones are refused."""
    cfg = net.module.config
    kind = cfg.get("addition_embed_type")
    if cfg.get("global_pool_conditions") or kind not in (None, "text_time"):
        raise ExportError(f"ControlNet {net.name}: global-pool (shuffle) ControlNets and "
                          f"addition_embed_type {kind!r} are not supported yet")
    sdxl = "time_ids" in by
    if (kind == "text_time") != sdxl:
        raise ExportError(f"ControlNet {net.name} is for another model: an "
                          f"{'SDXL' if kind else 'SD1/SD2'} ControlNet on an "
                          f"{'SDXL' if sdxl else 'SD1/SD2'} U-Net")
    if sdxl:
        ids, pooled = int(by["time_ids"].shape[1]), int(by["text_embeds"].shape[1])
        mine = int(cfg.projection_class_embeddings_input_dim)
        want = ids * int(cfg.addition_time_embed_dim) + pooled
        if mine != want:
            raise ExportError(f"ControlNet {net.name} is for another model: its added embedding "
                              f"takes {mine} values, the U-Net's pooled text and {ids} time "
                              f"ids make {want} (a base ControlNet on the refiner?)")


def _short(v) -> str:
    return f"({len(v)} of channels {sorted({c for c, _ in v})})" if isinstance(v, list) else str(v)


def controlnet_feeds(spec: ComponentSpec, batch: int, height: int, width: int, factor: int,
                     seed: int) -> dict:
    """Sample inputs of a ControlNet graph at ``batch`` images of ``height`` x ``width``."""
    rng = np.random.default_rng(seed)
    by = {t.name: t for t in spec.inputs}
    _, c, _, _ = by["sample"].shape
    _, length, hidden = by["encoder_hidden_states"].shape
    n = by["conditioning_scale"].shape[0]
    added = {}
    if "time_ids" in by:  # SDXL: pooled text embeddings; sizes in pixels
        added = {"text_embeds": rng.standard_normal((batch, by["text_embeds"].shape[1]),
                                                    dtype=np.float32),
                 "time_ids": rng.integers(0, 1024, size=(batch, by["time_ids"].shape[1])
                                          ).astype(np.float32)}
    return added | {
        "sample": rng.standard_normal((batch, c, height // factor, width // factor),
                                      dtype=np.float32),
        "timestep": rng.uniform(0, 999, size=(batch,)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, length, hidden), dtype=np.float32),
        "controlnet_cond": rng.uniform(0, 1, size=(batch, 3, height, width)).astype(np.float32),
        "conditioning_scale": rng.uniform(0.1, 1.5, size=(n,)).astype(np.float32),
    }


def check_shapes(height: int, width: int, factor: int) -> list[tuple[int, int, int]]:
    """Batch 1 at the default size, batch 2 at another width (as onnx_export.check_shapes)."""
    w2 = max(factor, (width * 3 // 4) // factor * factor)
    return [(1, height, width), (2, height, w2 if w2 != width else width + factor)]


# -- into a bundle ------------------------------------------------------------------------------
def prepare_controlnets(model, args, specs: dict) -> list[LoadedControlNet]:
    """Before anything is exported: load each ``--controlnet``, check it fits the model, and
    give the U-Net's spec the residual inputs (``model.unet_residuals``: its wrapper takes them).
    Nothing happens without ControlNets: the bundle is exported as before."""
    from ldm_edge.runtime.bundle.control_spec import with_residuals

    if not args:
        return []
    why = _unsupported(model)
    if why:
        raise ExportError(f"--controlnet: {why}; ControlNets work on SD1.x/SD2.x and SDXL "
                          f"text-to-image models")
    nets = [load_controlnet(a, unet=model.unet) for a in args]
    names = [n.name for n in nets]
    if len(set(names)) != len(names):
        raise ExportError(f"--controlnet: two ControlNets named {names}; give NAME=DIR")
    specs["unet"] = with_residuals(specs["unet"], residuals_for(model.unet))
    for net in nets:
        check_fits(net, specs["unet"], model.vae_scale_factor)
    model.unet_residuals = True
    return nets


def _unsupported(model) -> str | None:
    if model.text_encoder is None and getattr(model, "second_encoder", None) is not None:
        return "an SDXL refiner (no ControlNet is made for it)"
    if model.text_encoder is None:
        return "a model without a prompt"
    if model.time_cond_proj_dim or model.upscaler is not None:
        return "an LCM-distilled or upscaler U-Net"
    return None


def export_controlnets(nets: list[LoadedControlNet], unet_spec: ComponentSpec, stage: Path, *,
                       family: str | None, factor: int, height: int, width: int, opset: int,
                       fused_form: bool = True,
                       progress=lambda m: None) -> tuple[dict, dict]:
    """Export and check each ControlNet into ``stage``: (components, controlnets records)."""
    comps, records = {}, {}
    for net in nets:
        progress(f"{CONTROLNET_PREFIX}{net.name}: exporting, checking against PyTorch")
        comp = export_controlnet(net, unet_spec, stage, factor=factor, height=height,
                                 width=width, opset=opset, fused_form=fused_form)
        comps[comp.name] = comp
        records[net.name] = ControlNetRecord(component=comp.name, source=net.source,
                                             sha256=net.sha256, family=family)
        progress(f"{comp.name}: ok (max-abs {comp.variants['fp32'].parity['max_abs']:.1e})")
    return comps, records


def export_controlnet(net: LoadedControlNet, unet_spec: ComponentSpec, root: Path, *,
                      factor: int, height: int, width: int, opset: int,
                      fused_form: bool = True) -> ComponentRecord:
    """``root``/controlnet/NAME.onnx, checked against PyTorch at two shapes (every residual
    within the export tolerances of export/onnx_export.py), or an ExportError; with
    ``fused_form``, its onnxruntime form beside it (attention fused, bundletools/forms.py: a
    ControlNet is the U-Net's encoder, with its attention at the latent's full size)."""
    spec = controlnet_spec(net.name, unet_spec, residuals_of(unet_spec), factor)
    sdxl = "time_ids" in spec.input_names
    module = (AddedControlNetGraph if sdxl else ControlNetGraph)(net.module).eval()
    folder = root / CONTROLNET_PREFIX.rstrip("/")
    folder.mkdir(exist_ok=True)
    files = _export(module, spec, folder / f"{net.name}.onnx", height, width, factor, opset)
    check_inputs_read(files[0], spec)
    results = check_controlnet(module, spec, files[0], height, width, factor)
    for r in results:
        log.info("%s", r)
    if not all(results):
        raise ExportError(f"{spec.name} does not match PyTorch: {worst(results)}; "
                          f"nothing was written")
    whole = [r for r in results if r.name.count(" ") == 2]  # per shape, all residuals
    variant = VariantRecord(file=files[0].relative_to(root).as_posix(),
                            files=[file_record(p, root) for p in files], opset=opset,
                            parity=summarise(whole, "pytorch fp32"))
    if fused_form:
        form = make_form(root, spec, variant, "fp32", height=height, width=width, factor=factor)
        if form is not None:
            variant.forms[FORM] = form
    return ComponentRecord(spec.name, spec=spec, variants={"fp32": variant})


def _export(module, spec: ComponentSpec, dest: Path, height: int, width: int, factor: int,
            opset: int) -> list[Path]:
    """Traced one latent row off the default size (as onnx_export traces the U-Net)."""
    from ldm_edge.bundletools.save import EXTERNAL_DATA_THRESHOLD

    feeds = controlnet_feeds(spec, 2, height + factor, width, factor, seed=1)
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    large = sum(p.numel() * p.element_size() for p in module.parameters()) \
        > EXTERNAL_DATA_THRESHOLD
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.stem}-", dir=dest.parent))
    try:
        raw = scratch / dest.name
        _torch_export(module, args, raw, spec, opset, dynamo=False)
        return _finalise(raw, dest, large)
    except OSError:
        raise
    except Exception as e:
        raise ExportError(f"{spec.name}: export failed ({first_line(e, 300)})")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@torch.no_grad()
def check_controlnet(module, spec: ComponentSpec, onnx_path: Path, height: int, width: int,
                     factor: int) -> list:
    """Every residual of the graph against PyTorch at two shapes, and per shape all of them
    at once (what the manifest records)."""
    from ldm_edge.runtime.backends.sessions import SessionFromOnnx

    sess = SessionFromOnnx(onnx_path)()
    tol = dict(atol=EXPORT_ATOL, rtol=EXPORT_RTOL, min_cosine=EXPORT_MIN_COSINE)
    results = []
    for i, (b, h, w) in enumerate(check_shapes(height, width, factor)):
        feeds = controlnet_feeds(spec, b, h, w, factor, seed=10 + i)
        ref = [t.float().numpy() for t in
               module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))]
        got = sess.run(spec.output_names, feeds)
        label = f"{spec.name} b{b} {h}x{w}"
        results += [compare(g, r, f"{label} {n}", **tol)
                    for g, r, n in zip(got, ref, spec.output_names)]
        results.append(compare(np.concatenate([g.ravel() for g in got]),
                               np.concatenate([r.ravel() for r in ref]), label, **tol))
    return results


def add_controlnet(bundle, arg: str, progress=lambda m: None, config=None):
    """``ldm-export controlnet BUNDLE DIR|FILE``: export and check one ControlNet into a bundle
    whose U-Net takes the residuals (a single file's architecture from ``config``). Its files
    are made in a hidden folder in the bundle and moved beside the others before the manifest
    is rewritten (atomically): until then the bundle is the old, whole one; on a failure
    nothing of it stays."""
    import os

    from ldm_edge.runtime.bundle.control_spec import component_key, takes_residuals
    from ldm_edge.runtime.bundle.opener import open_bundle
    from ldm_edge.runtime.bundle.schema import edit_manifest

    bundle = Path(bundle)
    m = open_bundle(bundle, True).schema  # a damaged bundle is refused before any work
    unet = m.components["unet"]
    if not takes_residuals(unet.spec):
        raise ExportError(f"{bundle}: its U-Net takes no ControlNet residuals; re-export the "
                          f"bundle with `ldm-export onnx SOURCE --controlnet DIR`")
    net = load_controlnet(arg, config=config)
    if net.name in m.controlnets or (bundle / f"{component_key(net.name)}.onnx").exists():
        raise ExportError(f"{bundle} already has a ControlNet named {net.name}; name this one "
                          f"with NAME=DIR")
    check_fits(net, unet.spec, int(m.vae_scale_factor))
    stage = Path(tempfile.mkdtemp(prefix=".controlnet-partial-", dir=bundle))
    moved = []
    try:
        progress(f"{component_key(net.name)}: exporting, checking against PyTorch")
        comp = export_controlnet(net, unet.spec, stage, factor=int(m.vae_scale_factor),
                                 height=int(m.defaults.height), width=int(m.defaults.width),
                                 opset=unet.variants["fp32"].opset or 18)
        (bundle / CONTROLNET_PREFIX).mkdir(exist_ok=True)
        variant = comp.variants["fp32"]
        for path in dict.fromkeys([f.path for f in variant.files] + [
                f.path for form in variant.forms.values() for f in form.files]):
            os.replace(stage / path, bundle / path)
            moved.append(bundle / path)
        record = ControlNetRecord(component=comp.name, source=net.source, sha256=net.sha256,
                                  family=m.model.family)

        def change(manifest):
            manifest.components[comp.name] = comp
            manifest.controlnets[net.name] = record
        manifest = edit_manifest(bundle, change)
    except BaseException:
        for p in moved:
            p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest
