"""One generation request: the caller's keywords completed with the bundle's defaults and
checked, once (``resolve_request``). The pipeline runs it as it is, and each PNG records it
as it is, with the provenance of the run (``Provenance``).

    bundle = BundleDefaults.from_manifest(manifest.schema)   # manifest = open_bundle(path)
    req = resolve_request(bundle, prompt="a red cat", steps=None, seed=3)   # keywords only
    req.num_inference_steps  # the bundle's default, checked
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np

from . import validate
from .bundle.schema import BundleManifest, DefaultsRecord
from .errors import UsageError
from .inputs import InitImage, frozen, sha256_of
from .tasks import TEXT_TO_IMAGE, plan_of, run_task
from .tasks.refine import check_fractions

# a drawn seed (none given) fits 32 bits, so it is easy to read off a PNG and type back in
DRAWN_SEED_BITS = 32

# what a manifest without "defaults" gets (schema.DefaultsRecord, the one place it is said)
FALLBACK = DefaultsRecord()


def default_scheduler_name(config: dict) -> str:
    """The runtime name of the scheduler the model was saved with (falls back to ddim)."""
    from .schedulers import SCHEDULERS

    cls = config.get("_class_name")
    for name, sched in SCHEDULERS.items():
        if sched.diffusers_class == cls:
            if name.startswith("dpm++2m"):
                return "dpm++2m-karras" if config.get("use_karras_sigmas") else "dpm++2m"
            return name
    return "ddim"


@dataclass(frozen=True)
class BundleDefaults:
    """What resolving a request needs from a bundle: its defaults and its exported limits."""

    height: int = FALLBACK.height
    width: int = FALLBACK.width
    num_inference_steps: int = FALLBACK.num_inference_steps
    guidance_scale: float = FALLBACK.guidance_scale
    scheduler: str = "ddim"
    size_multiple: int = 8
    min_size: int = 8
    max_size: int = 1 << 16
    max_batch: int = 1 << 16
    vae_scale_factor: int = 8
    latent_channels: int = 4
    task: str | None = None  # the bundle's (runtime/tasks/); None: text-to-image
    max_noise_level: int | None = None  # the SD x4 upscaler's
    default_noise_level: int | None = None
    # an LCM-distilled U-Net: guidance is an input (`timestep_cond`), not a CFG batch
    guidance_embedded: bool = False
    # SDXL: the U-Net takes time ids (runtime/added_cond.py); the refiner's end with an
    # aesthetic score; force_zeros: no negative prompt -> zero negative embeddings
    added_conditioning: bool = False
    aesthetics: bool = False
    force_zeros: bool = False

    @classmethod
    def from_manifest(cls, manifest: BundleManifest) -> "BundleDefaults":
        """From a bundle's typed manifest (the one place that reads it for a request)."""
        d, dims = manifest.defaults, manifest.dims
        return cls(height=d.height, width=d.width, num_inference_steps=d.num_inference_steps,
                   guidance_scale=float(d.guidance_scale),
                   scheduler=d.scheduler or default_scheduler_name(manifest.scheduler),
                   size_multiple=manifest.multiple, min_size=manifest.min_size,
                   max_size=dims.max_size, max_batch=dims.max_batch,
                   vae_scale_factor=int(manifest.vae_scale_factor),
                   latent_channels=int(manifest.latent_channels), task=manifest.task,
                   guidance_embedded=_guidance_embedded(manifest),
                   **_noise_levels(manifest.upscaler), **_added_conditioning(manifest))


def _guidance_embedded(manifest: BundleManifest) -> bool:
    unet = manifest.components.get("unet")
    return unet is not None and "timestep_cond" in unet.spec.input_names


def _added_conditioning(manifest: BundleManifest) -> dict:
    rec = manifest.added_conditioning
    if rec is None:
        return {}
    return {"added_conditioning": True, "aesthetics": rec.requires_aesthetics_score,
            "force_zeros": rec.force_zeros_for_empty_prompt}


def _noise_levels(upscaler: dict | None) -> dict:
    if not upscaler:
        return {}
    return {"max_noise_level": int(upscaler.get("max_noise_level", 350)),
            "default_noise_level": int(upscaler.get("default_noise_level", 20))}




