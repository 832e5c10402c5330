"""Tiny randomly initialised Stable-Diffusion-style pipelines, built offline.

Used by the tests and by ``make demo`` before a trained model exists. Nothing comes
from a hub: the CLIP tokenizer is a byte-level BPE whose vocabulary is written here.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_TEXT_HIDDEN = 32
TINY_MAX_LENGTH = 77

# A handful of merges so that common prompt words become single tokens.
_WORDS = ["a", "red", "blue", "green", "cat", "dog", "circle", "square", "photo", "of",
          "the", "on", "in", "an", "astronaut", "horse", "riding", "painting"]


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode mapping, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP BPE tokenizer with a small vocabulary (bytes + a few whole words)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        # merge left to right: ((w o) r) d</w>
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = TINY_MAX_LENGTH
    return tok


def tiny_pipeline(family: str = "sd1", seed: int = 0, sample_size: int = 16):
    """A StableDiffusionPipeline of ~1 M parameters; family 'sd1' (epsilon) or 'sd2'
    (v_prediction, linear projection, per-block head dims, upcast attention)."""
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    if family not in ("sd1", "sd2"):
        raise ValueError(f"tiny family must be sd1 or sd2, not {family!r}")
    sd2 = family == "sd2"
    tokenizer = tiny_clip_tokenizer(pad_token="!" if sd2 else "<|endoftext|>")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu" if sd2 else "quick_gelu",
        projection_dim=TINY_TEXT_HIDDEN))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN, norm_num_groups=8,
        attention_head_dim=(4, 8, 8) if sd2 else 8,
        use_linear_projection=sd2, upcast_attention=sd2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=sample_size * 8)
    # Random weights give latents/outputs of O(1); perturb the U-Net's zero-initialised
    # output conv so the model output is not identically zero.
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.normal_(0.0, 0.02)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny(path: str | Path, family: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder and return its path."""
    path = Path(path)
    tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path


# -- the LDM paper's own layouts: LDM-BERT text-to-image and unconditional ---------
LDM_FAMILIES = ("ldm-bert", "ldm-uncond", "ldm-sr")
_BERT_WORDS = ["a", "red", "blue", "green", "cat", "dog", "painting", "of", "the", "squirrel",
               "eating", "burger", "photo", "on", "##s", "##ing"]


def tiny_bert_tokenizer():
    """A BERT WordPiece tokenizer (what LDM-BERT uses) with a small vocabulary: the special
    tokens, ASCII characters and a few whole words; 77 tokens, as the LDM pipeline pads."""
    import tempfile

    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab += ["##" + chr(c) for c in range(ord("a"), ord("z") + 1)] + _BERT_WORDS
    vocab = list(dict.fromkeys(vocab))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        tok = BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
    tok.model_max_length = TINY_MAX_LENGTH
    return tok


