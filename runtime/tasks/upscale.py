"""The SD x4 latent upscaler (diffusers' StableDiffusionUpscalePipeline): text-conditioned;
the low-resolution image, noised to ``noise_level`` by the model's low_res_scheduler, is
joined to the latents after the scheduler's input scaling, and the noise level is the
U-Net's class label (its ``noise_level`` input)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..bundle.spec import TensorSpec
from ..errors import UsageError
from ..field import sent
from .base import TaskStart, image_cond_for, join_after_scaling, noise_latents, widen_sample
from .super_resolution import LowResolutionInput

NAME = "upscale"
# the U-Net's class-label input: the low-resolution image's noise level
NOISE_LEVEL = "noise_level"
# the low-resolution sides: multiples of 8, so the x4 output is on the 8-pixel grid
UPSCALE_SIDE_MULTIPLE = 8


class Upscale(LowResolutionInput):
    name = NAME
    side_multiples = (UPSCALE_SIDE_MULTIPLE, UPSCALE_SIDE_MULTIPLE)
    fields = (sent("noise_level", "--noise-level", "noise_level", NOISE_LEVEL, "INT32"),)

    def _multiples(self, bundle):
        # diffusers rounds to the VAE factor; 8 keeps the x4 result on the 8-pixel grid
        return UPSCALE_SIDE_MULTIPLE, bundle.vae_scale_factor

    def specs(self, specs, unet_in_channels):
        unet = widen_sample(specs["unet"], unet_in_channels)
        unet = replace(unet, inputs=tuple(unet.inputs)
                       + (TensorSpec(NOISE_LEVEL, "int64", ("batch",)),))
        # no task of this model encodes images with its VAE
        return {**{k: v for k, v in specs.items() if k != "vae_encoder"}, "unet": unet}

    def noise_level(self, value, bundle):
        value = bundle.default_noise_level if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value <= bundle.max_noise_level:
            raise UsageError(f"--noise-level {value} must be an integer from 0 to "
                             f"{bundle.max_noise_level} (the model's max_noise_level)")
        return int(value)

    def start(self, pipe, sched, timesteps, req, gen) -> TaskStart:
        """The low-resolution image noised to the noise level (drawn first, as diffusers
        does), then the initial latents."""
        from ..schedulers import make_scheduler
        from ..superres import condition

        low = condition(req.init_image.pixels)
        noise = gen.standard_normal(size=low.shape, dtype=np.float32)
        ddpm = make_scheduler("ddpm", pipe.manifest.schema.upscaler["low_res_scheduler"])
        low = ddpm.add_noise(low, noise, np.array([req.noise_level]))
        lat = noise_latents(pipe, sched, req, gen)
        return TaskStart(lat, image_cond_for(low, lat.shape[0], req.guided))

    def unet_feeds(self, req, batch):
        return {NOISE_LEVEL: np.full((batch,), req.noise_level, dtype=np.int64)}

    def model_input(self, sched, x, t, start):
        return join_after_scaling(sched, x, t, start.image_cond)

    def stand_in(self, schema, label, index):
        return {"prompt": label, "init_image": self._stand_in_image(schema, index)}


PLAN = Upscale()