@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides the picture, resolved and checked. Build with resolve_request."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # one per prompt
    num_inference_steps: int
    guidance_scale: float  # <= 1: no classifier-free guidance
    scheduler: str
    height: int
    width: int
    num_images_per_prompt: int
    seed: int | None  # None: the noise comes from the caller's generator
    strength: float | None = None  # img2img only
    init_image: InitImage | None = None
    latents: np.ndarray | None = field(default=None, repr=False, compare=False)  # read-only
    task: str = TEXT_TO_IMAGE  # runtime/tasks/
    mask: object | None = None  # inpaint: runtime/inpaint.Mask
    noise_level: int | None = None  # upscale: the low-resolution image's noise level
    guidance_embedded: bool = False  # the U-Net takes the guidance scale (LCM): no CFG batch
    eta: float | None = None  # tcd's stochasticity (None: the scheduler's default)
    # SDXL's micro-conditioning (runtime/added_cond.py): (height, width) pairs in pixels, the
    # crop's (top, left), the refiner's aesthetic scores; None on other bundles
    original_size: tuple | None = None
    crop_top_left: tuple | None = None
    target_size: tuple | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    # SDXL without a negative prompt: the unconditioned half gets zero embeddings
    zero_negative: bool = False
    # SDXL's ensemble of experts (runtime/tasks/refine.py): the base stops at denoising_end
    # (a fraction of the schedule), the refiner continues its latents from denoising_start
    denoising_start: float | None = None
    denoising_end: float | None = None
    # the ControlNets and their images (runtime/control.ControlRequest); None: none
    control: object | None = None

    @property
    def guided(self) -> bool:
        """Classifier-free guidance: the U-Net runs on [negative, positive] each step (not
        for a U-Net that takes the guidance scale as an input)."""
        return self.guidance_scale > 1.0 and not self.guidance_embedded

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def prompt_of(self, index: int) -> tuple[str, str]:
        """(prompt, negative prompt) of image ``index`` (images are grouped by prompt)."""
        k = index // self.num_images_per_prompt
        return self.prompts[k], self.negative_prompts[k]

    def to_dict(self) -> dict:
        """JSON-able, as the PNG records it."""
        return {"prompts": list(self.prompts), "negative_prompts": list(self.negative_prompts),
                "num_inference_steps": self.num_inference_steps,
                "guidance_scale": self.guidance_scale, "scheduler": self.scheduler,
                "height": self.height, "width": self.width,
                "num_images_per_prompt": self.num_images_per_prompt, "seed": self.seed,
                "strength": self.strength,
                "init_image": self.init_image.to_dict() if self.init_image else None,
                "latents_sha256": None if self.latents is None else sha256_of(self.latents),
                "task": self.task, "mask": self.mask.to_dict() if self.mask else None,
                "noise_level": self.noise_level, "guidance_embedded": self.guidance_embedded,
                "eta": self.eta, "denoising_start": self.denoising_start,
                "denoising_end": self.denoising_end, **self._added_dict(),
                "control": self.control.to_dict() if self.control else None}

    def _added_dict(self) -> dict:
        """SDXL's micro-conditioning (None where the bundle takes none)."""
        pair = lambda v: None if v is None else list(v)  # noqa: E731
        return {"original_size": pair(self.original_size),
                "crop_top_left": pair(self.crop_top_left),
                "target_size": pair(self.target_size), "aesthetic_score": self.aesthetic_score,
                "negative_aesthetic_score": self.negative_aesthetic_score,
                "zero_negative": self.zero_negative}


@dataclass(frozen=True)
class Provenance:
    """What ran a request: the U-Net's backend and precision, the model it came from, and
    the VAE tiling when it was on (tile size, overlap, tiles: it changes the picture), and
    the LoRAs applied (name, sha256, scale of each; recorded only when there are some), and
    the VAE that decoded ("full", or "tiny": TAESD)."""

    backend: str
    precision: str
    model: str | None
    model_sha256: str | None
    vae_tiling: dict | None = None
    loras: tuple | None = None  # ({"name", "sha256", "scale"}, ...)
    vae: str = "full"

    def to_dict(self) -> dict:
        out = {"backend": self.backend, "precision": self.precision, "model": self.model,
               "model_sha256": self.model_sha256, "vae": self.vae, "vae_tiling": self.vae_tiling}
        if self.loras:
            out["loras"] = [dict(x) for x in self.loras]
        return out


