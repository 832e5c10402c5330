"""End-to-end quality of a precision variant: the same prompts, seeds and scheduler through
the FP32 and the variant pipelines, compared as 8-bit images, for each scheduler in a list.

Beside the picture's PSNR, two measures that do not depend on what the picture looks like
(on random-weight models DDIM's pictures are near-white noise, where PSNR punishes any
perturbation): the cosine of the variant's U-Net output against FP32's at every step of the
FP32 trajectory (the same inputs for both, so the error of one call, not of the whole run),
and the final latents' relative error.

A variant's error reaches the picture differently under each sampler (a deterministic
first-order DDIM step, PNDM's multistep blend, Euler's sigma steps), so a figure measured
under one does not speak for the others. By default a variant is checked under the model's
own scheduler and ``SUGGESTED_SCHEDULERS`` (what people deploy), or, for a few-step model,
``FEW_STEP_SCHEDULERS``; ``ldm-export int8
--schedulers`` names another list. ``bundle`` may be a folder or a ``Manifest`` not yet written to disk, so a
new variant is measured before it is recorded.
"""

from __future__ import annotations

import numpy as np

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import ComponentCall, Pipeline
from ldm_edge.runtime.request import default_scheduler_name

from .task_inputs import call_inputs, control_stand_in, labels

# what most users run besides the model's own (diffusers' SD pipelines and UIs' defaults):
# ``ldm-export int8`` checks all of them unless told otherwise.
SUGGESTED_SCHEDULERS = ("ddim", "euler", "dpm++2m")
# what a few-step model (LCM-distilled, LCM-LoRA'd, TCD, Turbo) is sampled with instead: its
# error reaches the picture in one to four large steps, which the many-step samplers above
# do not show
FEW_STEP_SCHEDULERS = ("lcm", "tcd", "euler-a")
# a model whose recorded default is at most this many steps is a few-step one (the LCM and
# Turbo pipelines default to 4 and 1; SD1/SD2's to 50 and 25)
FEW_STEPS = 8


def is_few_step(manifest) -> bool:
    """An LCM-distilled U-Net (it takes ``timestep_cond``) or a bundle whose default steps say
    so (``FEW_STEPS``)."""
    from ldm_edge.runtime.request import BundleDefaults

    d = BundleDefaults.from_manifest(manifest.schema)
    return d.guidance_embedded or d.num_inference_steps <= FEW_STEPS


def schedulers_to_check(manifest, extra=None) -> list[str]:
    """The model's own scheduler first, then ``extra`` (default: ``FEW_STEP_SCHEDULERS`` for a
    few-step model, else ``SUGGESTED_SCHEDULERS``), each once."""
    if extra is None:
        extra = FEW_STEP_SCHEDULERS if is_few_step(manifest) else SUGGESTED_SCHEDULERS
    own = default_scheduler_name(manifest.schema.scheduler)
    return list(dict.fromkeys([own, *extra]))


class _UNetRecorder:
    """A call hook keeping every U-Net call's whole inputs and its output (and, in
    ``controlnet_calls``, every ControlNet call's: name, inputs)."""

    def __init__(self):
        self.calls: list[tuple[dict, np.ndarray]] = []
        self.controlnet_calls: list[tuple[str, dict]] = []

    def __call__(self, call: ComponentCall) -> None:
        feeds = {k: np.array(v, copy=True) for k, v in call.feeds.items()}
        if call.name == "unet":
            self.calls.append((feeds, call.output.copy()))
        elif call.name.startswith("controlnet/"):
            self.controlnet_calls.append((call.name, feeds))


# ControlNet calls kept for the residuals' cosine, spread over the runs (each is one FP32 and
# one variant call of a ControlNet: cheap next to the pictures)
MAX_CONTROLNET_CALLS = 12


def _joined(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(o) for o in outputs])


def _fp32_residuals(pipe, calls: list[tuple[str, dict]]) -> list[tuple[str, dict, np.ndarray]]:
    """Up to MAX_CONTROLNET_CALLS of ``calls`` (evenly), each with FP32's residuals joined."""
    if len(calls) > MAX_CONTROLNET_CALLS:
        idx = np.linspace(0, len(calls) - 1, MAX_CONTROLNET_CALLS).round().astype(int)
        calls = [calls[i] for i in idx]
    return [(name, feeds, _joined(pipe.call_outputs(name, feeds))) for name, feeds in calls]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def relative_error(a: np.ndarray, reference: np.ndarray) -> float:
    r = np.ravel(reference).astype(np.float64)
    return float(np.linalg.norm(np.ravel(a).astype(np.float64) - r) / max(np.linalg.norm(r), 1e-300))


