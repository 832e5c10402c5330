"""Write a bundle: every component exported, checked, hashed; manifest last; swap in atomically.

The bundle is assembled in a hidden sibling folder and renamed into place only when
every component has passed its check and the manifest is written, so a crash or a
failed check never leaves something at ``out`` that loads as a bundle
(``bundletools.staging``).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ldm_edge
from ldm_edge.bundletools.files import file_record
from ldm_edge.bundletools.forms import ATTENTION_COMPONENTS, FORM, make_form
from ldm_edge.bundletools.staging import staged_dir
from ldm_edge.runtime.bundle.schema import (FORMAT_VERSION, AddedConditioningRecord,
                                            BundleManifest, ComponentRecord,
                                            ModelRecord, TinyVaeRecord, TokenizerRecord,
                                            VariantRecord, write_manifest_json)
from ldm_edge.runtime.bundle.spec import TINY_VAE, ModelDims, describe
from ldm_edge.runtime.compare import summarise
from ldm_edge.runtime.errors import ExportError
from ldm_edge.runtime.fsutil import atomic_write_bytes
from ldm_edge.runtime.tasks import task_specs

from .controlnet import export_controlnets, prepare_controlnets
from .load import LoadedModel
from .onnx_export import (DEFAULT_OPSET, check_component, check_inputs_read, export_component,
                          worst)
from .release import release_finished
from .weights_map import MAPPED, write_weights_map

log = logging.getLogger(__name__)

DEFAULT_MIN_SIZE = 32
DEFAULT_MAX_SIZE = 1024
DEFAULT_MAX_BATCH = 4


@dataclass
class ExportOptions:
    opset: int = DEFAULT_OPSET
    min_size: int = DEFAULT_MIN_SIZE
    max_size: int = DEFAULT_MAX_SIZE
    max_batch: int = DEFAULT_MAX_BATCH
    exporter: str = "auto"
    components: tuple = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    force: bool = False
    # add each attention component's onnxruntime form (bundletools/forms.py)
    fused_forms: bool = True
    # --controlnet DIR or NAME=DIR: the U-Net takes residuals, each its own graph
    controlnets: tuple = ()


def check_sizes(model: LoadedModel, opts: ExportOptions) -> None:
    f = model.vae_scale_factor
    for label, v in (("--min-size", opts.min_size), ("--max-size", opts.max_size)):
        if v <= 0 or v % 8 or v % f:
            raise ExportError(f"{label} {v} must be a positive multiple of {max(8, f)} pixels")
    if opts.min_size > opts.max_size:
        raise ExportError(f"--min-size {opts.min_size} is larger than --max-size {opts.max_size}")
    if opts.max_batch < 1:
        raise ExportError("--max-batch must be at least 1")
    for key in ("height", "width"):
        d = int(model.defaults.get(key, opts.min_size))
        if not opts.min_size <= d <= opts.max_size:
            raise ExportError(f"the model's default {key} {d} lies outside "
                              f"--min-size {opts.min_size} .. --max-size {opts.max_size}")


def export_bundle(model: LoadedModel, out: str | Path, opts: ExportOptions,
                  progress: Callable[[str], None] = lambda msg: None) -> BundleManifest:
    """Export, check and write the bundle; return the manifest written."""
    check_sizes(model, opts)
    dims = model_dims(model, opts)
    specs = task_specs(describe(dims), model.task, model.unet_in_channels)
    nets = prepare_controlnets(model, opts.controlnets, specs)  # export/controlnet.py
    out = Path(out)
    with staged_dir(out, opts.force) as stage:
        components = {}
        for name in exported_components(model, opts, specs):
            progress(f"{name}: exporting")
            files = export_component(model, specs[name], stage, opset=opts.opset,
                                     exporter=opts.exporter,
                                     height=int(model.defaults["height"]),
                                     width=int(model.defaults["width"]))
            check_inputs_read(files[0], specs[name])
            progress(f"{name}: checking against PyTorch in onnxruntime")
            results = check_component(model, specs[name], files[0])
            for r in results:
                log.info("%s", r)
            if not all(results):
                raise ExportError(f"{name} does not match PyTorch: {worst(results)}; "
                                  f"nothing was written")
            variant = VariantRecord(file=files[0].name, files=[file_record(p, stage) for p in files],
                                    opset=opts.opset, parity=summarise(results, "pytorch fp32"))
            if opts.fused_forms and name in ATTENTION_COMPONENTS:
                progress(f"{name}: fusing attention for onnxruntime, checking the form")
                form = make_form(stage, specs[name], variant, "fp32",
                                 height=int(model.defaults["height"]),
                                 width=int(model.defaults["width"]), factor=model.vae_scale_factor)
                if form is not None:
                    variant.forms[FORM] = form
            components[name] = ComponentRecord(name, spec=specs[name], variants={"fp32": variant})
            if name in MAPPED:  # which initializer holds which parameter, for LoRA
                forms = [stage / f.file for f in variant.forms.values()]
                wmap = write_weights_map(model, name, files[0], forms)
                components[name].weights_map = file_record(wmap, stage)
            progress(f"{name}: ok ({worst(results)})")
            release_finished(model, name, exported_components(model, opts, specs))
        tok_path = None
        if model.tokenizer_json:  # none for a model that takes no prompt
            tok_path = stage / "tokenizer.json"
            atomic_write_bytes(tok_path, model.tokenizer_json.encode())
        nets = _controlnets(nets, model, specs, stage, opts, progress)
        manifest = build_manifest(model, dims, {**components, **nets[0]}, tok_path, stage)
        manifest.controlnets = nets[1]
        _record_second_encoder(model, manifest, stage)
        write_manifest_json(stage, manifest)
    return manifest


def _controlnets(nets, model: LoadedModel, specs: dict, stage: Path, opts: ExportOptions,
                 progress) -> tuple[dict, dict]:
    """Each --controlnet's graph, checked: (components, the manifest's controlnets records)."""
    return export_controlnets(nets, specs["unet"], stage, family=model.family,
                              factor=model.vae_scale_factor, height=int(model.defaults["height"]),
                              width=int(model.defaults["width"]), opset=opts.opset,
                              fused_form=opts.fused_forms, progress=progress)


def model_dims(model: LoadedModel, opts: ExportOptions) -> ModelDims:
    """The dimensions that fix the components' interfaces, and the exported ranges."""
    given = dict(latent_channels=model.latent_channels, vae_scale_factor=model.vae_scale_factor,
                 text_hidden_size=model.text_hidden_size,
                 text_max_length=model.tokenizer_max_length,
                 use_attention_mask=model.use_attention_mask, min_size=opts.min_size,
                 max_size=opts.max_size, max_batch=opts.max_batch,
                 time_cond_proj_dim=model.time_cond_proj_dim)
    return ModelDims(**{**given, **_second_encoder_dims(model)})


