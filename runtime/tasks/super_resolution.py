"""Super-resolution with the LDM paper's upscaler (diffusers' LDMSuperResolutionPipeline): no
prompt; the low-resolution image, in [-1, 1], is joined to latents of its own size before the
scheduler's input scaling, and the VQ-f4 decoder makes an image f times its size. Size rules:
runtime/superres.py."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..inputs import InitImage
from .base import (StartInputs, TaskPlan, TaskStart, image_cond_for, noise_latents,
                   promptless_specs, widen_sample)
from .stand_ins import low_res_side, synthetic_image

NAME = "super-resolution"


class LowResolutionInput(TaskPlan):
    """A task whose output is f times a low-resolution input image (no --height/--width,
    no --strength: the whole schedule runs)."""

    sized_by_image = True
    # (the side multiple asked of the low-resolution image, the one diffusers crops to)
    side_multiples: tuple[int, int] = (32, 32)

    def _multiples(self, bundle) -> tuple[int, int]:
        return self.side_multiples

    def size(self, bundle, height, width, init_image, strength, mask):
        from ..superres import low_res_size

        if mask is not None:
            raise UsageError("--mask is for inpainting models; this bundle's model upscales")
        lw, lh = low_res_size(init_image, height, width, strength, bundle,
                              *self._multiples(bundle))
        return lh * bundle.vae_scale_factor, lw * bundle.vae_scale_factor

    def start_inputs(self, bundle, init_image, mask, strength, latents, h, w) -> StartInputs:
        f = bundle.vae_scale_factor  # the image at its own size (checked by size())
        return StartInputs(InitImage.load(init_image, w // f, h // f))

    def labels(self, schema, prompts):
        h, w = self._stand_in_size(schema)
        return [f"(synthetic low-resolution image {i}, {w}x{h})" for i in range(len(prompts))]

    def _stand_in_size(self, schema) -> tuple[int, int]:
        m = self.side_multiples[0]
        return low_res_side(schema, "height", m), low_res_side(schema, "width", m)

    def _stand_in_image(self, schema, index: int) -> np.ndarray:
        return synthetic_image(index, *self._stand_in_size(schema))


class SuperResolution(LowResolutionInput):
    name = NAME
    takes_prompt = False

    def specs(self, specs, unet_in_channels):
        return promptless_specs(specs, widen_sample(specs["unet"], unet_in_channels))

    def start(self, pipe, sched, timesteps, req, gen) -> TaskStart:
        from ..superres import condition

        lat = noise_latents(pipe, sched, req, gen)
        cond = condition(req.init_image.pixels)
        return TaskStart(lat, image_cond_for(cond, lat.shape[0], req.guided))

    def model_input(self, sched, x, t, start):
        # joined before scaling: the low-resolution image is scaled with the latents
        x = np.concatenate([x, start.image_cond], 1)
        return sched.scale_model_input(x, t).astype(np.float32)

    def stand_in(self, schema, label, index):
        return {"init_image": self._stand_in_image(schema, index)}


PLAN = SuperResolution()
