"""The torch modules a ControlNet bundle exports (export/controlnet.py): the U-Net taking the
residuals as inputs, and a ControlNet with one scale per residual. Apart from
export/controlnet.py so export/components.py can wrap the U-Net without an import cycle."""

from __future__ import annotations

import numpy as np
import torch

from ldm_edge.runtime.bundle.control_spec import residuals_of
from ldm_edge.runtime.bundle.spec import ComponentSpec


class ResidualUNet(torch.nn.Module):
    """The U-Net taking the ControlNet residuals as inputs, after its own three (an SDXL
    U-Net, ``added``: five, ``text_embeds`` and ``time_ids`` its added conditioning)."""

    def __init__(self, unet, added: bool = False):
        super().__init__()
        self.unet = unet
        self.added = added

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        kw = {}
        if self.added:
            kw["added_cond_kwargs"] = {"text_embeds": rest[0], "time_ids": rest[1]}
            rest = rest[2:]
        return self.unet(sample, timestep, encoder_hidden_states,
                         down_block_additional_residuals=tuple(rest[:-1]),
                         mid_block_additional_residual=rest[-1], return_dict=False, **kw)[0]


class ControlNetGraph(torch.nn.Module):
    """A ControlNet with one scale per residual: diffusers multiplies each residual by
    ``conditioning_scale`` (guess mode: by logspace(-1, 0) times it) inside forward; here the
    scales are an input, so one graph serves both (runtime/control.py computes them)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                conditioning_scale):
        return self.scaled(sample, timestep, encoder_hidden_states, controlnet_cond,
                           conditioning_scale)

    def scaled(self, sample, timestep, encoder_hidden_states, controlnet_cond,
               conditioning_scale, added=None):
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond,
                                    conditioning_scale=1.0, guess_mode=False,
                                    added_cond_kwargs=added, return_dict=False)
        out = [r * conditioning_scale[i] for i, r in enumerate(down)]
        return (*out, mid * conditioning_scale[len(down)])


class AddedControlNetGraph(ControlNetGraph):
    """An SDXL ControlNet (``addition_embed_type`` "text_time"): the U-Net's pooled text
    embeddings and time ids after the text states (control_spec.ADDED_INPUTS)."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids,
                controlnet_cond, conditioning_scale):
        return self.scaled(sample, timestep, encoder_hidden_states, controlnet_cond,
                           conditioning_scale, {"text_embeds": text_embeds,
                                                "time_ids": time_ids})


def residual_feeds(spec: ComponentSpec, batch: int, h: int, w: int, rng) -> dict:
    """Sample residuals for a residual-taking U-Net's export check (export/components.py)."""
    return {r.name: rng.standard_normal(r.shape(batch, h, w), dtype=np.float32)
            for r in residuals_of(spec)}
