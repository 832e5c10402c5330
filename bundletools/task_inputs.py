"""What the FP16/INT8 tools feed a bundle's sampling loop: each task's stand-ins for a user's
request (``TaskPlan.labels`` / ``TaskPlan.stand_in`` in runtime/tasks/).

Calibration and the end-to-end quality check run the bundle's own FP32 pipeline over a list of
prompts. A model that takes no prompt gets something else in their place, named in the labels
that the manifest records as the "prompts": unconditional models nothing (one sample per
label, each its own seed); super-resolution a synthetic low-resolution image per label;
inpainting the prompts with a synthetic image and its centre quarter as the mask; the SD x4
upscaler the prompts with a synthetic low-resolution image.
"""

from __future__ import annotations

from ldm_edge.runtime.tasks import plan_of


def labels(schema, prompts: list[str]) -> list[str]:
    """What is recorded as the "prompts" of a calibration or quality run of this bundle."""
    return plan_of(schema.task).labels(schema, prompts)


def call_inputs(schema, label: str, index: int) -> dict:
    """The Pipeline keywords of item ``index`` (whose label is ``label``) for this bundle."""
    return plan_of(schema.task).stand_in(schema, label, index)


def sized_by_image(schema) -> bool:
    """True where the output size follows the stand-in image (no height/width to pass)."""
    return plan_of(schema.task).sized_by_image
