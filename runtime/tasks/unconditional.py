"""Unconditional sampling (diffusers' LDMPipeline; and a text-to-image model asked for
``--task unconditional``): no prompt. A bundle of such a model has no text encoder and no
tokenizer, and its U-Net (UNet2DModel) no ``encoder_hidden_states``."""

from __future__ import annotations

from . import img2img
from .base import TaskPlan, promptless_specs

NAME = "unconditional"


class Unconditional(TaskPlan):
    name = NAME
    takes_prompt = False

    def for_request(self, req) -> TaskPlan:
        # with an init image: image-to-image (its start and schedule; the same conditioning)
        return img2img.PLAN if req.init_image is not None else self

    def specs(self, specs, unet_in_channels):
        return promptless_specs(specs, specs["unet"])

    def labels(self, schema, prompts):
        return [f"(unconditional sample {i})" for i in range(len(prompts))]

    def stand_in(self, schema, label, index):
        return {}


PLAN = Unconditional()
