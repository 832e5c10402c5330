"""What a bundle's model does, and the component interfaces each task has (issue 14).

A manifest without ``task`` is text-to-image (every SD1/SD2/demo bundle). The LDM paper's
unconditional models (``LDMPipeline``) take no prompt: no text encoder, no tokenizer, and a
U-Net (diffusers' UNet2DModel) without ``encoder_hidden_states``.
Pure python: imported by both halves.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import UsageError
from .spec import ComponentSpec, TensorSpec

# the SD x4 upscaler U-Net's class-label input: the low-resolution image's noise level
NOISE_LEVEL = "noise_level"

TEXT_TO_IMAGE = "text-to-image"
UNCONDITIONAL = "unconditional"
INPAINT = "inpaint"
SUPER_RESOLUTION = "super-resolution"
UPSCALE = "upscale"  # SD x4 latent upscaler: text-conditioned, noise level as a class label
TASKS = (TEXT_TO_IMAGE, UNCONDITIONAL, INPAINT, SUPER_RESOLUTION, UPSCALE)
# tasks whose model takes no prompt: no text encoder and no tokenizer in the bundle
PROMPTLESS = (UNCONDITIONAL, SUPER_RESOLUTION)
# what `--task` may ask of a bundle made for each task: a text-to-image model samples
# unconditionally from the empty prompt without guidance (its unconditional branch)
RUNS = {TEXT_TO_IMAGE: (TEXT_TO_IMAGE, UNCONDITIONAL), UNCONDITIONAL: (UNCONDITIONAL,),
        INPAINT: (INPAINT,), SUPER_RESOLUTION: (SUPER_RESOLUTION,), UPSCALE: (UPSCALE,)}
# the pipeline layout each family comes from, for messages
LAYOUT_OF = {"ldm-bert": "LDMTextToImagePipeline", "ldm-uncond": "LDMPipeline",
             "ldm-sr": "LDMSuperResolutionPipeline"}


def bundle_task(task: str | None) -> str:
    """The task a manifest's ``task`` value names (absent: text-to-image)."""
    return task or TEXT_TO_IMAGE


def takes_prompt(task: str | None) -> bool:
    return bundle_task(task) not in PROMPTLESS


def run_task(bundle: str | None, asked: str | None) -> str:
    """The task to run: ``asked`` (--task) if the bundle can do it, else its own."""
    have = bundle_task(bundle)
    if asked is None:
        return have
    if asked not in TASKS:
        raise UsageError(f"unknown --task {asked!r}; one of: {', '.join(TASKS)}")
    if asked not in RUNS[have]:
        raise UsageError(f"--task {asked}: this bundle's model does {have} only "
                         f"(it can run: {', '.join(RUNS[have])})")
    return asked


def task_specs(specs: dict[str, ComponentSpec], task: str | None,
               unet_in_channels: int | None = None) -> dict[str, ComponentSpec]:
    """The components (from spec.describe) a model of ``task`` has, with their interfaces.
    ``unet_in_channels``: the U-Net's input channels where conditioning is concatenated to
    the latents (inpainting: 4 + 1 + 4)."""
    if bundle_task(task) in (INPAINT, UPSCALE):
        unet = specs["unet"]
        sample = unet.inputs[0]
        wide = replace(sample, shape=(sample.shape[0], unet_in_channels) + tuple(sample.shape[2:]))
        more = ((TensorSpec(NOISE_LEVEL, "int64", ("batch",)),) if bundle_task(task) == UPSCALE
                else ())
        unet = replace(unet, inputs=(wide,) + tuple(unet.inputs[1:]) + more)
        if bundle_task(task) == UPSCALE:  # no task here encodes images with its VAE
            specs = {k: v for k, v in specs.items() if k != "vae_encoder"}
        return {**specs, "unet": unet}
    if bundle_task(task) not in PROMPTLESS:
        return specs
    unet = specs["unet"]
    sample = unet.inputs[0]
    if bundle_task(task) == SUPER_RESOLUTION:  # the low-resolution image on more channels
        sample = replace(sample, shape=(sample.shape[0], unet_in_channels) + tuple(sample.shape[2:]))
    unet = replace(unet, inputs=(sample,) + tuple(t for t in unet.inputs[1:]
                                                  if t.name != "encoder_hidden_states"))
    return {"unet": unet, "vae_decoder": specs["vae_decoder"]}
