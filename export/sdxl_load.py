"""Load an SDXL diffusers folder: StableDiffusionXLPipeline (base, SDXL-Turbo, distilled
layouts such as SSD-1B and Segmind-Vega: the same components with fewer blocks),
StableDiffusionXLImg2ImgPipeline (the refiner: the second text encoder only, time ids ending
with an aesthetic score) and StableDiffusionXLInpaintPipeline (a 9-channel U-Net)."""

from __future__ import annotations

import json
from pathlib import Path

from ldm_edge.runtime.errors import first_line
from ldm_edge.runtime.tasks import INPAINT

from .model_facts import (LoadedModel, ModelLoadError, SecondEncoder, check_unet, hash_files,
                          model_defaults, tokenizer_facts)

SDXL_PARTS = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
# StableDiffusionXLPipeline's defaults where the model does not say (its sample size gives 1024)
SDXL_GUIDANCE = 5.0
SDXL_STEPS = 50


def is_sdxl_folder(p: Path) -> bool:
    return (p / "text_encoder_2").is_dir() or (p / "tokenizer_2").is_dir()


def load_sdxl_folder(p: Path, files) -> LoadedModel:
    """``files``: the model's weight files (their hash is the bundle's source_sha256)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    missing = [part for part in SDXL_PARTS if not (p / part).is_dir()]
    if missing:
        raise ModelLoadError(f"{p.name}: not an SDXL pipeline folder, missing "
                             f"{', '.join(m + '/' for m in missing)}")
    index = _index(p)
    first = (p / "text_encoder").is_dir() and (index.get("text_encoder") or [None])[0] is not None
    try:
        unet = UNet2DConditionModel.from_pretrained(p / "unet")
        vae = AutoencoderKL.from_pretrained(p / "vae")
        te2 = transformers.CLIPTextModelWithProjection.from_pretrained(p / "text_encoder_2")
        tok2 = transformers.AutoTokenizer.from_pretrained(p / "tokenizer_2")
        te1 = transformers.CLIPTextModel.from_pretrained(p / "text_encoder") if first else None
        tok1 = transformers.AutoTokenizer.from_pretrained(p / "tokenizer") if first else None
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{p.name}: cannot load ({first_line(e, 300)})")
    check_unet(unet, text_time=True)
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    second = SecondEncoder(
        te2.eval(), tokenizer_facts(tok2, te2),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))
    inpaint = int(unet.config.in_channels) == 2 * int(vae.config.latent_channels) + 1
    tok = tokenizer_facts(tok1, te1) if first else _no_first_tokenizer(second.tokenizer)
    model = LoadedModel(
        source=p.name, source_sha256=hash_files(files),
        family="sdxl" if first else "sdxl-refiner", text_encoder=te1.eval() if first else None,
        unet=unet.eval(), vae=vae.eval(), use_attention_mask=False, scheduler_config=sched,
        defaults=_defaults(unet, vae, sched), task=INPAINT if inpaint else None,
        second_encoder=second, **tok)
    _check_widths(model)
    return model


def _index(p: Path) -> dict:
    f = p / "model_index.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _no_first_tokenizer(second: dict) -> dict:
    """The refiner has no first tokenizer: no tokenizer.json is written for it; prompts are
    as long as the second one's."""
    return dict(tokenizer_json="", tokenizer_max_length=second["tokenizer_max_length"],
                pad_token_id=0, pad_token="")


def _defaults(unet, vae, sched: dict) -> dict:
    d = model_defaults(unet, vae, sched)
    d.update(guidance_scale=SDXL_GUIDANCE, num_inference_steps=SDXL_STEPS)
    return d


def _check_widths(model: LoadedModel) -> None:
    """The U-Net must take what the encoders give: refused by name otherwise."""
    cfg = model.unet.config
    if int(cfg.cross_attention_dim) != model.cross_attention_dim:
        raise ModelLoadError(f"{model.source}: the U-Net's cross_attention_dim "
                             f"{cfg.cross_attention_dim} is not the text encoders' joined width "
                             f"{model.cross_attention_dim}")
    if model.time_ids_dim not in (5, 6):
        raise ModelLoadError(f"{model.source}: the U-Net's added embedding takes "
                             f"{cfg.projection_class_embeddings_input_dim} values, which is not "
                             f"the pooled width {model.second_encoder.projection_dim} plus 5 or "
                             f"6 time ids of {cfg.addition_time_embed_dim}")
