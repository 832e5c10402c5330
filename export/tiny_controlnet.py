"""A tiny ControlNet for the tiny SD models (export/tiny.py), built offline, whose residuals
are not zero.

diffusers initialises a ControlNet's "zero convolutions" (``controlnet_down_blocks``,
``controlnet_mid_block``) and the conditioning embedding's last conv to zero, as the paper
trains them from: a ControlNet made with ``ControlNetModel.from_unet`` returns all-zero
residuals, and a parity test on it proves nothing. Here they are drawn at random.
"""

from __future__ import annotations

from pathlib import Path

import torch

# std of the randomised zero convs: residuals of about the U-Net's own skip activations
# (O(0.1-1)), so a ControlNet moves the tiny model's picture far (tests/parity/test_controlnet.py
# measures how far) without driving it out of range
ZERO_CONV_STD = 0.2
# the conditioning embedding's last conv: the control image enters at this strength
COND_EMBED_STD = 0.2


def tiny_controlnet(unet, seed: int = 0):
    """A ControlNetModel of ``unet``'s architecture: its encoder copied from the U-Net (as
    ``from_unet`` does), the zero convs and the conditioning embedding's output randomised."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero = list(net.controlnet_down_blocks) + [net.controlnet_mid_block]
        for conv in zero:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * ZERO_CONV_STD)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * ZERO_CONV_STD)
        out = net.controlnet_cond_embedding.conv_out
        out.weight.copy_(torch.randn(out.weight.shape, generator=g) * COND_EMBED_STD)
        out.bias.copy_(torch.randn(out.bias.shape, generator=g) * COND_EMBED_STD)
    return net.eval()


def save_tiny_controlnet(path: str | Path, model_folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny ControlNet for the tiny SD model saved in ``model_folder`` (a diffusers
    folder, export/tiny.py's save_tiny) as a diffusers ControlNetModel folder."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_folder) / "unet")
    path = Path(path)
    tiny_controlnet(unet, seed).save_pretrained(path, safe_serialization=True)
    return path
