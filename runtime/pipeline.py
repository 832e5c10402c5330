"""Text-to-image (and image-to-image) sampling against a bundle, in numpy.

tokenize -> text encoder -> seeded latents -> loop (classifier-free guidance) ->
VAE decoder -> 8-bit images. ``low_memory``: one component's session in memory at a time;
``vae_tiling``: the decoder runs on overlapping tiles (runtime/vae_tiling.py). The order of random draws is the one diffusers'
StableDiffusion(Img2Img)Pipeline uses, so with the same initial latents (and, for
stochastic schedulers, the same noise source) the result is the same picture.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Callable

import numpy as np

from . import validate
from .backends.choose import DRAWN_LATENT, open_backend
from .bundle.control_spec import is_controlnet
from .bundle.manifest import Manifest
from .bundle.opener import open_bundle
from .bundle.spec import TINY_VAE
from .conditioning import conditioning_for
from .control import CONTROL_KEYWORDS, ControlSteps, resolve_control
from .errors import NumericsError, UsageError
from .request import BundleDefaults, GenerationRequest, Provenance, resolve_request
from .schedulers import make_scheduler
from .tasks import plan_of
from .tasks.base import TaskStart, latent_shape
from .tasks.refine import cut_at_end
from .tokenizer import PromptTokenizer
from .vae_tiling import DEFAULT_OVERLAP, VaeTiling, fitting_tile_sizes

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Seconds per stage of one run; None: the stage did not run."""

    text_encoder: float = 0.0
    vae_encoder: float | None = None
    unet: float = 0.0
    vae_decoder: float = 0.0
    lora: float | None = None  # merging LoRA weights in numpy, when sessions opened with some
    controlnet: float | None = None  # the ControlNets' calls, when some ran (runtime/control.py)
    unet_per_step: list[float] = field(default_factory=list)  # each step's U-Net call(s)
    denoise_loop: float = 0.0  # the whole loop: U-Net calls plus the scheduler's numpy
    total: float = 0.0
    steps: int = 0

    def add(self, stage: str, seconds: float) -> None:
        """Add to a stage's seconds (a component's name, or "lora"; the tiny VAE's graphs
        count as the VAE's stages, SDXL's second text encoder as the text encoder's)."""
        stage = stage.removesuffix("_tiny").removesuffix("_2")
        stage = "controlnet" if stage.startswith("controlnet/") else stage  # all ControlNets
        setattr(self, stage, (getattr(self, stage) or 0.0) + seconds)

    @property
    def unet_step_median(self) -> float:
        s = sorted(self.unet_per_step)
        return s[len(s) // 2] if s else float("nan")


@dataclass
class Result:
    images: np.ndarray  # uint8 [n, H, W, 3]
    request: GenerationRequest  # what was asked, resolved
    provenance: Provenance  # what ran it
    timings: Timings = field(default_factory=Timings)
    dropped_tokens: list = field(default_factory=list)
    latents: np.ndarray | None = None  # the final latents, before the VAE decoder

    def metadata(self, index: int) -> dict:
        """What the PNG of image ``index`` records: the request as it is, the provenance,
        and that image's own prompt."""
        prompt, negative = self.request.prompt_of(index)
        return {**self.request.to_dict(), **self.provenance.to_dict(), "index": index,
                "prompt": prompt, "negative_prompt": negative}


@dataclass(frozen=True)
class ComponentCall:
    """One component call, as a call hook sees it: the whole inputs (bound ones included;
    the arrays are the pipeline's own, copy what you keep), the output, the seconds it took."""

    name: str
    feeds: dict
    output: np.ndarray
    seconds: float


# a call hook: sees every component call after it ran; may return an array to use instead of
# the output (a perturbation study) or raise to stop the run
CallHook = Callable[[ComponentCall], "np.ndarray | None"]
# a step hook: hook(steps done, steps in all, the scheduler's latents after that step)
StepHook = Callable[[int, int, np.ndarray], None]
# the VAE a pipeline decodes and encodes with: the model's ("full") or TAESD ("tiny")
VAES = ("full", "tiny")


def pick_vae(manifest: Manifest, vae: str | None, tiling: bool) -> str:
    """``vae`` checked against what the bundle has; not said: the full VAE where the bundle
    has it, else the tiny one (a model whose only VAE is TAESD)."""
    full, tiny = manifest.has("vae_decoder"), manifest.has("vae_decoder_tiny")
    if vae is None:
        vae = "full" if full or not tiny else "tiny"
    if vae not in VAES:
        raise UsageError(f"--vae {vae!r}: use one of {', '.join(VAES)}")
    if vae == "tiny" and not tiny:
        raise UsageError("--vae tiny: this bundle has no tiny VAE; export it with "
                         "`ldm-export onnx SOURCE --tiny-vae DIR` (DIR: a TAESD folder)")
    if vae == "full" and not full:
        raise UsageError("--vae full: this bundle's only VAE is the tiny one (TAESD); "
                         "drop --vae full")
    if vae == "tiny" and tiling:
        raise UsageError("--vae-tiling tiles the full VAE's decoder; the tiny one decodes "
                         "whole: drop --vae-tiling or --vae tiny")
    return vae


class Pipeline:
    """``low_memory``: each component's session is opened when its stage starts and released
    when it ends (reopened on every call), with onnxruntime's memory arena and memory pattern
    off, so the peak is the largest component rather than their sum. ``vae_tiling``: decode
    in overlapping tiles of ``vae_tile_size`` pixels (default: the bundle's default image
    size, which is what diffusers' ``enable_tiling()`` takes from the VAE's sample_size for
    the SD models), blended as diffusers does; ``vae_tile_overlap``: its tile_overlap_factor.

    Both are how this machine computes a request, not part of it (like backend and
    precision): the same request can run with or without them. Tiling changes the picture
    slightly, so the provenance (and the PNG) records it; low memory does not.

    ``loras``: [(file, scale), ...] merged into the U-Net's and text encoder's weights when
    their sessions open (runtime/lora/apply.py); ``set_loras`` switches them.

    ``vae``: "full" (the model's VAE) or "tiny" (TAESD, where the bundle has one: faster,
    rougher); not said, the full one where the bundle has it. Recorded in the provenance.

    The public seam, for code that runs this pipeline's loop its own way:
    ``components(manifest, name, options, lora)`` provides a component's backend instead of
    opening the bundle's (the served pipeline calls its components over Triton this way), and
    ``add_call_hook`` observes every component call (calibration capture, the quality check,
    benchmarks); ``add_step_hook`` sees the latents after every step (--preview).
    ``options`` is read-only; ``open_components`` shows what is open.

    ``one_shot``: this pipeline draws one request and is dropped (``ldm-run`` does): a
    component opened for it is told how often the request calls it (the U-Net and ControlNets
    once a step, the rest once), so a float graph called only a few times opens without
    onnxruntime's weight pre-packing (runtime/backends/prepack.py). Not set, the pipeline may
    serve many requests and every graph is pre-packed. A one-shot pipeline hands a
    ``components`` provider ``options`` with one more key, ``calls`` (that count), which
    ``open_backend`` takes."""

    def __init__(self, bundle, *, backend: str = "auto", precision: str = "fp32",
                 device: str = "auto", threads: int = 0, verify: bool = True,
                 ort_cache: bool | None = None, low_memory: bool = False,
                 vae_tiling: bool = False, vae_tile_size: int | None = None,
                 vae_tile_overlap: float | None = None, loras=None,
                 components: Callable | None = None, vae: str | None = None,
                 one_shot: bool = False):
        if not vae_tiling and (vae_tile_size is not None or vae_tile_overlap is not None):
            raise UsageError("--vae-tile-size needs --vae-tiling (it is the size of the tiles "
                             "the VAE decodes); add --vae-tiling or drop --vae-tile-size")
        self.manifest = bundle if isinstance(bundle, Manifest) else open_bundle(bundle, verify)
        # a model that takes no prompt has no tokenizer (runtime/tasks/)
        self.tokenizer = (PromptTokenizer.from_manifest(self.manifest)
                          if self.manifest.schema.tokenizer is not None else None)
        if ort_cache is None:  # not said: on, unless LDM_EDGE_ORT_CACHE=0
            from .backends.ort_cache import wanted

            ort_cache = wanted()
        options = dict(backend=backend, precision=precision, device=device, threads=threads,
                       ort_cache=ort_cache)
        self.low_memory = bool(low_memory)
        if self.low_memory:  # allocations freed when done, not kept for the next call
            options["memory_arena"] = False
        self.options = MappingProxyType(options)
        self._provide = components or open_bundle_component
        self._hooks: list[CallHook] = []
        self._step_hooks: list[StepHook] = []
        self.vae = pick_vae(self.manifest, vae, vae_tiling)
        self.conditioning = conditioning_for(self.manifest)
        self.vae_tiling = (self._tiling(vae_tile_size, vae_tile_overlap) if vae_tiling
                           else None)
        # other components may fall back to a wider precision; the U-Net must have the one asked
        self.manifest.variant("unet", precision)
        self._backends = {}
        self.one_shot = bool(one_shot)
        self._steps_planned: int | None = None  # one_shot: the request's steps, once known
        self.timings = Timings()
        self._lora_weights, self._loras = None, None
        if loras:
            self.set_loras(loras)

    # -- LoRA ---------------------------------------------------------------------
    @property
    def loras(self):
        """The LoRA set applied now (runtime/lora/apply.py), or None."""
        return self._loras

    def set_loras(self, loras) -> None:
        """Apply ``loras`` [(file, scale), ...] (replacing the previous set; [] for none).
        Checked before anything changes; the components whose weights change are reopened
        with base + the new set's merged weights on their next call; the bundle is not
        opened or checked again (runtime/lora/apply.py)."""
        from .lora.apply import LORA_COMPONENTS, LoraWeights

        if self._lora_weights is None:
            if not loras:
                return
            self._lora_weights = LoraWeights(self.manifest)
        new = self._lora_weights.load(loras)
        old = self._loras
        self._loras = new
        for name in list(self._backends):
            if name in LORA_COMPONENTS and _lora_key(old, name) != _lora_key(new, name):
                self._backends.pop(name).close()

    # -- components ---------------------------------------------------------------
    def backend(self, name: str):
        if name not in self._backends:
            if not self.manifest.has(name):
                raise UsageError(f"this bundle has no {name}; re-export it"
                                 + (" without --skip-vae-encoder" if name == "vae_encoder" else ""))
            options = self.options
            if self._steps_planned is not None:
                options = {**options, "calls": self._planned_calls(name)}
            self._backends[name] = self._provide(self.manifest, name, options,
                                                 self._merged(name))
        return self._backends[name]

    def expect(self, request: GenerationRequest) -> None:
        """A one-shot pipeline: the request it will draw, said before its sessions are opened
        ahead of the call (the call says it itself); ignored otherwise."""
        if self.one_shot:
            self._steps_planned = request.num_inference_steps

    def _planned_calls(self, name: str) -> int:
        """How often a one-shot request calls ``name``: the denoisers once a step (a batch
        split into several calls a step is not counted), the rest once."""
        return self._steps_planned if name == "unet" or is_controlnet(name) else 1

    @property
    def open_components(self):
        """name -> backend of the components open now (read-only)."""
        return MappingProxyType(self._backends)

    def add_call_hook(self, hook: CallHook) -> Callable[[], None]:
        """Call ``hook(ComponentCall)`` after every component call; returns its remover."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def add_step_hook(self, hook: StepHook) -> Callable[[], None]:
        """Call ``hook(done, total, latents)`` after every denoising step, with the
        scheduler's latents (the loop's own array: copy what you keep); returns its remover."""
        self._step_hooks.append(hook)
        return lambda: self._step_hooks.remove(hook)

    def _vae_component(self, kind: str, vae: str | None = None) -> str:
        """"vae_decoder" / "vae_encoder", or the tiny VAE's one for ``vae`` (the pipeline's)."""
        return TINY_VAE[kind] if (vae or self.vae) == "tiny" else kind

    def _merged(self, name: str):
        """The component's merged LoRA weights (timed as "lora"), or None."""
        if self._loras is None:
            return None
        t0 = time.perf_counter()
        merged = self._lora_weights.graph_weights(self._loras, name)
        self.timings.add("lora", time.perf_counter() - t0)
        return merged

    def call_component(self, name: str, feeds: dict) -> np.ndarray:
        """Run component ``name`` on ``feeds`` (plus its bound inputs): its first output,
        timed, checked for NaN/Inf, seen by the call hooks."""
        return self.call_outputs(name, feeds)[0]

    def call_outputs(self, name: str, feeds: dict) -> list[np.ndarray]:
        """Every output of component ``name`` (SDXL's second text encoder has two), in its
        spec's order, as ``call_component``; the call hooks see (and may replace) the first."""
        b = self.backend(name)
        t0 = time.perf_counter()
        result = b.run(feeds)
        outs = [result[n] for n in b.spec.output_names]
        seconds = time.perf_counter() - t0
        self.timings.add(name, seconds)
        if not all(np.isfinite(o).all() for o in outs):
            hint = "" if b.precision == "fp32" else "; try --precision fp32"
            raise NumericsError(f"{name} ({b.precision}) produced NaN/Inf{hint}")
        if self._hooks:
            call = ComponentCall(name, {**b.bound, **feeds}, outs[0], seconds)
            for hook in list(self._hooks):
                replaced = hook(call)
                outs[0] = outs[0] if replaced is None else replaced
        return outs

    def close(self):
        for b in self._backends.values():
            b.close()
        self._backends = {}

    def _release(self, name: str) -> None:
        """Low-memory mode: close ``name``'s session before the next component's opens."""
        if self.low_memory and name in self._backends:
            self._backends.pop(name).close()
            log.debug("low memory: released the %s session", name)

    def _tiling(self, tile_size, overlap) -> VaeTiling:
        m = self.manifest.schema
        f = int(m.vae_scale_factor)
        lo, hi = self._decoder_latent_range()
        if tile_size is None:
            tile_size = min(max(m.defaults.height, m.defaults.width, lo * f), hi * f)
        tile_size = validate.vae_tile_size(tile_size, f, lo * f, hi * f)
        return VaeTiling(tile_size, DEFAULT_OVERLAP if overlap is None else float(overlap),
                         f).check()

    def _decoder_latent_range(self) -> tuple[int, int]:
        """The latent sides the VAE decoder was exported for (both axes must fit)."""
        r = self.manifest.spec("vae_decoder").ranges
        big = 1 << 16
        hs, ws = r.get("latent_height", (1, big)), r.get("latent_width", (1, big))
        return max(int(hs[0]), int(ws[0])), min(int(hs[1]), int(ws[1]))

    def _check_tiles(self, req: GenerationRequest) -> None:
        """Every tile of this request's latent must lie in the decoder's exported range: the
        last tiles of a row can be small (diffusers' arithmetic), too small for the graph."""
        if self.vae_tiling is None:
            return
        t = self.vae_tiling
        _, _, h, w = latent_shape(self.manifest.schema, req)
        if not t.applies(h, w):
            return
        lo, hi = self._decoder_latent_range()
        small = min(t.tile_sides(h) + t.tile_sides(w))
        if small < lo:
            fits = fitting_tile_sizes(h, w, t.overlap, t.scale, lo, hi)
            near = min(fits, key=lambda s: abs(s - t.tile_size)) if fits else None
            raise UsageError(f"--vae-tile-size {t.tile_size} leaves a {small * t.scale}-pixel "
                             f"edge tile at {req.width}x{req.height}, below the VAE decoder's "
                             f"exported minimum {lo * t.scale}; "
                             + (f"try --vae-tile-size {near}" if near else "drop --vae-tiling"))

    # -- stages -------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, list[int]]:
        tokens = self.tokenizer(prompts)
        spec = self.backend("text_encoder").spec  # ids are int64; some graphs take int32
        feeds = {"input_ids": tokens.input_ids.astype(spec.input("input_ids").dtype, copy=False)}
        if "attention_mask" in spec.input_names:
            feeds["attention_mask"] = tokens.attention_mask.astype(
                spec.input("attention_mask").dtype, copy=False)
        return self.call_component("text_encoder", feeds), tokens.dropped

    def decode(self, latents: np.ndarray, vae: str | None = None) -> np.ndarray:
        """Latents -> uint8 [n, H, W, 3], with the pipeline's VAE or ``vae`` ("tiny": TAESD,
        as --preview draws); tiling is the full decoder's only."""
        name = self._vae_component("vae_decoder", vae)
        scale, shift = self.manifest.schema.vae_scaling(name != "vae_decoder")
        z = latents / np.float32(scale)
        if shift:
            z = z + np.float32(shift)
        z = z.astype(np.float32)
        if self.vae_tiling is None or name != "vae_decoder":
            image = self.call_component(name, {"latent": z})
        else:
            image = self.vae_tiling.decode(
                z, lambda t: self.call_component("vae_decoder", {"latent": t}))
        # as diffusers' postprocess: [-1, 1] -> [0, 1], clamp, *255, round
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        return np.round(image.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)

    def encode_image(self, image: np.ndarray, generator) -> np.ndarray:
        """uint8 [1, H, W, 3] -> scaled latents, sampled from the posterior as diffusers does."""
        x = (image.astype(np.float32) / 255.0) * 2.0 - 1.0
        return self.encode_pixels(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), generator)

    def encode_pixels(self, x: np.ndarray, generator) -> np.ndarray:
        """float32 [n, 3, H, W] in [-1, 1] -> scaled latents, sampled from the posterior."""
        image = np.ascontiguousarray(x, dtype=np.float32)
        name = self._vae_component("vae_encoder")
        params = self.call_component(name, {"image": image})
        scale, shift = self.manifest.schema.vae_scaling(name != "vae_encoder")
        if self.backend(name).spec.output_names[0] == DRAWN_LATENT:
            # the graph gives the latent itself: TAESD's encoder (diffusers' retrieve_latents
            # takes it as it is, drawing nothing), older Optimum graphs (drawn by their RNG)
            latents = params
        else:
            c = params.shape[1] // 2
            mean, logvar = params[:, :c], np.clip(params[:, c:], -30.0, 20.0)
            noise = generator.standard_normal(size=mean.shape, dtype=np.float32)
            latents = mean + np.exp(0.5 * logvar) * noise
        if shift:
            latents = latents - np.float32(shift)
        return (np.float32(scale) * latents).astype(np.float32)

    # -- the whole thing ----------------------------------------------------------
    def request(self, **keywords) -> GenerationRequest:
        """Resolve ``resolve_request``'s keywords against this bundle's defaults and limits."""
        control = {k: keywords.pop(k) for k in CONTROL_KEYWORDS if k in keywords}
        req = resolve_request(BundleDefaults.from_manifest(self.manifest.schema), **keywords)
        req = resolve_control(self.manifest, req, **control)  # runtime/control.py
        self._check_tiles(req)
        return req

    def __call__(self, prompt=None, negative_prompt=None, *,
                 request: GenerationRequest | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 scheduler: str | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, generator=None, latents: np.ndarray | None = None,
                 init_image: np.ndarray | str | None = None, strength: float | None = None,
                 task: str | None = None, mask=None, noise_level: int | None = None,
                 eta: float | None = None, progress=None, decode: bool = True,
                 **added) -> Result:
        """Run ``request``, or the one the keywords resolve to. ``generator``: the caller's
        noise source (then no seed); ``progress(done, total)``: called from step 0 on;
        ``added``: SDXL's micro-conditioning (original_size, crop_top_left, target_size,
        aesthetic_score, negative_aesthetic_score: runtime/added_cond.py; denoising_start,
        denoising_end: runtime/tasks/refine.py); ``decode=False``: the latents only (the
        Result's images None), for another model to continue (SDXL's refiner)."""
        if request is None:
            request = self.request(
                prompt=prompt, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                scheduler=scheduler, height=height, width=width,
                num_images_per_prompt=num_images_per_prompt, seed=seed,
                draw_seed=generator is None, latents=latents, init_image=init_image,
                strength=strength, task=task, mask=mask, noise_level=noise_level, eta=eta,
                **added)
        if generator is not None and request.seed is not None:
            raise UsageError("give a seed or a generator, not both")
        return self._run_stages(request, generator or np.random.default_rng(request.seed),
                                progress, decode)

    def _run_stages(self, req: GenerationRequest, gen, progress, decode: bool = True) -> Result:
        """The stages: conditioning -> the task's start -> denoise -> decode. Low memory:
        each stage's sessions are released before the next stage's open."""
        self._check_tiles(req)
        self.expect(req)
        self.timings = Timings()
        t_start = time.perf_counter()
        plan = plan_of(req.task).for_request(req)
        sched = make_scheduler(req.scheduler, self.manifest.schema.scheduler, eta=req.eta)
        cond = self.conditioning.encode(self, req)
        for name in self.conditioning.components:
            self._release(name)
        timesteps = cut_at_end(sched, plan.timesteps(sched, req), req.denoising_end)
        if self._steps_planned is not None:  # one-shot: the steps this run takes (its
            self._steps_planned = len(timesteps)  # plan may start late or end early)
        start = plan.start(self, sched, timesteps, req, gen)
        self._release(self._vae_component("vae_encoder"))
        lat = self._denoise(sched, plan, start, cond.feeds, timesteps, req, gen, progress)
        provenance = self._provenance(lat.shape)
        self._release("unet")
        images = self.decode(lat) if decode else None
        self._release(self._vae_component("vae_decoder"))
        self.timings.total = time.perf_counter() - t_start
        self.timings.steps = len(timesteps)
        # the run's own copy: later calls (a LoRA reopen, a quality check) add to the pipeline's
        return Result(images, req, provenance, replace(self.timings), cond.dropped, lat)

    def _provenance(self, shape: tuple) -> Provenance:
        unet, model = self.backend("unet"), self.manifest.schema.model
        tiling = self.vae_tiling.to_dict(*shape[2:]) if self.vae_tiling else None
        loras = tuple(self._loras.provenance()) if self._loras is not None else None
        return Provenance(backend=unet.name, precision=unet.precision,
                          model=model.source, model_sha256=model.sha256, vae_tiling=tiling,
                          loras=loras, vae=self.vae)

    def _unet_max_batch(self) -> int:
        """Largest batch one U-Net call takes: a fixed engine batch, or the exported range."""
        spec = self.backend("unet").spec
        dim = spec.input("sample").shape[0]
        return dim if isinstance(dim, int) else int(spec.ranges.get("batch", (1, 1 << 30))[1])

    def _unet(self, x, t, t_dtype, steady: dict, chunk: int, extra=None) -> np.ndarray:
        """One batched call when it fits (``steady``, the inputs that hold for every step,
        bound once by the loop), else several calls, each with its slice of ``steady``.
        ``extra``: this step's own inputs besides the sample (ControlNet residuals)."""
        extra = extra or {}
        if chunk >= x.shape[0]:
            return self.call_component("unet", {
                "sample": x, "timestep": np.full((x.shape[0],), t, dtype=t_dtype), **extra})
        outs = []
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            feeds = {"sample": xs, "timestep": np.full((xs.shape[0],), t, dtype=t_dtype),
                     **{k: v[s:s + chunk] for k, v in {**steady, **extra}.items()}}
            outs.append(self.call_component("unet", feeds))
        return np.concatenate(outs)

    def _denoise(self, sched, plan, start: TaskStart, steady: dict, timesteps, req, gen,
                 progress) -> np.ndarray:
        """The loop: the plan makes each step's U-Net input; ``steady`` (the conditioning's
        inputs) and the plan's own hold for every step."""
        unet = self.backend("unet")
        t_dtype = np.dtype(unet.spec.input("timestep").dtype)
        chunk = self._unet_max_batch()
        lat = start.latents
        batch = lat.shape[0] * (2 if req.guided else 1)
        control = ControlSteps(self, req, batch, lat.shape)  # zeros unless a ControlNet acts
        steady = {**steady, **plan.unet_feeds(req, batch), **control.zeros}
        if steady and chunk >= batch:
            unet.bind(steady)
        per_step = []
        t_loop = time.perf_counter()
        if progress is not None:
            progress(0, len(timesteps))  # the run has started: nothing left to refuse
        try:
            for i, t in enumerate(timesteps):
                x = np.concatenate([lat, lat]) if req.guided else lat
                x = plan.model_input(sched, x, t, start)
                # a ControlNet takes the scaled latents alone, not the channels a task plan
                # joins after them (diffusers' control_model_input)
                extra = control.feeds(i, len(timesteps), x[:, :lat.shape[1]], t, steady)
                t0 = time.perf_counter()
                out = self._unet(x, t, t_dtype, steady, chunk, extra)
                per_step.append(time.perf_counter() - t0)
                if req.guided:
                    uncond, text = np.split(out, 2)
                    out = uncond + np.float32(req.guidance_scale) * (text - uncond)
                lat = sched.step(out, t, lat, generator=gen).astype(np.float32)
                for hook in list(self._step_hooks):
                    hook(i + 1, len(timesteps), lat)
                if progress is not None:
                    progress(i + 1, len(timesteps))
        finally:
            unet.unbind()
        self.timings.unet_per_step = per_step
        self.timings.denoise_loop = time.perf_counter() - t_loop
        return lat


def _lora_key(lora_set, component: str) -> str:
    return "" if lora_set is None else lora_set.key(component)


def open_bundle_component(manifest: Manifest, name: str, options, lora):
    """The default component provider: the bundle's graph or engine on the chosen backend."""
    return open_backend(manifest, name, **options, lora=lora)
