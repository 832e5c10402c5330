"""What export needs to know of a loaded model, whatever it was loaded from: the
:class:`LoadedModel` record and the facts read off the torch networks (family, tokenizer,
padding rule, default settings). Shared by ``load.py`` (folders, the demo) and
``single_file.py`` (checkpoints), which both import it and not each other."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ldm_edge.runtime.errors import LdmEdgeError

# metadata key under which our own single-file format keeps the component configs
CONFIG_KEY = "ldm_edge.configs"


class ModelLoadError(LdmEdgeError):
    exit_code = 2


@dataclass
class LoadedModel:
    source: str
    source_sha256: str
    family: str
    text_encoder: object
    unet: object
    vae: object
    tokenizer_json: str
    tokenizer_max_length: int
    pad_token_id: int
    pad_token: str
    use_attention_mask: bool
    scheduler_config: dict
    defaults: dict = field(default_factory=dict)
    # what the model does (runtime/tasks/); None: text-to-image, as SD1/SD2 always were
    task: str | None = None
    # what latents are divided by before decoding, where the pipeline's differs from the
    # autoencoder's config (LDMSuperResolutionPipeline decodes them as they are: 1.0)
    scaling_factor: float | None = None
    # StableDiffusionUpscalePipeline: noise levels and the low-resolution image's scheduler
    upscaler: dict | None = None

    @property
    def latent_scaling_factor(self) -> float:
        if self.scaling_factor is not None:
            return float(self.scaling_factor)
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def unet_in_channels(self) -> int:
        """The U-Net's input channels: the latent's, plus any concatenated conditioning."""
        return int(self.unet.config.in_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_hidden_size(self) -> int:
        if self.text_encoder is None:  # unconditional: no text encoder
            return 0
        return int(self.text_encoder.config.hidden_size)


def hash_files(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_unet(unet, noise_level_classes: bool = False) -> None:
    """``noise_level_classes``: the SD x4 upscaler's U-Net, class-conditioned on the noise
    level, is taken; other class-conditioned U-Nets are not."""
    cfg = unet.config
    if cfg.get("addition_embed_type"):
        raise ModelLoadError(f"U-Net with addition_embed_type={cfg['addition_embed_type']!r} "
                             f"(SDXL-style) is not supported; SD1.x/SD2.x/LDM U-Nets are")
    if (cfg.get("class_embed_type") or cfg.get("num_class_embeds")) and not noise_level_classes:
        raise ModelLoadError("class-conditioned U-Nets (e.g. upscalers) are not supported")


def tokenizer_facts(tokenizer, text_encoder) -> dict:
    """tokenizer.json text and the padding rule, from a transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json "
                             f"form (needs a fast tokenizer)")
    max_len = int(tokenizer.model_max_length)
    pos = getattr(text_encoder.config, "max_position_embeddings", None)
    if pos and (max_len > pos or max_len <= 0):
        max_len = int(pos)
    if tokenizer.pad_token_id is None:
        raise ModelLoadError("tokenizer has no pad token; cannot pad prompts to a fixed length")
    raw = json.loads(backend.to_str())
    raw["padding"] = None
    raw["truncation"] = None
    return dict(tokenizer_json=json.dumps(raw), tokenizer_max_length=max_len,
                pad_token_id=int(tokenizer.pad_token_id), pad_token=str(tokenizer.pad_token))


def uses_attention_mask(text_encoder) -> bool:
    """CLIP text encoders in SD take no mask; BERT-style ones get one."""
    if text_encoder.config.model_type.startswith("clip"):
        return bool(getattr(text_encoder.config, "use_attention_mask", False))
    return True


def family_of(unet, text_encoder, scheduler_config: dict) -> str:
    if not text_encoder.config.model_type.startswith("clip"):
        return "ldm-bert"
    v = scheduler_config.get("prediction_type") == "v_prediction"
    linear = bool(unet.config.get("use_linear_projection"))
    return "sd2" if (v or linear) else "sd1"


def model_defaults(unet, vae, sched: dict) -> dict:
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(unet.config.sample_size) * f
    v = sched.get("prediction_type") == "v_prediction"
    return {"height": size, "width": size, "guidance_scale": 7.5,
            "num_inference_steps": 50 if not v else 25}
