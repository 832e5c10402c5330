"""What every task plan is: the request rules, the start of the sampling loop, the U-Net's
input, the calibration stand-ins and the component interfaces of one task.

The pipeline runs a plan's stages in order and never asks which task it runs:

    plan.timesteps(sched, req)                      -> the part of the schedule to run
    plan.start(pipe, sched, timesteps, req, gen)    -> TaskStart (initial latents, and the
                                                       image channels joined to the U-Net input)
    plan.unet_feeds(req, batch)                     -> U-Net inputs that hold for every step
    plan.model_input(sched, x, t, start)            -> the U-Net's "sample" at step t

The defaults here are text-to-image's; a task overrides what it does differently. ``bundle``
arguments are request.BundleDefaults (what a request needs from the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import validate
from ..bundle.spec import ComponentSpec
from ..errors import UsageError
from ..field import Field
from ..inputs import InitImage

# diffusers' StableDiffusionImg2ImgPipeline default: redraw 80 % of the schedule
DEFAULT_STRENGTH = 0.8


@dataclass(frozen=True)
class StartInputs:
    """The pictures of a request, resolved: the init image, strength and mask."""

    init: InitImage | None = None
    strength: float | None = None
    mask: object | None = None  # runtime/inpaint.Mask


@dataclass
class TaskStart:
    """Where the loop starts: the initial latents, and the conditioning image that the task
    joins to the U-Net's input on the channel axis, if any: one per U-Net sample, the guidance
    batch included (``image_cond_for``), made once, not at every step."""

    latents: np.ndarray
    image_cond: np.ndarray | None = None


def latent_shape(schema, req) -> tuple[int, int, int, int]:
    """[images, C, H/f, W/f] of a request's latents on this bundle."""
    f = int(schema.vae_scale_factor)
    return (req.num_images, int(schema.latent_channels), req.height // f, req.width // f)


def noise_latents(pipe, sched, req, gen) -> np.ndarray:
    """The given latents, or drawn ones, scaled by the scheduler's initial sigma."""
    lat = req.latents
    if lat is None:
        lat = gen.standard_normal(size=latent_shape(pipe.manifest.schema, req), dtype=np.float32)
    return (lat * np.float32(sched.init_noise_sigma)).astype(np.float32)


def noised_image_latents(pipe, sched, timesteps, req, gen) -> np.ndarray:
    """The init image's latents, one per sample, noised to the first timestep to run."""
    shape = latent_shape(pipe.manifest.schema, req)
    init = pipe.encode_image(req.init_image.pixels, gen)
    if shape[0] % init.shape[0]:
        raise UsageError("the number of images must be a multiple of the init images")
    init = np.concatenate([init] * (shape[0] // init.shape[0]), axis=0)
    noise = gen.standard_normal(size=shape, dtype=np.float32)
    t0 = np.repeat(np.asarray(timesteps[:1]), shape[0])
    return sched.add_noise(init, noise, t0).astype(np.float32)


def strength_timesteps(sched, req) -> np.ndarray:
    """The last ``strength`` of the schedule, as diffusers' img2img and inpaint pipelines."""
    sched.set_timesteps(req.num_inference_steps)
    n = req.num_inference_steps
    init_steps = min(int(n * req.strength), n)
    start = max(n - init_steps, 0) * sched.order
    if start >= len(sched.timesteps):
        raise UsageError(f"--strength {req.strength} with {n} steps leaves no step to run; "
                         f"raise --strength or --steps")
    sched.set_begin_index(start)
    return sched.timesteps[start:]


def widen_sample(unet: ComponentSpec, channels: int | None) -> ComponentSpec:
    """The U-Net's interface with ``channels`` input channels (conditioning joined)."""
    sample = unet.inputs[0]
    wide = replace(sample, shape=(sample.shape[0], channels) + tuple(sample.shape[2:]))
    return replace(unet, inputs=(wide,) + tuple(unet.inputs[1:]))


def promptless_specs(specs: dict[str, ComponentSpec], unet: ComponentSpec
                     ) -> dict[str, ComponentSpec]:
    """A model without a prompt: no text encoder, no VAE encoder, and a U-Net without
    ``encoder_hidden_states``."""
    unet = replace(unet, inputs=tuple(t for t in unet.inputs if t.name != "encoder_hidden_states"))
    return {"unet": unet, "vae_decoder": specs["vae_decoder"]}


def image_cond_for(cond: np.ndarray, images: int, guided: bool) -> np.ndarray:
    """``cond`` (one per init image) repeated for ``images`` samples, and doubled for the
    guidance batch: one per U-Net sample, float32."""
    cond = np.repeat(cond, images // cond.shape[0], axis=0).astype(np.float32)
    return np.concatenate([cond, cond]) if guided else cond


def join_after_scaling(sched, x: np.ndarray, t, cond: np.ndarray) -> np.ndarray:
    """The scaled latents with the conditioning channels joined after them: inpainting and the
    SD x4 upscaler."""
    x = sched.scale_model_input(x, t).astype(np.float32)
    return np.concatenate([x, cond], 1)


def refuse_noise_level(value) -> None:
    if value is not None:
        raise UsageError("--noise-level is for the SD x4 upscaler "
                         "(StableDiffusionUpscalePipeline); this bundle's model is not one")


class TaskPlan:
    """A task: text-to-image unless a subclass says otherwise."""

    name = ""
    takes_prompt = True  # False: the bundle has no text encoder and no tokenizer
    also_runs: tuple[str, ...] = ()  # other tasks `--task` may ask of a bundle of this task
    sized_by_image = False  # True: the output size follows the low-resolution input image
    # ldm-run options that are this task's own (runtime/fields.py sends them to a server)
    fields: tuple[Field, ...] = ()

    # -- export: what the components look like -------------------------------------
    def specs(self, specs: dict[str, ComponentSpec],
              unet_in_channels: int | None) -> dict[str, ComponentSpec]:
        return specs

    # -- the request ----------------------------------------------------------------
    def noise_level(self, value, bundle) -> int | None:
        refuse_noise_level(value)
        return None

    def size(self, bundle, height, width, init_image, strength, mask
             ) -> tuple[int, int]:
        """(height, width) of the output, checked."""
        limits = (bundle.size_multiple, bundle.min_size, bundle.max_size)
        h = validate.size("height", bundle.height if height is None else height, *limits)
        w = validate.size("width", bundle.width if width is None else width, *limits)
        return h, w

    def start_inputs(self, bundle, init_image, mask, strength, latents,
                     h: int, w: int) -> StartInputs:
        """Text-to-image (no init image) or, with one, image-to-image."""
        if mask is not None:
            raise UsageError("--mask needs an inpainting model (a 9-channel U-Net, as "
                             "StableDiffusionInpaintPipeline has); this bundle's U-Net is not one")
        if init_image is None:
            if strength is not None:
                validate.strength(strength, has_init_image=False)
            return StartInputs()
        strength = validate.strength(DEFAULT_STRENGTH if strength is None else strength,
                                     has_init_image=True)
        if latents is not None:
            raise UsageError("--latents and --init-image cannot be combined")
        return StartInputs(InitImage.load(init_image, w, h), strength)

    def for_request(self, req) -> "TaskPlan":
        """The plan that runs ``req`` (a task may hand a request on to a variant of itself)."""
        return self

    # -- the run --------------------------------------------------------------------
    def timesteps(self, sched, req) -> np.ndarray:
        sched.set_timesteps(req.num_inference_steps)
        return sched.timesteps

    def start(self, pipe, sched, timesteps, req, gen) -> TaskStart:
        return TaskStart(noise_latents(pipe, sched, req, gen))

    def unet_feeds(self, req, batch: int) -> dict[str, np.ndarray]:
        """U-Net inputs besides sample/timestep/embeddings, the same at every step."""
        return {}

    def model_input(self, sched, x: np.ndarray, t, start: TaskStart) -> np.ndarray:
        """The U-Net's sample from the (guidance-batched) latents ``x`` at step ``t``."""
        return sched.scale_model_input(x, t).astype(np.float32)

    # -- calibration and the quality check: what stands in for a user's request ----
    def labels(self, schema, prompts: list[str]) -> list[str]:
        """What a calibration or quality run records as its "prompts"."""
        return list(prompts)

    def stand_in(self, schema, label: str, index: int) -> dict:
        """The Pipeline keywords of item ``index`` (labelled ``label``) of such a run."""
        return {"prompt": label}
