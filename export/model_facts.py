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
class SecondEncoder:
    """SDXL's second text encoder (CLIPTextModelWithProjection: penultimate hidden state and
    pooled projection) with its tokenizer's facts (tokenizer_facts), and the pipeline settings
    of the U-Net's added conditioning (schema.AddedConditioningRecord)."""

    text_encoder: object
    tokenizer: dict
    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def projection_dim(self) -> int:
        return int(self.text_encoder.config.projection_dim)


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
    # TAESD (diffusers' AutoencoderTiny), exported as the *_tiny components: given with
    # `--tiny-vae DIR` (load.attach_tiny_vae), or the folder's own vae/ (then `vae` is it too)
    tiny_vae: object | None = None
    tiny_vae_source: str | None = None
    tiny_vae_sha256: str | None = None
    # SDXL: the second text encoder and the added conditioning (text_embeds, time_ids)
    second_encoder: SecondEncoder | None = None
    # the U-Net takes ControlNet residuals as inputs (`--controlnet`, export/controlnet.py)
    unet_residuals: bool = False

    @property
    def time_ids_dim(self) -> int | None:
        """SDXL: the number of time ids the U-Net's added embedding takes (6, the refiner's 5),
        from its config: time ids x addition_time_embed_dim + the pooled width."""
        if self.second_encoder is None:
            return None
        cfg = self.unet.config
        rest = int(cfg.projection_class_embeddings_input_dim) - self.second_encoder.projection_dim
        return rest // int(cfg.addition_time_embed_dim)

    @property
    def cross_attention_dim(self) -> int:
        """The U-Net's encoder_hidden_states width (SDXL: both encoders' hidden states)."""
        second = self.second_encoder.hidden_size if self.second_encoder else 0
        return self.text_hidden_size + second

    @property
    def has_full_vae(self) -> bool:
        """False when the model's only VAE is a tiny one (its vae/ is an AutoencoderTiny)."""
        return not is_tiny_vae(self.vae)

    @property
    def latent_scaling_factor(self) -> float:
        if self.scaling_factor is not None:
            return float(self.scaling_factor)
        return float(self.vae.config.scaling_factor)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def time_cond_proj_dim(self) -> int | None:
        """An LCM-distilled U-Net's guidance embedding width (its `timestep_cond` input)."""
        return int(self.unet.config.get("time_cond_proj_dim") or 0) or None

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


def is_tiny_vae(vae) -> bool:
    from diffusers import AutoencoderTiny

    return isinstance(vae, AutoencoderTiny)


def tiny_vae_factor(vae) -> int:
    """Pixels per latent cell of an AutoencoderTiny: its decoder upsamples between blocks."""
    cfg = vae.config
    return int(cfg.upsampling_scaling_factor) ** (len(cfg.decoder_block_out_channels) - 1)


def hash_files(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# U-Net config keys (UNet2DConditionModel / UNet2DModel, diffusers 0.42) whose other values
# make forward() want an input the exported graph does not take: key -> (values taken, what it
# would need). diffusers skips such a path silently when the input is not passed (an LCM U-Net
# without `timestep_cond` drew a picture 23.6 dB from its own pipeline), so each is refused by
# name. Wired: `time_cond_proj_dim` (the `timestep_cond` input), and the x4 upscaler's class
# labels (its noise level). Every other key shapes the network only, which the trace records.
UNWIRED_UNET_KEYS = {
    "addition_embed_type": ((None,), "added_cond_kwargs (SDXL's text_embeds and time_ids)"),
    "class_embed_type": ((None,), "class_labels"),
    "num_class_embeds": ((None,), "class_labels"),
    "encoder_hid_dim_type": ((None, "text_proj"), "image_embeds in added_cond_kwargs"),
    "attention_type": (("default", None), "GLIGEN's grounding inputs (cross_attention_kwargs)"),
    "dual_cross_attention": ((False, None), "two concatenated conditionings (Versatile "
                                           "Diffusion)"),
}
NOISE_LEVEL_CLASSES = ("class_embed_type", "num_class_embeds")


# diffusers' LatentConsistencyModelPipeline defaults (an LCM U-Net's bundle records them)
LCM_STEPS = 4
LCM_GUIDANCE = 8.5


def recommend_defaults(steps: int | None = None, guidance_scale: float | None = None,
                       scheduler: str | None = None) -> dict:
    """What the model's makers recommend, for the bundle's defaults (SD-Turbo: 1 step,
    guidance 0; SDXL-Turbo: 1-4 steps, guidance 0), so `ldm-run BUNDLE -p ...` uses them:
    ``LoadedModel.defaults.update()`` takes the result. Each is checked here: a bad value is a
    one-line error before the model is loaded."""
    import math

    from ldm_edge.runtime.schedulers import scheduler_names

    if steps is not None and not 1 <= steps <= 1000:
        raise ModelLoadError(f"--default-steps {steps} must be between 1 and 1000")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and
                                           0 <= guidance_scale <= 100):
        raise ModelLoadError(f"--default-guidance-scale {guidance_scale} must be between 0 "
                             f"and 100 (0 or 1: no classifier-free guidance)")
    if scheduler is not None and scheduler not in scheduler_names():
        raise ModelLoadError(f"--default-scheduler {scheduler!r} is not one of "
                             f"{', '.join(scheduler_names())}")
    given = {"num_inference_steps": steps, "guidance_scale": guidance_scale,
             "scheduler": scheduler}
    return {k: v for k, v in given.items() if v is not None}


def check_unet(unet, noise_level_classes: bool = False, text_time: bool = False) -> None:
    """Refuse, by name, a U-Net config key this exporter does not wire (UNWIRED_UNET_KEYS).
    ``noise_level_classes``: the SD x4 upscaler's U-Net, class-conditioned on the noise
    level, is taken; other class-conditioned U-Nets are not. ``text_time``: an SDXL pipeline
    (two text encoders), whose U-Net's ``addition_embed_type="text_time"`` is wired."""
    cfg = unet.config
    for key, (taken, needs) in UNWIRED_UNET_KEYS.items():
        value = cfg.get(key)
        if value in taken or (noise_level_classes and key in NOISE_LEVEL_CLASSES):
            continue
        if text_time and key == "addition_embed_type" and value == "text_time":
            continue
        what = (" (SDXL's, taken from a pipeline folder with text_encoder_2/)"
                if value == "text_time" else "")
        raise ModelLoadError(f"U-Net with {key}={value!r}{what} needs {needs}, which the "
                             f"exported graph does not take; such U-Nets are not supported "
                             f"(SD1.x/SD2.x/LDM/LCM U-Nets are)")


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
    if unet.config.get("time_cond_proj_dim"):  # LatentConsistencyModelPipeline's own defaults
        return {"height": size, "width": size, "guidance_scale": LCM_GUIDANCE,
                "num_inference_steps": LCM_STEPS}
    return {"height": size, "width": size, "guidance_scale": 7.5,
            "num_inference_steps": 50 if not v else 25}