def build_manifest(model: LoadedModel, dims: ModelDims, components: dict, tok_path: Path,
                   root: Path) -> BundleManifest:
    import diffusers
    import torch

    return BundleManifest(
        format_version=FORMAT_VERSION,
        producer={"name": "ldm-edge", "version": ldm_edge.__version__,
                  "torch": torch.__version__, "diffusers": diffusers.__version__},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=ModelRecord(source=model.source, sha256=model.source_sha256, family=model.family),
        task=model.task,
        upscaler=model.upscaler,
        prediction_type=model.prediction_type,
        latent_channels=model.latent_channels,
        vae_scale_factor=model.vae_scale_factor,
        scaling_factor=model.latent_scaling_factor,
        shift_factor=model.vae.config.get("shift_factor") if model.has_full_vae else None,
        tiny_vae=_tiny_vae_record(model),
        size_multiple=max(8, model.vae_scale_factor),
        dims=dims.asdict(),
        defaults=model.defaults,
        tokenizer=_tokenizer_record(model, tok_path, root),
        scheduler=_jsonable(model.scheduler_config),
        components=components,
    )


def _tokenizer_record(model: LoadedModel, tok_path: Path | None, root: Path):
    if tok_path is None:
        return None
    return tokenizer_file_record(tok_path, root, model.tokenizer_max_length, model.pad_token_id,
                                 model.pad_token, model.use_attention_mask)


