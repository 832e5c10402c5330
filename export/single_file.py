"""Single-file checkpoints: ``.safetensors`` (preferred) or pickled ``.ckpt``.

Two layouts are read:

* ldm-edge's own: diffusers key names prefixed by the component (``unet.``, ``vae.``,
  ``text_encoder.``) with the component configs and ``tokenizer.json`` as JSON in
  the file's metadata (safetensors) or under ``"ldm_edge.configs"`` (ckpt).
* the original Stable Diffusion / LDM layout (``model.diffusion_model.*``): converted
  by diffusers' single-file loader; offline it needs ``config`` — a diffusers folder
  of the same architecture (weights not needed) — to know the architecture. SDXL base and
  refiner files (``conditioner.embedders.*``): export/sdxl_single_file.py.

Pickles are opened with ``weights_only=True`` only: one that wants to run code is refused.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

from ldm_edge.runtime.errors import first_line

from .model_facts import (CONFIG_KEY, LoadedModel, ModelLoadError, check_unet, family_of,
                          hash_files, model_defaults, tokenizer_facts, uses_attention_mask)

PREFIXES = ("unet.", "vae.", "text_encoder.")


def _read_state(path: Path) -> tuple[dict, dict | None]:
    """(state dict, our configs or None) from either file type."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ModelLoadError(f"{path.name}: not a readable safetensors file ({e})")
        cfg = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
        return state, cfg
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message: a paragraph of advice, then the reason on a line of its own
        lines = [ln.strip() for ln in str(e).split("WeightsUnpickler error:")[-1].splitlines()]
        reasons = [ln for ln in lines if ln and not ln.startswith(("Weights only load failed",
                                                                   "Check the documentation"))]
        detail = (reasons[0] if reasons else "unknown reason")[:120]
        if "global" in detail.lower():
            raise ModelLoadError(f"{path.name}: the pickle wants to run code ({detail}); refused "
                                 f"— convert it to .safetensors where you trust it")
        raise ModelLoadError(f"{path.name}: not a readable checkpoint for a weights-only load "
                             f"({detail}); refused")
    except Exception as e:
        raise ModelLoadError(f"{path.name}: not a readable checkpoint ({e.__class__.__name__})")
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name}: checkpoint holds a {type(obj).__name__}, not a dict")
    cfg = obj.get(CONFIG_KEY)
    state = obj.get("state_dict", obj)
    return state, (json.loads(cfg) if isinstance(cfg, str) else None)


def load_single_file(path: Path, config: str | None = None) -> LoadedModel:
    state, cfg = _read_state(path)
    if cfg is not None:
        return _from_own_layout(path, state, cfg)
    from .sdxl_single_file import is_sdxl_state, load_sdxl_single_file

    if is_sdxl_state(state):  # SDXL base or refiner in Stability's SGM layout
        return load_sdxl_single_file(path, config, state)
    if any(k.startswith("model.diffusion_model.") for k in state):
        return _from_original_layout(path, config, state)
    raise ModelLoadError(f"{path.name}: unknown checkpoint layout (neither ldm-edge's prefixed "
                         f"keys with configs nor the original model.diffusion_model.* keys)")


