"""SDXL single-file checkpoints in the original (Stability's SGM) layout: the base
(``conditioner.embedders.0.transformer.*`` CLIP ViT-L in transformers' layout,
``conditioner.embedders.1.model.*`` OpenCLIP ViT-bigG in open_clip's layout) and the refiner
(``conditioner.embedders.0.model.*``, OpenCLIP only), each with ``model.diffusion_model.*`` (the
U-Net) and ``first_stage_model.*`` (the VAE).

The file holds weights only. Its configs, tokenizers, scheduler and pipeline settings
(``force_zeros_for_empty_prompt``, ``requires_aesthetics_score``) come from ``--config DIR``, a
diffusers SDXL folder of the same model whose weights are not needed (model_index.json,
*/config.json, scheduler/, tokenizer*/): the two tokenizers exist nowhere else offline, so
inferring the networks' configs from tensor shapes would still leave the file unusable without
that folder. The weights are converted with diffusers' own functions
(``diffusers.loaders.single_file_utils``) and loaded strictly: every tensor of every network
must come from the file, or the load is refused in one line naming the part.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from ldm_edge.runtime.errors import first_line
from ldm_edge.runtime.tasks import INPAINT

from .model_facts import (LoadedModel, ModelLoadError, SecondEncoder, check_unet, hash_files,
                          tokenizer_facts)
from .sdxl_load import _check_widths, _defaults, _index, _no_first_tokenizer, is_sdxl_folder

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, BIGG, REFINER_BIGG = ("conditioner.embedders.0.transformer.",
                              "conditioner.embedders.1.model.", "conditioner.embedders.0.model.")
# the parts of each kind of file by key prefix, named as the error messages name them
BASE_PARTS = {"U-Net": UNET, "VAE": VAE, "text encoder 1 (CLIP ViT-L)": CLIP_L,
              "text encoder 2 (OpenCLIP ViT-bigG)": BIGG}
REFINER_PARTS = {"U-Net": UNET, "VAE": VAE, "text encoder (OpenCLIP ViT-bigG)": REFINER_BIGG}
# SDXL's added-embedding MLP (pooled text + time ids) in the SGM U-Net; SD1/SD2 have none
SDXL_UNET_MARK = UNET + "label_emb.0.0.weight"
# what --config must hold for each kind (files or folders, relative to it)
CONFIG_NEEDS = ("unet/config.json", "vae/config.json", "text_encoder_2/config.json",
                "tokenizer_2", "scheduler/scheduler_config.json")
BASE_CONFIG_NEEDS = ("text_encoder/config.json", "tokenizer")


def is_sdxl_state(state: dict) -> bool:
    """An SGM-layout SDXL checkpoint: its U-Net's added embedding, or (no U-Net to tell by)
    SDXL's conditioner. A U-Net without the added embedding is not SDXL's (an SD 2.x trained
    with Stability's SGM code also has a conditioner) and is left to the SD loader."""
    if SDXL_UNET_MARK in state:
        return True
    no_unet = not any(k.startswith(UNET) for k in state)
    return no_unet and any(k.startswith("conditioner.embedders.") for k in state)


def load_sdxl_single_file(path: Path, config: str | None, state: dict) -> LoadedModel:
    refiner = any(k.startswith(REFINER_BIGG) for k in state)
    _check_complete(path, state, REFINER_PARTS if refiner else BASE_PARTS)
    folder = _config_folder(path, config, refiner)
    nets = _networks(folder, refiner)
    _load_weights(path, folder, state, nets, refiner)
    return _assemble(path, folder, nets)


def _check_complete(path: Path, state: dict, parts: dict) -> None:
    counts = {part: sum(k.startswith(pre) for k in state) for part, pre in parts.items()}
    absent = [f"{part} ({parts[part]}*)" for part, n in counts.items() if not n]
    if absent:
        kind = "refiner" if REFINER_BIGG in parts.values() else "base"
        held = ", ".join(f"{part} {n}" for part, n in counts.items() if n) or "none of them"
        raise ModelLoadError(f"{path.name}: an SDXL {kind} checkpoint in the original layout "
                             f"without weights for the {' or the '.join(absent)}; use a "
                             f"complete checkpoint (tensors held: {held})")


def _config_folder(path: Path, config: str | None, refiner: bool) -> Path:
    kind = "refiner" if refiner else "base"
    if not config:
        raise ModelLoadError(f"{path.name} is an original-layout SDXL {kind} checkpoint; offline "
                             f"its configs and tokenizers must come from --config DIR (a "
                             f"diffusers SDXL {kind} folder without weights: model_index.json, "
                             f"*/config.json, scheduler/, tokenizer*/)")
    folder = Path(config)
    if not is_sdxl_folder(folder):
        raise ModelLoadError(f"{path.name} is an SDXL checkpoint but --config {config} is not a "
                             f"diffusers SDXL folder (it has no text_encoder_2/ or tokenizer_2/)")
    has_first = (folder / "text_encoder" / "config.json").is_file()
    if refiner and has_first:
        raise ModelLoadError(f"{path.name} is an SDXL refiner checkpoint (one OpenCLIP encoder) "
                             f"but --config {config} is a base folder (it has text_encoder/)")
    needs = CONFIG_NEEDS + (() if refiner else BASE_CONFIG_NEEDS)
    missing = [n for n in needs if not (folder / n).exists()]
    if missing:
        raise ModelLoadError(f"--config {config}: not a whole SDXL {kind} folder, missing "
                             f"{', '.join(missing)}")
    return folder


def _networks(folder: Path, refiner: bool) -> dict:
    """The networks built from the folder's configs, their parameters not yet allocated
    (accelerate's empty weights: the file's tensors are assigned to them, never copied)."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available

    if is_accelerate_available():
        from accelerate import init_empty_weights
    else:
        init_empty_weights = nullcontext
    try:
        with init_empty_weights():
            nets = {"unet": UNet2DConditionModel.from_config(
                        UNet2DConditionModel.load_config(folder / "unet")),
                    "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                    "text_encoder_2": _clip(transformers.CLIPTextModelWithProjection,
                                            folder / "text_encoder_2")}
            if not refiner:
                nets["text_encoder"] = _clip(transformers.CLIPTextModel, folder / "text_encoder")
        nets["tokenizer_2"] = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer_2")
        if not refiner:
            nets["tokenizer"] = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"--config {folder}: cannot build the model from it "
                             f"({first_line(e, 300)})") from e
    return nets


def _clip(cls, folder: Path):
    return cls(cls.config_class.from_pretrained(folder))


def _converted(state: dict, nets: dict, refiner: bool) -> dict:
    """Each network's state dict in diffusers/transformers names, by diffusers' converters."""
    from diffusers.loaders import single_file_utils as sfu

    out = {"unet": sfu.convert_ldm_unet_checkpoint(state, nets["unet"].config),
           "vae": sfu.convert_ldm_vae_checkpoint(state, nets["vae"].config),
           "text_encoder_2": sfu.convert_open_clip_checkpoint(
               nets["text_encoder_2"], state, prefix=REFINER_BIGG if refiner else BIGG)}
    if not refiner:
        out["text_encoder"] = {k[len(CLIP_L):]: v for k, v in state.items()
                               if k.startswith(CLIP_L)}
    for name in ("text_encoder", "text_encoder_2"):
        if name in out and not hasattr(nets[name], "text_model"):
            # transformers >= 5.6 flattened CLIPTextModel: no text_model. level
            out[name] = {k.removeprefix("text_model."): v for k, v in out[name].items()}
    return out


def _load_weights(path: Path, folder: Path, state: dict, nets: dict, refiner: bool) -> None:
    """Strict: every parameter and persistent buffer from the file, nothing left over;
    FP16/BF16 files are widened to FP32 (what the export traces) one network at a time, the
    narrow tensors freed as each is widened (``state`` is emptied: nothing else needs it)."""
    try:
        converted = _converted(state, nets, refiner)
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path.name}: diffusers could not convert it with --config "
                             f"{folder}'s configs ({first_line(e, 200)}); is it the same "
                             f"model?") from e
    state.clear()  # the file's tensors now live in `converted` and then in the networks only
    for name in list(converted):
        module, weights = nets[name], converted.pop(name)
        own = module.state_dict()
        weights = {k: v for k, v in weights.items() if k in own or not k.endswith("position_ids")}
        if misfit := _misfit(own, weights):
            raise ModelLoadError(f"{path.name}: its {name} weights do not fit --config "
                                 f"{folder}/{name}/config.json ({misfit}); pass the folder of "
                                 f"the same model")
        module.load_state_dict(weights, strict=True, assign=True)
        nets[name] = module.float().eval()


def _misfit(own: dict, weights: dict) -> str:
    """How ``weights`` fail to fit a module whose state dict is ``own`` ("" when they fit)."""
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shaped = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shaped):
        return ""
    first = (missing or unexpected or shaped)[0]
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shaped)} of another "
            f"shape, e.g. {first}")


def _assemble(path: Path, folder: Path, nets: dict) -> LoadedModel:
    unet, vae, te2 = nets["unet"], nets["vae"], nets["text_encoder_2"]
    te1 = nets.get("text_encoder")
    check_unet(unet, text_time=True)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    index = _index(folder)
    second = SecondEncoder(
        te2, tokenizer_facts(nets["tokenizer_2"], te2),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)))
    inpaint = int(unet.config.in_channels) == 2 * int(vae.config.latent_channels) + 1
    tok = (tokenizer_facts(nets["tokenizer"], te1) if te1 is not None
           else _no_first_tokenizer(second.tokenizer))
    model = LoadedModel(
        source=path.name, source_sha256=hash_files([path]),
        family="sdxl" if te1 is not None else "sdxl-refiner", text_encoder=te1, unet=unet,
        vae=vae, use_attention_mask=False, scheduler_config=sched,
        defaults=_defaults(unet, vae, sched), task=INPAINT if inpaint else None,
        second_encoder=second, **tok)
    _check_widths(model)
    return model

