"""Load diffusers folders in the layouts of the LDM paper's own released models.

* ``LDMTextToImagePipeline``: ``bert/`` (LDMBertModel), ``tokenizer/`` (BERT WordPiece),
  ``unet/`` (UNet2DConditionModel), ``vqvae/`` (VQModel, or AutoencoderKL as in the
  released KL-8 text-to-image model), ``scheduler/``; family ``ldm-bert``.
* ``LDMPipeline``: ``unet/`` (UNet2DModel, no cross-attention), ``vqvae/``, ``scheduler/``;
  unconditional, family ``ldm-uncond``.
* ``LDMSuperResolutionPipeline``: the same parts; the U-Net takes the low-resolution image
  (in [-1, 1]) concatenated to the latents, which the VQ-f4 decoder turns into an image 4x
  the size; its latents are decoded as they are (scaling factor 1); family ``ldm-sr``.

Both pipelines call their text encoder without an attention mask (LDM-BERT attends to the
padding, as the paper's code does), so the text encoder is exported without one.
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm_edge.runtime.errors import first_line
from ldm_edge.runtime.tasks import SUPER_RESOLUTION, TEXT_TO_IMAGE, UNCONDITIONAL

from .model_facts import LoadedModel, ModelLoadError, check_unet, hash_files, tokenizer_facts

LDM_TEXT = "LDMTextToImagePipeline"
LDM_UNCOND = "LDMPipeline"
LDM_SR = "LDMSuperResolutionPipeline"
# what each layout needs, and the family and task it is recorded as
LAYOUTS = {
    LDM_TEXT: (("bert", "tokenizer", "unet", "vqvae", "scheduler"), "ldm-bert", TEXT_TO_IMAGE),
    LDM_UNCOND: (("unet", "vqvae", "scheduler"), "ldm-uncond", UNCONDITIONAL),
    LDM_SR: (("unet", "vqvae", "scheduler"), "ldm-sr", SUPER_RESOLUTION),
}
# LDMTextToImagePipeline pads and truncates prompts to 77 tokens whatever the tokenizer says
LDM_TEXT_MAX_LENGTH = 77
# diffusers' LDM pipelines' own defaults: 50 steps (super-resolution 100); guidance 1.0 (none)
LDM_STEPS, LDM_SR_STEPS, LDM_GUIDANCE = 50, 100, 1.0


def ldm_layout(p: Path) -> str | None:
    """The LDM pipeline class this folder is laid out for, or None."""
    index = p / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError):
            cls = None
        if cls in LAYOUTS:
            return cls
    if (p / "vqvae").is_dir():
        if (p / "bert").is_dir():
            return LDM_TEXT
        cfg = p / "unet" / "config.json"
        sr = cfg.is_file() and json.loads(cfg.read_text()).get("in_channels") == 6
        return LDM_SR if sr else LDM_UNCOND
    return None


def load_ldm_folder(p: Path, layout: str) -> LoadedModel:
    parts, family, task = LAYOUTS[layout]
    missing = [part for part in parts if not (p / part).is_dir()]
    if missing:
        raise ModelLoadError(f"{p.name}: not a complete {layout} folder, missing "
                             f"{', '.join(m + '/' for m in missing)}")
    try:
        vae = _autoencoder(p / "vqvae")
        if layout == LDM_TEXT:
            import transformers
            from diffusers import UNet2DConditionModel
            from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

            unet = UNet2DConditionModel.from_pretrained(p / "unet")
            text_encoder = LDMBertModel.from_pretrained(p / "bert").eval()
            tokenizer = transformers.AutoTokenizer.from_pretrained(p / "tokenizer")
        else:
            from diffusers import UNet2DModel

            unet = UNet2DModel.from_pretrained(p / "unet")
            text_encoder = tokenizer = None
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{p.name}: cannot load ({first_line(e, 300)})")
    check_unet(unet)
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(unet.config.sample_size) * f
    defaults = {"height": size, "width": size, "guidance_scale": LDM_GUIDANCE,
                "num_inference_steps": LDM_SR_STEPS if layout == LDM_SR else LDM_STEPS}
    if tokenizer is not None:
        tok = tokenizer_facts(tokenizer, text_encoder)
        tok["tokenizer_max_length"] = LDM_TEXT_MAX_LENGTH
    else:
        tok = dict(tokenizer_json="", tokenizer_max_length=0, pad_token_id=0, pad_token="")
    files = [q for q in p.rglob("*") if q.is_file() and q.suffix in (".safetensors", ".bin", ".json")]
    return LoadedModel(
        source=p.name, source_sha256=hash_files(files), family=family, text_encoder=text_encoder,
        unet=unet.eval(), vae=vae.eval(), use_attention_mask=False, scheduler_config=sched,
        defaults=defaults, task=task, scaling_factor=1.0 if layout == LDM_SR else None, **tok)


def _autoencoder(folder: Path):
    """VQModel, or AutoencoderKL (the released LDM-KL-8-G text-to-image model keeps its KL
    autoencoder under ``vqvae/``), by the class its config names."""
    from diffusers import AutoencoderKL, VQModel

    cls = json.loads((folder / "config.json").read_text()).get("_class_name", "VQModel")
    if cls == "AutoencoderKL":
        return AutoencoderKL.from_pretrained(folder)
    vq = VQModel.from_pretrained(folder)
    q = vq.quantize
    if getattr(q, "remap", None) is not None or vq.config.get("lookup_from_codebook"):
        raise ModelLoadError(f"{folder.parent.name}: VQModel with index remapping or codebook "
                             f"look-up from indices is not supported")
    return vq


def is_vq(vae) -> bool:
    return hasattr(vae, "quantize") and hasattr(vae.quantize, "embedding")
