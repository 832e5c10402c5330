"""Inpainting with a 9-channel U-Net (diffusers' StableDiffusionInpaintPipeline): the U-Net
takes the noisy latents (4), the mask at latent size (1) and the masked image's latents (4),
joined after the scheduler's input scaling. Mask rules: runtime/inpaint.py."""

from __future__ import annotations

import numpy as np

from .. import validate
from ..errors import UsageError
from ..field import sent
from ..inputs import InitImage
from .base import (StartInputs, TaskPlan, TaskStart, image_cond_for, join_after_scaling,
                   noise_latents, noised_image_latents, strength_timesteps, widen_sample)
from .stand_ins import centre_mask, synthetic_image

NAME = "inpaint"
# diffusers' StableDiffusionInpaintPipeline default: the whole schedule, from pure noise
INPAINT_STRENGTH = 1.0


class Inpaint(TaskPlan):
    name = NAME
    fields = (sent("mask", "--mask", "mask", "mask", "BYTES", file=True),)

    def specs(self, specs, unet_in_channels):
        return {**specs, "unet": widen_sample(specs["unet"], unet_in_channels)}

    def start_inputs(self, bundle, init_image, mask, strength, latents, h, w) -> StartInputs:
        """Strength defaults to 1 as in diffusers; initial latents may be given only then
        (below 1 they come from the image)."""
        from ..inpaint import load_mask

        if init_image is None or mask is None:
            missing = " and ".join(f for f, v in (("--init-image", init_image), ("--mask", mask))
                                   if v is None)
            raise UsageError(f"this bundle's model inpaints: give {missing} (white = repaint)")
        strength = validate.strength(INPAINT_STRENGTH if strength is None else strength,
                                     has_init_image=True)
        if latents is not None and strength < 1.0:
            raise UsageError("--latents with --init-image needs --strength 1 (inpainting)")
        m = load_mask(mask, init_image, w, h)  # size check against the init image first
        return StartInputs(InitImage.load(init_image, w, h), strength, m)

    def timesteps(self, sched, req):
        return strength_timesteps(sched, req)

    def start(self, pipe, sched, timesteps, req, gen) -> TaskStart:
        """Initial latents (pure noise at strength 1, else the image's, noised), then the
        mask and the masked image's latents, drawn in diffusers' order."""
        from ..inpaint import condition

        if req.strength >= 1.0:
            lat = noise_latents(pipe, sched, req, gen)
        else:
            lat = noised_image_latents(pipe, sched, timesteps, req, gen)
        mask, masked = condition(req.init_image.pixels, req.mask.pixels,
                                 int(pipe.manifest.schema.vae_scale_factor))
        extra = np.concatenate([mask, pipe.encode_pixels(masked, gen)], axis=1)
        return TaskStart(lat, image_cond_for(extra, lat.shape[0], req.guided))

    def model_input(self, sched, x, t, start):
        return join_after_scaling(sched, x, t, start.image_cond)

    def stand_in(self, schema, label, index):
        h, w = schema.defaults.height, schema.defaults.width
        return {"prompt": label, "init_image": synthetic_image(index, h, w),
                "mask": centre_mask(h, w)}


PLAN = Inpaint()
