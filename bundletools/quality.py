"""End-to-end quality of a precision variant: the same prompts, seeds and scheduler through
the FP32 and the variant pipelines, compared as 8-bit images, for each scheduler in a list.

A variant's error reaches the picture differently under each sampler (a deterministic
first-order DDIM step, PNDM's multistep blend, Euler's sigma steps), so a figure measured
under one does not speak for the others. By default a variant is checked under the model's
own scheduler; ``ldm-export int8 --schedulers`` adds others (``SUGGESTED_SCHEDULERS``: what
people deploy). ``bundle`` may be a folder or a ``Manifest`` not yet written to disk, so a
new variant is measured before it is recorded.
"""

from __future__ import annotations

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline
from ldm_edge.runtime.request import default_scheduler_name

from .task_inputs import call_inputs, labels

# what most users run besides the model's own (diffusers' SD pipelines and UIs' defaults).
# Not the default list: on random-weight test models DDIM's pictures are noise-like and PSNR
# there punishes any perturbation (tiny SD1 INT8: PNDM 46.0 dB, DDIM 26.8 dB, VNNI CPU), so a
# content-independent measure must come first (the 512² issue).
SUGGESTED_SCHEDULERS = ("ddim", "euler", "dpm++2m")


def schedulers_to_check(manifest, extra=()) -> list[str]:
    """The model's own scheduler first, then ``extra``, each once."""
    own = default_scheduler_name(manifest.schema.scheduler)
    return list(dict.fromkeys([own, *extra]))


class Reference:
    """FP32 images for prompts x schedulers, computed once; ``measure(pipe)`` scores a
    variant's pipeline against them."""

    def __init__(self, bundle, prompts: list[str], steps: int = 10, seed: int = 0,
                 schedulers: list[str] | None = None):
        ref = Pipeline(bundle, precision="fp32")
        # a prompt, or what stands for one where the model takes none (task_inputs.py)
        self.schema = ref.manifest.schema
        self.prompts, self.steps, self.seed = labels(self.schema, prompts), steps, seed
        self.schedulers = list(schedulers or schedulers_to_check(ref.manifest))
        self.images = {s: [self._draw(ref, s, i, p) for i, p in enumerate(self.prompts)]
                       for s in self.schedulers}
        ref.close()

    def _draw(self, pipe, scheduler, i, prompt):
        return pipe(**call_inputs(self.schema, prompt, i), num_inference_steps=self.steps,
                    seed=self.seed + i, scheduler=scheduler).images

    def measure(self, pipe) -> dict:
        """Per scheduler the worst and per-prompt PSNR; ``psnr_db`` the worst of all."""
        per = {}
        for s in self.schedulers:
            values = [psnr(self._draw(pipe, s, i, p), r)
                      for i, (p, r) in enumerate(zip(self.prompts, self.images[s]))]
            per[s] = {"psnr_db": min(values), "per_prompt_db": values}
        worst = min(per, key=lambda s: per[s]["psnr_db"])
        return {"psnr_db": per[worst]["psnr_db"], "per_prompt_db": per[worst]["per_prompt_db"],
                "worst_scheduler": worst, "per_scheduler": per, "prompts": self.prompts,
                "steps": self.steps, "seed": self.seed,
                "reference": "fp32 bundle, same seeds and scheduler"}


def end_to_end_psnr(bundle, precision: str, prompts: list[str], steps: int = 10,
                    seed: int = 0, schedulers: list[str] | None = None) -> dict:
    """``precision`` vs FP32 under each of ``schedulers`` (default: the model's own)."""
    reference = Reference(bundle, prompts, steps, seed, schedulers)
    var = Pipeline(bundle, precision=precision)
    try:
        return reference.measure(var)
    finally:
        var.close()
