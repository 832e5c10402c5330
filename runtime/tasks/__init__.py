"""The task registry: what a bundle's model does, one plan (module) per task.

A manifest without ``task`` is text-to-image (every SD1/SD2/demo bundle). Each plan owns its
request rules, its start of the loop, its U-Net input, its calibration stand-ins and its
component interfaces (runtime/tasks/base.py says which stage is which). Adding a task is one
module plus one line in ``PLANS``. Pure python: imported by both halves.
"""

from __future__ import annotations

from ..bundle.spec import ComponentSpec
from ..errors import UsageError
from . import img2img, inpaint, refine, super_resolution, txt2img, unconditional, upscale
from .base import TaskPlan

# task name -> plan; the names a manifest's "task" and `--task` take
PLANS: dict[str, TaskPlan] = {p.name: p for p in (
    txt2img.PLAN, unconditional.PLAN, inpaint.PLAN, super_resolution.PLAN, upscale.PLAN)}
TASKS = tuple(PLANS)
# the ldm-run options that are a task's own, in registry order (runtime/fields.py's table)
TASK_FIELDS = tuple(f for plan in PLANS.values() for f in plan.fields)
# plans a request reaches through another task's (image-to-image: text-to-image with an init
# image); not a `--task` value or a manifest's task
VARIANTS: dict[str, TaskPlan] = {img2img.PLAN.name: img2img.PLAN, refine.PLAN.name: refine.PLAN}

TEXT_TO_IMAGE = txt2img.NAME
UNCONDITIONAL = unconditional.NAME
INPAINT = inpaint.NAME
SUPER_RESOLUTION = super_resolution.NAME
UPSCALE = upscale.NAME
NOISE_LEVEL = upscale.NOISE_LEVEL
# the pipeline layout each family comes from, for messages
LAYOUT_OF = {"ldm-bert": "LDMTextToImagePipeline", "ldm-uncond": "LDMPipeline",
             "ldm-sr": "LDMSuperResolutionPipeline"}


def bundle_task(task: str | None) -> str:
    """The task a manifest's ``task`` value names (absent: text-to-image)."""
    return task or TEXT_TO_IMAGE


def plan_of(task: str | None) -> TaskPlan:
    """The plan of a manifest's or a request's task."""
    return PLANS[bundle_task(task)]


def takes_prompt(task: str | None) -> bool:
    return plan_of(task).takes_prompt


def run_task(bundle: str | None, asked: str | None) -> str:
    """The task to run: ``asked`` (--task) if the bundle can do it, else its own."""
    have = bundle_task(bundle)
    if asked is None:
        return have
    if asked not in PLANS:
        raise UsageError(f"unknown --task {asked!r}; one of: {', '.join(TASKS)}")
    runs = (have, *PLANS[have].also_runs)
    if asked not in runs:
        raise UsageError(f"--task {asked}: this bundle's model does {have} only "
                         f"(it can run: {', '.join(runs)})")
    return asked


def task_specs(specs: dict[str, ComponentSpec], task: str | None,
               unet_in_channels: int | None = None) -> dict[str, ComponentSpec]:
    """The components (from spec.describe) a model of ``task`` has, with their interfaces.
    ``unet_in_channels``: the U-Net's input channels where conditioning is joined to the
    latents (inpainting: 4 + 1 + 4)."""
    return plan_of(task).specs(specs, unet_in_channels)
