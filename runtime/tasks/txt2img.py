"""Text-to-image (diffusers' StableDiffusionPipeline, LDMTextToImagePipeline): latents drawn
from the seed, denoised under the prompt. Every step of it is the base plan's; with an init
image the request is run by the image-to-image plan (runtime/tasks/img2img.py)."""

from __future__ import annotations

from . import img2img, refine
from .base import TaskPlan

NAME = "text-to-image"


class TextToImage(TaskPlan):
    name = NAME
    # a text-to-image model also samples unconditionally: the empty prompt, no guidance
    also_runs = ("unconditional",)

    def for_request(self, req) -> TaskPlan:
        # with an init image: image-to-image (its start and schedule; the same conditioning);
        # with denoising_start: the refiner's half of SDXL's ensemble of experts
        if req.denoising_start is not None:
            return refine.PLAN
        return img2img.PLAN if req.init_image is not None else self


PLAN = TextToImage()
