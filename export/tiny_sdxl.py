"""Tiny randomly initialised SDXL pipelines (base, Turbo, refiner, inpainting), built offline.

The real SDXL's layout at toy widths: two CLIP text encoders (the second with a projection,
padding with ``!``), a U-Net with ``addition_embed_type="text_time"`` (pooled text embeddings
and six time ids, five for the refiner), and a KL autoencoder. Used by the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tiny import TINY_MAX_LENGTH, _perturb_out, tiny_clip_tokenizer

# the two text encoders' widths (SDXL: 768, 1280), 4 heads each: head sizes 8 and 16 (at 12,
# the second's FP16 graph tripped an internal check of TensorRT-RTX's builder, tests/rtx)
TINY_SDXL_HIDDEN = (32, 64)
TINY_SDXL_PROJECTION = 40  # encoder 2's pooled projection (SDXL: 1280)
TINY_TIME_EMBED = 8  # addition_time_embed_dim (SDXL: 256)
SDXL_KINDS = ("base", "turbo", "refiner", "inpaint", "distilled")
# "distilled": SSD-1B's / Segmind-Vega's way of shrinking SDXL, blocks of unequal depth: the
# transformer layers per attention differ within a block and between the down and up paths
# (diffusers' nested transformer_layers_per_block and reverse_transformer_layers_per_block)
_DISTILLED_DEPTHS = dict(layers_per_block=2,
                         transformer_layers_per_block=[[1, 1], [2, 1], [1, 2]],
                         reverse_transformer_layers_per_block=[[2, 1, 1], [1, 2, 1], [1, 1, 1]])
# kinds other than base/turbo: the pipeline class, and the U-Net's input channels
_LAYOUT = {"inpaint": ("StableDiffusionXLInpaintPipeline", 9)}


def _text_encoder(tokenizer, hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
        projection_dim=projection or hidden)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(cfg).eval()


def _unet(cross: int, time_ids: int, in_channels: int, seed: int, distilled: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    depths = (_DISTILLED_DEPTHS if distilled else
              dict(layers_per_block=1, transformer_layers_per_block=(1, 1, 2)))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=in_channels, out_channels=4, **depths,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True, cross_attention_dim=cross, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * TINY_TIME_EMBED + TINY_SDXL_PROJECTION)
    _perturb_out(unet)
    # the added embedding's last layer at a scale where the pooled embeddings and time ids
    # visibly change the picture (a test that they are wired must be able to fail)
    with torch.no_grad():
        unet.add_embedding.linear_2.weight.mul_(4.0)
    return unet.eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128, scaling_factor=0.13025, force_upcast=True).eval()


def _scheduler(kind: str):
    from diffusers import EulerDiscreteScheduler

    # SDXL base's scheduler config; SDXL-Turbo samples on trailing timesteps
    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="trailing" if kind == "turbo" else "leading")


def tiny_sdxl_pipeline(kind: str = "base", seed: int = 0):
    """A diffusers SDXL pipeline of ``kind`` (SDXL_KINDS) with random toy-sized weights."""
    import diffusers

    if kind not in SDXL_KINDS:
        raise ValueError(f"tiny SDXL kind must be one of {SDXL_KINDS}, not {kind!r}")
    tok1, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")
    te2 = _text_encoder(tok2, TINY_SDXL_HIDDEN[1], TINY_SDXL_PROJECTION, seed + 1)
    vae, sched = _vae(seed + 3), _scheduler(kind)
    if kind == "refiner":  # encoder 2 only; time ids end with the aesthetic score
        unet = _unet(TINY_SDXL_HIDDEN[1], 5, 4, seed + 2)
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2,
            unet=unet, scheduler=sched, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
    te1 = _text_encoder(tok1, TINY_SDXL_HIDDEN[0], None, seed)
    cls_name, channels = _LAYOUT.get(kind, ("StableDiffusionXLPipeline", 4))
    unet = _unet(sum(TINY_SDXL_HIDDEN), 6, channels, seed + 2, distilled=kind == "distilled")
    return getattr(diffusers, cls_name)(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
               unet=unet, scheduler=sched)


def save_tiny_sdxl(path: str | Path, kind: str = "base", seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline of ``kind`` as a diffusers folder and return its path."""
    path = Path(path)
    tiny_sdxl_pipeline(kind, seed).save_pretrained(path, safe_serialization=True)
    return path
