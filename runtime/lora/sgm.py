"""kohya's SDXL U-Net names -> diffusers' module names.

kohya trains SDXL on the original (SGM / LDM) U-Net, so real SDXL kohya files name U-Net
modules after it, dots as underscores: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``
(diffusers: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``). The block layout
is the one diffusers' ``UNet2DConditionModel`` converts from: input block 0 is ``conv_in``,
then ``layers_per_block`` blocks of [resnet, attention] and one downsampler (``op``) per down
block; the middle block is resnet, attention, resnet; output blocks come ``layers_per_block + 1``
per up block, [resnet, attention, upsampler] (the upsampler second in a block without
attention). ``layers_per_block`` and which up blocks have attention are read from the bundle's
weights map, so the distilled layouts (fewer blocks) map too.
"""

from __future__ import annotations

import re

_BLOCKS = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$")
_MIDDLE = re.compile(r"^middle_block_(\d+)_(.+)$")
_TOP = {"input_blocks_0_0": "conv_in", "out_2": "conv_out",
        "time_embed_0": "time_embedding.linear_1", "time_embed_2": "time_embedding.linear_2",
        "label_emb_0_0": "add_embedding.linear_1", "label_emb_0_2": "add_embedding.linear_2"}
_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
           "skip_connection": "conv_shortcut"}
_MID = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}


def sgm_module(name: str, modules) -> str | None:
    """The diffusers module name, dots as underscores (kohya's flat form), of the SGM-named
    module ``name`` (underscores), given the bundle's U-Net ``modules``; None if it is not one."""
    if name in _TOP:
        return _TOP[name].replace(".", "_")
    m = _MIDDLE.match(name)
    if m:
        place, rest = _MID.get(int(m.group(1))), m.group(2)
    else:
        m = _BLOCKS.match(name)
        per = _layers_per_block(modules)
        if not m or per is None:
            return None
        i, j, rest = int(m.group(2)), int(m.group(3)), m.group(4)
        if m.group(1) == "input_blocks":
            block, k = divmod(i - 1, per + 1)
            if rest == "op":
                return f"down_blocks_{block}_downsamplers_0_conv"
            place = f"down_blocks.{block}.{('resnets', 'attentions')[min(j, 1)]}.{k}"
        else:
            block, k = divmod(i, per + 1)
            attn = any(x.startswith(f"up_blocks.{block}.attentions.") for x in modules)
            if j == 2 or (j == 1 and not attn):
                return f"up_blocks_{block}_upsamplers_0_conv" if rest == "conv" else None
            place = f"up_blocks.{block}.{('resnets', 'attentions')[j]}.{k}"
    if place is None:
        return None
    if ".resnets." in place:
        rest = _RESNET.get(rest)
        if rest is None:
            return None
    return f"{place}.{rest}".replace(".", "_")


def _layers_per_block(modules) -> int | None:
    found = {int(x.split(".")[3]) for x in modules if x.startswith("down_blocks.0.resnets.")}
    return max(found) + 1 if found else None
