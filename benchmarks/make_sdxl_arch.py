"""Write a diffusers StableDiffusionXLPipeline folder with SDXL base's real architecture and
random weights (2.567 B U-Net parameters; about 14 GB of safetensors), built offline.

    python benchmarks/make_sdxl_arch.py SDXL_DIR

Each component is built, saved and freed before the next, so building never holds more than
the U-Net (about 10.3 GB). The tokenizers are the project's tiny CLIP tokenizer padded to 77:
its ids all lie inside SDXL's 49408-entry vocabulary, which is all random weights need.
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

SDXL_MAX_LENGTH = 77  # CLIP's context: both SDXL tokenizers pad to it
SDXL_VOCAB = 49408  # CLIP's BPE vocabulary, the embedding tables' height
SEED = 0


def _tokenizer(pad_token: str):
    from ldm_edge.export.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer(pad_token=pad_token)
    tok.model_max_length = SDXL_MAX_LENGTH
    return tok


def _text_encoder(tok, second: bool):
    """SDXL's CLIP ViT-L text tower, or (second) OpenCLIP ViT-bigG's with its projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    width, layers, heads, act = (1280, 32, 20, "gelu") if second else (768, 12, 12, "quick_gelu")
    cfg = CLIPTextConfig(
        vocab_size=SDXL_VOCAB, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=SDXL_MAX_LENGTH,
        hidden_act=act, projection_dim=width, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if second else CLIPTextModel)(cfg).eval()


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
        force_upcast=True).eval()


def _save(name: str, build, out: Path) -> None:
    torch.manual_seed(SEED)
    with torch.no_grad():
        module = build()
    n = sum(p.numel() for p in module.parameters())
    module.save_pretrained(out / name, safe_serialization=True)
    print(f"{name}: {n / 1e6:.1f} M parameters", flush=True)
    del module
    gc.collect()


def _model_index(out: Path) -> None:
    import diffusers

    index = {"_class_name": "StableDiffusionXLPipeline",
             "_diffusers_version": diffusers.__version__,
             "force_zeros_for_empty_prompt": True,
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the folder to write (must not exist)")
    out = ap.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=False)
    from ldm_edge.export.tiny_sdxl import _scheduler

    tok1, tok2 = _tokenizer("<|endoftext|>"), _tokenizer("!")
    tok1.save_pretrained(out / "tokenizer")
    tok2.save_pretrained(out / "tokenizer_2")
    _scheduler("base").save_pretrained(out / "scheduler")
    _save("text_encoder", lambda: _text_encoder(tok1, second=False), out)
    _save("text_encoder_2", lambda: _text_encoder(tok2, second=True), out)
    _save("vae", _vae, out)
    _save("unet", _unet, out)
    _model_index(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