def tiny_vq(seed: int, latent_channels: int = 3, blocks: int = 4, sample_size: int = 64):
    """A VQModel (VQ-regularised autoencoder) with a codebook spread wide enough that the
    nearest-code look-up picks different codes across a latent of N(0, 1) values."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=latent_channels,
                 num_vq_embeddings=32, norm_num_groups=8, layers_per_block=1,
                 block_out_channels=(16,) + (32,) * (blocks - 1),
                 down_block_types=("DownEncoderBlock2D",) * blocks,
                 up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=sample_size)
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_(0.0, 1.0)
    return vq


def tiny_ldm_pipeline(family: str = "ldm-bert", seed: int = 0, sample_size: int = 16,
                      autoencoder: str = "vq"):
    """'ldm-bert': an LDMTextToImagePipeline (LDMBertModel, BERT tokenizer, VQModel f = 8,
    UNet2DConditionModel, DDIM); 'ldm-uncond': an LDMPipeline (VQModel f = 4, UNet2DModel,
    DDIM), the paper's unconditional layout; 'ldm-sr': an LDMSuperResolutionPipeline (the
    same, the U-Net taking the low-resolution image on 3 more channels: x4). ~1 M parameters
    each. ``autoencoder='kl'``: 'ldm-bert' with an AutoencoderKL under ``vqvae/``, as
    the released LDM-KL-8-G text-to-image model has it."""
    from diffusers import (DDIMScheduler, LDMPipeline, LDMTextToImagePipeline,
                           UNet2DConditionModel, UNet2DModel)
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (LDMBertConfig,
                                                                                LDMBertModel)

    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    if family in ("ldm-uncond", "ldm-sr"):
        from diffusers import LDMSuperResolutionPipeline

        sr = family == "ldm-sr"  # the low-resolution image (3 channels) concatenated
        vqvae = tiny_vq(seed, latent_channels=3, blocks=3, sample_size=sample_size * 4)
        torch.manual_seed(seed + 1)
        unet = UNet2DModel(sample_size=sample_size, in_channels=6 if sr else 3, out_channels=3,
                           layers_per_block=1, block_out_channels=(32, 64, 64),
                           down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                           attention_head_dim=8, norm_num_groups=8)
        _perturb_out(unet)
        cls = LDMSuperResolutionPipeline if sr else LDMPipeline
        return cls(vqvae=vqvae, unet=unet, scheduler=scheduler)
    if family != "ldm-bert":
        raise ValueError(f"tiny LDM family must be one of {LDM_FAMILIES}, not {family!r}")
    tokenizer = tiny_bert_tokenizer()
    torch.manual_seed(seed)
    bert = LDMBertModel(LDMBertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=TINY_MAX_LENGTH, encoder_layers=2,
        encoder_ffn_dim=64, encoder_attention_heads=4, head_dim=8, d_model=TINY_TEXT_HIDDEN,
        dropout=0.0, pad_token_id=tokenizer.pad_token_id))
    if autoencoder == "kl":
        from diffusers import AutoencoderKL

        vqvae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
            block_out_channels=(16, 32, 32, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size * 8)
    else:
        vqvae = tiny_vq(seed, latent_channels=4, blocks=4, sample_size=sample_size * 8)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN, norm_num_groups=8, attention_head_dim=8)
    _perturb_out(unet)
    return LDMTextToImagePipeline(vqvae=vqvae, bert=bert, tokenizer=tokenizer, unet=unet,
                                  scheduler=scheduler)


def _perturb_out(unet) -> None:
    """Random U-Nets zero-initialise conv_out; give it weights so the output is not zero."""
    with torch.no_grad():
        for p in unet.conv_out.parameters():
            p.normal_(0.0, 0.02)


def save_tiny_ldm(path: str | Path, family: str = "ldm-bert", seed: int = 0,
                  autoencoder: str = "vq") -> Path:
    """Write a tiny LDM pipeline (``LDM_FAMILIES``) as a diffusers folder; return its path."""
    path = Path(path)
    tiny_ldm_pipeline(family, seed, autoencoder=autoencoder).save_pretrained(
        path, safe_serialization=True)
    return path


def save_tiny_inpaint(path: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionInpaintPipeline (SD1 parts, U-Net of 4 + 1 + 4 input channels)."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    base = tiny_pipeline("sd1", seed)
    cfg = dict(base.unet.config)
    cfg["in_channels"] = 9
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel.from_config(cfg)
    _perturb_out(unet)
    pipe = StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_upscale(path: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionUpscalePipeline: SD1 text parts, a VAE f = 4 (scaling factor
    0.08333), a U-Net of 4 + 3 input channels class-conditioned on the noise level."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler,
                           StableDiffusionUpscalePipeline, UNet2DConditionModel)

    base = tiny_pipeline("sd1", seed)
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=7, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN, norm_num_groups=8, attention_head_dim=8,
        num_class_embeds=1000)
    _perturb_out(unet)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=128, scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001,
                                        beta_end=0.02, num_train_timesteps=1000),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, num_train_timesteps=1000, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        max_noise_level=350)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# An LCM U-Net's guidance embedding width (LCM-Dreamshaper's is 256; small keeps it tiny).
TINY_TIME_COND_DIM = 32
# std of the tiny LCM U-Net's cond_proj weights (see save_tiny_lcm); at nn.Linear's default
# init pictures at guidance 2 and 8.5 were 50 dB apart, indistinguishable from a run that
# ignores the embedding
LCM_COND_PROJ_STD = 1.0


def save_tiny_lcm(path: str | Path, seed: int = 0) -> Path:
    """A tiny LatentConsistencyModelPipeline: SD1 parts, a U-Net with ``time_cond_proj_dim``
    (the guidance embedding's input, randomly initialised like the rest), the LCM scheduler."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    base = tiny_pipeline("sd1", seed)
    cfg = {k: v for k, v in base.unet.config.items() if k != "_use_default_values"}
    cfg["time_cond_proj_dim"] = TINY_TIME_COND_DIM  # (a key left at its default is re-defaulted)
    torch.manual_seed(seed + 4)
    unet = UNet2DConditionModel.from_config(cfg)
    _perturb_out(unet)
    # the embedding's projection at the time embedding's own scale (its input is sin/cos), so
    # that another guidance scale visibly draws another picture: a test that the input is
    # wired must be able to fail
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0.0, LCM_COND_PROJ_STD)
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, set_alpha_to_one=True, steps_offset=1,
                             original_inference_steps=50, timestep_scaling=10.0)
    pipe = LatentConsistencyModelPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# -- TAESD: diffusers' AutoencoderTiny, a distilled VAE working on the SD VAE's latents ------