def _from_own_layout(path: Path, state: dict, cfg: dict) -> LoadedModel:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tokenizers import Tokenizer

    for part in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
        if part not in cfg:
            raise ModelLoadError(f"{path.name}: configs lack {part}")
    parts = {p[:-1]: {k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in PREFIXES}
    unet = UNet2DConditionModel.from_config(cfg["unet"])
    vae = AutoencoderKL.from_config(cfg["vae"])
    te_cfg = dict(cfg["text_encoder"])
    te_cls = getattr(transformers, te_cfg.pop("_class", "CLIPTextModel"))
    text_encoder = te_cls(te_cls.config_class.from_dict(te_cfg))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        missing, unexpected = module.load_state_dict(parts[name], strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ModelLoadError(f"{path.name}: {name} weights do not fit its config "
                                 f"({len(missing)} missing, {len(unexpected)} unexpected)")
    check_unet(unet)
    tok = cfg["tokenizer"]
    Tokenizer.from_str(tok["tokenizer_json"])  # fails early on a broken tokenizer
    sched = cfg["scheduler"]
    return LoadedModel(
        source=path.name, source_sha256=hash_files([path]),
        family=family_of(unet, text_encoder, sched), text_encoder=text_encoder.eval(),
        unet=unet.eval(), vae=vae.eval(), tokenizer_json=tok["tokenizer_json"],
        tokenizer_max_length=int(tok["max_length"]), pad_token_id=int(tok["pad_id"]),
        pad_token=tok["pad_token"], use_attention_mask=uses_attention_mask(text_encoder),
        scheduler_config=sched, defaults=model_defaults(unet, vae, sched))


# the original SD/LDM checkpoint's parts, by key prefix
ORIGINAL_PARTS = {"U-Net": "model.diffusion_model.", "VAE": "first_stage_model.",
                  "text encoder": "cond_stage_model."}


def _what_is_there(state: dict) -> str:
    """Which of the original layout's parts ``state`` holds weights for, and which none."""
    counts = {part: sum(k.startswith(pre) for k in state) for part, pre in ORIGINAL_PARTS.items()}
    absent = [f"{part} ({ORIGINAL_PARTS[part]}*)" for part, n in counts.items() if not n]
    held = ", ".join(f"{part} {n}" for part, n in counts.items() if n)
    if absent:
        return (f"it has no weights for the {' or the '.join(absent)}: use a complete checkpoint "
                f"(it holds tensors for: {held})")
    return (f"it holds tensors for {held}; check that --config is a folder of the same "
            f"model (same sizes)")


def _first_sentence(msg: str) -> str:
    """diffusers' message without its advice (flags such as low_cpu_mem_usage that a CLI
    user cannot pass)."""
    return re.split(r"(?<=[.;!])\s", msg.strip(), maxsplit=1)[0]


def _from_original_layout(path: Path, config: str | None, state: dict) -> LoadedModel:
    from diffusers import StableDiffusionPipeline

    if not config:
        raise ModelLoadError(f"{path.name} is an original-layout SD/LDM checkpoint; offline its "
                             f"architecture must come from --config DIR (a diffusers folder of "
                             f"the same model, weights not needed)")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True,
            safety_checker=None, requires_safety_checker=False)
    except Exception as e:
        raise ModelLoadError(f"{path.name}: diffusers could not convert it "
                             f"({_first_sentence(first_line(e, 300))}); {_what_is_there(state)}")
    check_unet(pipe.unet)
    sched = dict(pipe.scheduler.config)
    return LoadedModel(
        source=path.name, source_sha256=hash_files([path]),
        family=family_of(pipe.unet, pipe.text_encoder, sched),
        text_encoder=pipe.text_encoder.eval(), unet=pipe.unet.eval(), vae=pipe.vae.eval(),
        use_attention_mask=uses_attention_mask(pipe.text_encoder), scheduler_config=sched,
        defaults=model_defaults(pipe.unet, pipe.vae, sched),
        **tokenizer_facts(pipe.tokenizer, pipe.text_encoder))


def save_single_file(model: LoadedModel, path: str | Path) -> Path:
    """Write ``model`` in ldm-edge's single-file layout (.safetensors or .ckpt)."""
    import torch

    path = Path(path)
    state = {}
    for name, module in (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoder)):
        for k, v in module.state_dict().items():
            state[f"{name}.{k}"] = v.detach().contiguous().clone()
    te_cfg = model.text_encoder.config.to_dict()
    te_cfg["_class"] = type(model.text_encoder).__name__
    te_cfg.pop("_name_or_path", None)  # a local path; not part of the architecture
    cfg = {"unet": dict(model.unet.config), "vae": dict(model.vae.config), "text_encoder": te_cfg,
           "scheduler": model.scheduler_config,
           "tokenizer": {"tokenizer_json": model.tokenizer_json,
                         "max_length": model.tokenizer_max_length,
                         "pad_id": model.pad_token_id, "pad_token": model.pad_token}}
    blob = json.dumps(cfg, default=str)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={CONFIG_KEY: blob})
    else:
        torch.save({"state_dict": state, CONFIG_KEY: blob}, str(path))
    return path
