"""Image-to-image (diffusers' StableDiffusionImg2ImgPipeline): a text-to-image model started
from the init image's latents, noised to the first of the last ``strength`` of the schedule.
Reached from text-to-image (and unconditional sampling) when the request has an init image;
not a --task of its own."""

from __future__ import annotations

from .base import TaskPlan, TaskStart, noised_image_latents, strength_timesteps

NAME = "img2img"


class ImageToImage(TaskPlan):
    name = NAME

    def timesteps(self, sched, req):
        if req.guidance_embedded and hasattr(sched, "set_timesteps_within"):
            # an LCM-distilled model: LatentConsistencyModelImg2ImgPipeline's schedule, all
            # of --steps inside the first --strength of the distillation schedule
            sched.set_timesteps_within(req.num_inference_steps, req.strength)
            return sched.timesteps
        return strength_timesteps(sched, req)

    def start(self, pipe, sched, timesteps, req, gen) -> TaskStart:
        return TaskStart(noised_image_latents(pipe, sched, timesteps, req, gen))


PLAN = ImageToImage()