TINY_TAESD_CHANNELS = (16, 16, 16, 16)  # four blocks: three 2x upsamplings, f = 8 as SD's VAE
# A random AutoencoderTiny at PyTorch's default conv init decodes every latent to about -1 (a
# black picture: -1.03 +- 0.07 measured), which any decoder would match. He-normal init (a
# ReLU network) keeps the activations O(1); the two output convs are then scaled so the picture
# is about [-1, 1] (std 0.44 measured) and the encoder's latents about unit scale (std 0.5).
TAESD_DECODER_OUT_STD = 0.01
TAESD_ENCODER_OUT_STD = 0.1


def tiny_taesd(seed: int = 0, latent_channels: int = 4):
    """A tiny random AutoencoderTiny (TAESD's architecture, ~70 k parameters, f = 8)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(encoder_block_out_channels=TINY_TAESD_CHANNELS,
                          decoder_block_out_channels=TINY_TAESD_CHANNELS,
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                          latent_channels=latent_channels)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        vae.decoder.layers[-1].weight.normal_(0.0, TAESD_DECODER_OUT_STD)
        vae.decoder.layers[-1].bias.fill_(0.5)  # its [0, 1] picture centred before x * 2 - 1
        vae.encoder.layers[-1].weight.normal_(0.0, TAESD_ENCODER_OUT_STD)
    return vae.eval()


def save_tiny_taesd(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny AutoencoderTiny as a diffusers model folder (config.json + weights)."""
    path = Path(path)
    tiny_taesd(seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_with_taesd(path: str | Path, seed: int = 0) -> Path:
    """The tiny SD1 pipeline with an AutoencoderTiny as its ``vae/`` (TAESD its only VAE)."""
    from diffusers import StableDiffusionPipeline

    base = tiny_pipeline("sd1", seed)
    pipe = StableDiffusionPipeline(
        vae=tiny_taesd(seed), text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        unet=base.unet, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_turbo(path: str | Path, seed: int = 0) -> Path:
    """A tiny SD-Turbo-shaped pipeline: the SD2 parts with SD-Turbo's sampler, Euler on
    ``trailing`` timesteps (its first step starts at t = 999, so one step can draw a picture)."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_pipeline("sd2", seed)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                        timestep_spacing="trailing")
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