class Reference:
    """FP32 images for prompts x schedulers, computed once; ``measure(pipe)`` scores a
    variant's pipeline against them. With ``unet_calls`` (default) the FP32 U-Net calls'
    inputs and outputs are kept too, for the per-step cosine."""

    def __init__(self, bundle, prompts: list[str], steps: int = 10, seed: int = 0,
                 schedulers: list[str] | None = None, unet_calls: bool = True,
                 size: tuple[int, int] | None = None, control: bool = False):
        ref, rec = Pipeline(bundle, precision="fp32", ort_cache=False), _UNetRecorder()
        self.control = control  # every run with a ControlNet active (control_stand_in)
        if unet_calls:
            ref.add_call_hook(rec)
        # a prompt, or what stands for one where the model takes none (task_inputs.py)
        self.schema = ref.manifest.schema
        self.prompts, self.steps, self.seed = labels(self.schema, prompts), steps, seed
        self.height, self.width = size or (None, None)  # None: the bundle's default size
        self.schedulers = list(schedulers or schedulers_to_check(ref.manifest))
        self.images, self.latents, self.calls = {}, {}, {}
        for s in self.schedulers:
            for i, p in enumerate(self.prompts):
                rec.calls = []
                r = self._draw(ref, s, i, p)
                self.images.setdefault(s, []).append(r.images)
                self.latents.setdefault(s, []).append(r.latents)
                if unet_calls:
                    self.calls.setdefault(s, []).append(rec.calls)
        self.controlnet_calls = _fp32_residuals(ref, list(rec.controlnet_calls))
        ref.close()

    def _draw(self, pipe, scheduler, i, prompt):
        size = {"height": self.height, "width": self.width} if self.height else {}
        if self.control:  # one ControlNet after another, each run with one
            hw = (self.height or self.schema.defaults.height,
                  self.width or self.schema.defaults.width)
            size["control"] = control_stand_in(self.schema, i, *hw, every=1)
        return pipe(**call_inputs(self.schema, prompt, i), num_inference_steps=self.steps,
                    seed=self.seed + i, scheduler=scheduler, **size)

    def controlnet_cosine(self, pipe) -> float | None:
        """The lowest cosine of a ControlNet's residuals (all of them, joined) in ``pipe`` vs
        FP32's, on the FP32 trajectories' ControlNet inputs; None when none ran."""
        got = [cosine(_joined(pipe.call_outputs(name, feeds)), ref)
               for name, feeds, ref in self.controlnet_calls]
        return min(got) if got else None

    def _cosines(self, pipe, scheduler) -> list[float]:
        """Per step, the worst over prompts of the variant U-Net's cosine vs FP32's on the
        FP32 trajectory's inputs."""
        per_prompt = [[cosine(pipe.call_component("unet", feeds), out) for feeds, out in calls]
                      for calls in self.calls[scheduler]]
        return [min(step) for step in zip(*per_prompt)]

    def measure(self, pipe, cosines: bool = True) -> dict:
        """Per scheduler the worst and per-prompt PSNR, the final latents' worst relative
        error and (``cosines`` and the calls kept) the U-Net's cosine per step and its
        minimum; ``psnr_db`` the worst PSNR of all."""
        per = {}
        for s in self.schedulers:
            drawn = [self._draw(pipe, s, i, p) for i, p in enumerate(self.prompts)]
            values = [psnr(d.images, r) for d, r in zip(drawn, self.images[s])]
            per[s] = {"psnr_db": min(values), "per_prompt_db": values,
                      "latent_rel_error": max(relative_error(d.latents, r)
                                              for d, r in zip(drawn, self.latents[s]))}
            if cosines and self.calls:
                steps = [round(c, 7) for c in self._cosines(pipe, s)]  # one per U-Net call
                per[s].update(unet_cosine_min=min(steps), unet_cosine_per_step=steps)
        worst = min(per, key=lambda s: per[s]["psnr_db"])
        out = {"psnr_db": per[worst]["psnr_db"], "per_prompt_db": per[worst]["per_prompt_db"],
               "worst_scheduler": worst, "per_scheduler": per, "prompts": self.prompts,
               "steps": self.steps, "seed": self.seed,
               "reference": "fp32 bundle, same seeds and scheduler"}
        if self.height:
            out["size"] = [self.height, self.width]
        if cosines and self.calls:
            out["unet_cosine_min"] = min(v["unet_cosine_min"] for v in per.values())
        return out


def end_to_end_psnr(bundle, precision: str, prompts: list[str], steps: int = 10,
                    seed: int = 0, schedulers: list[str] | None = None,
                    size: tuple[int, int] | None = None) -> dict:
    """``precision`` vs FP32 under each of ``schedulers`` (default: the model's own and
    ``SUGGESTED_SCHEDULERS``)."""
    reference = Reference(bundle, prompts, steps, seed, schedulers, size=size)
    return measure_precision(reference, bundle, precision)


def measure_precision(reference: Reference, bundle, precision: str, components=None) -> dict:
    """``reference.measure`` of ``bundle``'s ``precision`` pipeline (a folder or a Manifest,
    e.g. a trial one naming a graph not yet recorded), closed afterwards. ``components``: the
    pipeline's component provider (default: the bundle's own backends)."""
    var = Pipeline(bundle, precision=precision, components=components, ort_cache=False)
    try:
        return reference.measure(var)
    finally:
        var.close()


def control_quality(bundle, precision: str, prompts: list[str], steps: int = 10, seed: int = 0,
                    size: tuple[int, int] | None = None, components=None) -> dict | None:
    """``precision`` vs FP32 with a ControlNet active (each prompt with the next ControlNet on
    a stand-in control image, task_inputs.control_stand_in), under the model's own scheduler:
    the picture's PSNR, the U-Net's cosine per step and the ControlNets' residuals' cosine on
    the FP32 trajectory. None for a bundle without ControlNets."""
    from ldm_edge.runtime.bundle.opener import open_bundle

    manifest = bundle if hasattr(bundle, "schema") else open_bundle(bundle)
    if not manifest.schema.controlnets:
        return None
    own = schedulers_to_check(manifest, ())
    reference = Reference(manifest, prompts, steps, seed, own, size=size, control=True)
    var = Pipeline(manifest, precision=precision, components=components,
                   ort_cache=False)
    try:
        q = reference.measure(var)
        q["controlnet_cosine_min"] = reference.controlnet_cosine(var)
    finally:
        var.close()
    keep = ("psnr_db", "per_prompt_db", "unet_cosine_min", "controlnet_cosine_min", "prompts",
            "steps", "seed", "size")
    return {"scheduler": own[0], **{k: q[k] for k in keep if k in q},
            "controlnets": [c[0][0] for c in (control_stand_in(manifest.schema, i, 8, 8, 1)
                                             for i in range(len(q["prompts"])))]}