def tokenizer_file_record(path: Path, root: Path, max_length: int, pad_id: int, pad_token: str,
                          use_attention_mask: bool) -> TokenizerRecord:
    """The manifest's record of a written tokenizer file and how prompts are padded."""
    tok = file_record(path, root)
    return TokenizerRecord(size=tok.size, sha256=tok.sha256, file=tok.path,
                           max_length=max_length, pad_id=pad_id, pad_token=pad_token,
                           use_attention_mask=use_attention_mask, truncation="longest_first")


def _second_encoder_dims(model: LoadedModel) -> dict:
    """SDXL's ModelDims: the second encoder's width, its pooled width, the time ids."""
    second = model.second_encoder
    if second is None:
        return {}
    if model.text_encoder is not None and \
            second.tokenizer["tokenizer_max_length"] != model.tokenizer_max_length:
        raise ExportError("the two tokenizers pad to different lengths; SDXL's both pad to 77")
    return dict(text_hidden_size_2=second.hidden_size, text_embeds_dim=second.projection_dim,
                time_ids_dim=model.time_ids_dim,
                text_max_length=second.tokenizer["tokenizer_max_length"])


def _record_second_encoder(model: LoadedModel, manifest: BundleManifest, stage: Path) -> None:
    """SDXL: tokenizer_2.json and the added conditioning's settings, into ``manifest``
    (written by the caller)."""
    second = model.second_encoder
    if second is None:
        return
    path = stage / "tokenizer_2.json"
    t = second.tokenizer
    atomic_write_bytes(path, t["tokenizer_json"].encode())
    manifest.tokenizer_2 = tokenizer_file_record(path, stage, t["tokenizer_max_length"],
                                                 t["pad_token_id"], t["pad_token"], False)
    manifest.added_conditioning = AddedConditioningRecord(
        force_zeros_for_empty_prompt=second.force_zeros_for_empty_prompt,
        requires_aesthetics_score=second.requires_aesthetics_score)
    # SDXL's VAE overflows in FP16; an fp16-fixed one says force_upcast false
    manifest.vae_force_upcast = bool(model.vae.config.get("force_upcast", True))


def _tiny_vae_record(model: LoadedModel) -> TinyVaeRecord | None:
    if model.tiny_vae is None:
        return None
    return TinyVaeRecord(source=model.tiny_vae_source, sha256=model.tiny_vae_sha256,
                         scaling_factor=float(model.tiny_vae.config.scaling_factor))


def exported_components(model: LoadedModel, opts: ExportOptions, specs: dict) -> list[str]:
    """The asked components this model has: none of a text encoder for an unconditional
    model; no VAE encoder for a VQ autoencoder (no task here encodes images with one). Asking
    for the VAE's decoder or encoder asks for the tiny VAE's too, where the model has one
    (TAESD: ``--tiny-vae``), and only for that where it is the model's only VAE."""
    from .components import _is_vq

    names = []
    for n in opts.components:
        if n == "text_encoder" and model.second_encoder is not None:  # SDXL: both encoders
            names += ["text_encoder"] * (model.text_encoder is not None) + ["text_encoder_2"]
        elif n in TINY_VAE:
            names += [n] if model.has_full_vae else []
            names += [TINY_VAE[n]] if model.tiny_vae is not None else []
        else:
            names.append(n)
    return [n for n in names
            if n in specs and not (n == "vae_encoder" and _is_vq(model.vae))]


def _jsonable(cfg: dict) -> dict:
    out = {}
    for k, v in dict(cfg).items():
        if isinstance(v, (tuple, list)):
            v = list(v)
        elif hasattr(v, "tolist"):
            v = v.tolist()
        out[k] = v
    return out