def resolve_request(bundle: BundleDefaults, *, prompt, negative_prompt=None,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    scheduler: str | None = None, height: int | None = None,
                    width: int | None = None, num_images_per_prompt: int = 1,
                    seed: int | None = None, draw_seed: bool = True,
                    latents: np.ndarray | None = None, init_image=None,
                    strength: float | None = None, task: str | None = None,
                    mask=None, noise_level: int | None = None,
                    eta: float | None = None, original_size=None, crop_top_left=None,
                    target_size=None, aesthetic_score: float | None = None,
                    negative_aesthetic_score: float | None = None,
                    denoising_start: float | None = None,
                    denoising_end: float | None = None) -> GenerationRequest:
    """Fill what is not given from ``bundle`` and check everything (one-line UsageErrors);
    the task's plan (runtime/tasks/) resolves what is its own: size, pictures, noise level.

    ``init_image``: a file path (loaded here, at the resolved size) or uint8 [1, H, W, 3].
    ``seed``: none given and ``draw_seed`` -> one is drawn, so the PNG says how to redo it;
    ``draw_seed=False`` when the caller brings its own noise generator.
    ``original_size`` ... ``negative_aesthetic_score``: SDXL's micro-conditioning
    (runtime/added_cond.py), refused on other bundles. ``denoising_start``/``denoising_end``:
    SDXL's ensemble of experts (runtime/tasks/refine.py)."""
    from .schedulers import scheduler_names

    task = run_task(bundle.task, task)
    plan = plan_of(task)
    if plan.takes_prompt:
        prompts, negs, g = _prompts(prompt, negative_prompt, guidance_scale, bundle)
        if bundle.guidance_embedded and any(negs):
            raise UsageError("this bundle's U-Net is LCM-distilled: guidance is built into it "
                             "(--guidance-scale) and it takes no negative prompt; drop it")
    else:
        prompts, negs, g = _no_prompt(task, bundle.task, prompt, negative_prompt, guidance_scale)
    steps = validate.steps(_given(num_inference_steps, bundle.num_inference_steps))
    name = validate.scheduler(scheduler or bundle.scheduler, scheduler_names())
    if eta is not None:
        from .schedulers import make_scheduler

        make_scheduler(name, {}, eta=eta)  # a scheduler without eta, or one out of range: refused
    n = validate.batch(len(prompts), num_images_per_prompt, bundle.max_batch)
    level = plan.noise_level(noise_level, bundle)
    h, w = plan.size(bundle, height, width, init_image, strength, mask)
    micro = _micro_conditioning(bundle, h, w, negative_prompt, dict(
        original_size=original_size, crop_top_left=crop_top_left, target_size=target_size,
        aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score))
    seed = _seed(seed, draw_seed)
    pics = plan.start_inputs(bundle, init_image, mask, strength, latents, h, w)
    fractions = check_fractions(denoising_start, denoising_end, latents)
    if fractions[0] is not None and pics.init is not None:
        raise UsageError("--denoising-start continues latents; it takes no --init-image")
    if latents is not None:
        f = bundle.vae_scale_factor
        validate.latents(latents, (len(prompts) * n, bundle.latent_channels, h // f, w // f), f)
        latents = frozen(latents)
    return GenerationRequest(prompts, negs, steps, g, name, h, w, n, seed, pics.strength,
                             pics.init, latents, task, pics.mask, level,
                             bundle.guidance_embedded, eta, **micro,
                             denoising_start=fractions[0], denoising_end=fractions[1])


def _micro_conditioning(bundle: BundleDefaults, h: int, w: int, negative_prompt,
                        added: dict) -> dict:
    from .added_cond import resolve

    given = negative_prompt is not None and not (
        not isinstance(negative_prompt, str) and len(negative_prompt) == 0)
    return resolve(bundle, h, w, given, added)


def _prompts(prompt, negative_prompt, guidance_scale, bundle: BundleDefaults):
    if prompt is None:
        raise UsageError("give a prompt with -p/--prompt: this bundle's model is "
                         "text-to-image (an empty prompt is allowed)")
    prompts = validate.prompts(prompt)
    negs = validate.negative_prompts(negative_prompt, len(prompts))
    return prompts, negs, validate.guidance(_given(guidance_scale, bundle.guidance_scale))


def _seed(seed, draw_seed: bool) -> int | None:
    if seed is not None:
        return validate.seed(seed)
    return secrets.randbits(DRAWN_SEED_BITS) if draw_seed else None


def _no_prompt(task: str, bundle_task: str | None, prompt, negative_prompt, guidance_scale):
    """Unconditional sampling: one empty prompt (for the batch count), no guidance."""
    given = prompt if isinstance(prompt, str) else (list(prompt) if prompt is not None else [])
    why = ("this bundle's model is unconditional (it has no text encoder)" if task == bundle_task
           else f"--task {task} samples without one")
    if given:
        raise UsageError(f"--prompt given, but {why}; drop --prompt")
    if negative_prompt is not None:
        raise UsageError(f"--negative-prompt given, but {why}; drop it")
    if guidance_scale is not None and guidance_scale > 1.0:
        raise UsageError(f"--guidance-scale {guidance_scale} needs a prompt, but {why}; drop it")
    return ("",), ("",), 1.0


def _given(value, default):
    return default if value is None else value
