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
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import validate
from .backends import DRAWN_LATENT, open_backend
from .bundle import open_bundle
from .errors import NumericsError, UsageError
from .manifest import Manifest
from .request import BundleDefaults, GenerationRequest, Provenance, resolve_request
from .schedulers import make_scheduler
from .tasks import INPAINT, SUPER_RESOLUTION, UPSCALE
from .tokenizer import PromptTokenizer
from .vae_tiling import DEFAULT_OVERLAP, VaeTiling, fitting_tile_sizes

log = logging.getLogger(__name__)


@dataclass
class Result:
    images: np.ndarray  # uint8 [n, H, W, 3]
    request: GenerationRequest  # what was asked, resolved
    provenance: Provenance  # what ran it
    timings: dict = field(default_factory=dict)  # seconds per stage, and per-step list
    dropped_tokens: list = field(default_factory=list)
    latents: np.ndarray | None = None  # the final latents, before the VAE decoder

    def metadata(self, index: int) -> dict:
        """What the PNG of image ``index`` records: the request as it is, the provenance,
        and that image's own prompt."""
        prompt, negative = self.request.prompt_of(index)
        return {**self.request.to_dict(), **self.provenance.to_dict(), "index": index,
                "prompt": prompt, "negative_prompt": negative}


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
    their sessions open (runtime/lora_apply.py); ``set_loras`` switches them."""

    def __init__(self, bundle, *, backend: str = "auto", precision: str = "fp32",
                 device: str = "auto", threads: int = 0, verify: bool = True,
                 ort_cache: bool | None = None, low_memory: bool = False,
                 vae_tiling: bool = False, vae_tile_size: int | None = None,
                 vae_tile_overlap: float | None = None, loras=None):
        if not vae_tiling and (vae_tile_size is not None or vae_tile_overlap is not None):
            raise UsageError("--vae-tile-size needs --vae-tiling (it is the size of the tiles "
                             "the VAE decodes); add --vae-tiling or drop --vae-tile-size")
        self.manifest = bundle if isinstance(bundle, Manifest) else open_bundle(bundle, verify)
        # a model that takes no prompt has no tokenizer (runtime/tasks.py)
        self.tokenizer = (PromptTokenizer.from_manifest(self.manifest)
                          if self.manifest.schema.tokenizer is not None else None)
        if ort_cache is None:  # not said: the environment decides (LDM_EDGE_ORT_CACHE=1)
            from .ort_cache import enabled_by_env

            ort_cache = enabled_by_env()
        self.options = dict(backend=backend, precision=precision, device=device, threads=threads,
                            ort_cache=ort_cache)
        self.low_memory = bool(low_memory)
        if self.low_memory:  # allocations freed when done, not kept for the next call
            self.options["memory_arena"] = False
        self.vae_tiling = (self._tiling(vae_tile_size, vae_tile_overlap) if vae_tiling
                           else None)
        # other components may fall back to a wider precision; the U-Net must have the one asked
        self.manifest.variant("unet", precision)
        self._backends = {}
        self.timings = defaultdict(float)
        self._lora_weights, self._loras = None, None
        if loras:
            self.set_loras(loras)

    # -- LoRA ---------------------------------------------------------------------
    def set_loras(self, loras) -> None:
        """Apply ``loras`` [(file, scale), ...] (replacing the previous set; [] for none).
        Checked before anything changes; the components whose weights change are reopened
        with base + the new set's merged weights on their next call; the bundle is not
        opened or checked again (runtime/lora_apply.py)."""
        from .lora_apply import LoraWeights

        if self._lora_weights is None:
            if not loras:
                return
            self._lora_weights = LoraWeights(self.manifest)
        new = self._lora_weights.load(loras)
        old = self._loras
        self._loras = new
        for name in list(self._backends):
            if name in ("unet", "text_encoder") and _lora_key(old, name) != _lora_key(new, name):
                self._backends.pop(name).close()

    # -- components ---------------------------------------------------------------
    def backend(self, name: str):
        if name not in self._backends:
            if not self.manifest.has(name):
                raise UsageError(f"this bundle has no {name}; re-export it"
                                 + (" without --skip-vae-encoder" if name == "vae_encoder" else ""))
            self._backends[name] = open_backend(self.manifest, name, **self.options,
                                                lora=self._merged(name))
        return self._backends[name]

    def _merged(self, name: str):
        """The component's merged LoRA weights (timed as "lora"), or None."""
        if self._loras is None:
            return None
        t0 = time.perf_counter()
        merged = self._lora_weights.graph_weights(self._loras, name)
        self.timings["lora"] += time.perf_counter() - t0
        return merged

    def _call(self, name: str, feeds: dict) -> np.ndarray:
        b = self.backend(name)
        t0 = time.perf_counter()
        out = b.run(feeds)[b.spec.output_names[0]]
        self.timings[name] += time.perf_counter() - t0
        if not np.isfinite(out).all():
            hint = "" if b.precision == "fp32" else "; try --precision fp32"
            raise NumericsError(f"{name} ({b.precision}) produced NaN/Inf{hint}")
        return out

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
            tile_size = min(max(int(m.defaults.get("height", 0)), int(m.defaults.get("width", 0)),
                                lo * f), hi * f)
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
        _, _, h, w = self._latent_shape(req)
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
        return self._call("text_encoder", feeds), tokens.dropped

    def decode(self, latents: np.ndarray) -> np.ndarray:
        m = self.manifest.schema
        z = latents / np.float32(m.scaling_factor)
        if m.shift_factor:
            z = z + np.float32(m.shift_factor)
        z = z.astype(np.float32)
        if self.vae_tiling is None:
            image = self._call("vae_decoder", {"latent": z})
        else:
            image = self.vae_tiling.decode(z, lambda t: self._call("vae_decoder", {"latent": t}))
        # as diffusers' postprocess: [-1, 1] -> [0, 1], clamp, *255, round
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        return np.round(image.transpose(0, 2, 3, 1) * 255.0).astype(np.uint8)

    def encode_image(self, image: np.ndarray, generator) -> np.ndarray:
        """uint8 [1, H, W, 3] -> scaled latents, sampled from the posterior as diffusers does."""
        x = (image.astype(np.float32) / 255.0) * 2.0 - 1.0
        return self.encode_pixels(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), generator)

    def encode_pixels(self, x: np.ndarray, generator) -> np.ndarray:
        """float32 [n, 3, H, W] in [-1, 1] -> scaled latents, sampled from the posterior."""
        params = self._call("vae_encoder", {"image": np.ascontiguousarray(x, dtype=np.float32)})
        m = self.manifest.schema
        if self.backend("vae_encoder").spec.output_names[0] == DRAWN_LATENT:
            # older Optimum / diffusers' script: the graph drew the latent itself (its own RNG)
            latents = params
        else:
            c = params.shape[1] // 2
            mean, logvar = params[:, :c], np.clip(params[:, c:], -30.0, 20.0)
            noise = generator.standard_normal(size=mean.shape, dtype=np.float32)
            latents = mean + np.exp(0.5 * logvar) * noise
        if m.shift_factor:
            latents = latents - np.float32(m.shift_factor)
        return (np.float32(m.scaling_factor) * latents).astype(np.float32)

    # -- the whole thing ----------------------------------------------------------
    def request(self, **keywords) -> GenerationRequest:
        """Resolve ``resolve_request``'s keywords against this bundle's defaults and limits."""
        req = resolve_request(BundleDefaults.from_manifest(self.manifest.schema), **keywords)
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
                 progress=None) -> Result:
        """Run ``request``, or the one the keywords resolve to. ``generator``: the caller's
        noise source (then no seed); ``progress(done, total)``: called from step 0 on."""
        if request is None:
            request = self.request(
                prompt=prompt, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                scheduler=scheduler, height=height, width=width,
                num_images_per_prompt=num_images_per_prompt, seed=seed,
                draw_seed=generator is None, latents=latents, init_image=init_image,
                strength=strength, task=task, mask=mask, noise_level=noise_level)
        if generator is not None and request.seed is not None:
            raise UsageError("give a seed or a generator, not both")
        return self._run(request, generator or np.random.default_rng(request.seed), progress)

    def _run(self, req: GenerationRequest, gen, progress) -> Result:
        self._check_tiles(req)
        self.timings = defaultdict(float)
        t_start = time.perf_counter()
        sched = make_scheduler(req.scheduler, self.manifest.schema.scheduler)
        # low memory: each stage's session is released before the next one's opens
        embeds, dropped = (self._embeddings(req) if self.manifest.has("text_encoder")
                           else (None, [0] * req.num_images))  # unconditional model
        self._release("text_encoder")
        timesteps = self._timesteps(sched, req)
        extra = None  # channels concatenated to the U-Net's input (inpainting)
        if req.mask is not None:
            lat, extra = self._inpaint_latents(sched, timesteps, req, gen)
            self._release("vae_encoder")
        elif req.task == UPSCALE:  # the low-resolution image, noised, concatenated
            lat, extra = self._upscale_latents(sched, req, gen)
        elif req.task == SUPER_RESOLUTION:  # the low-resolution image, concatenated
            from .superres import condition

            lat = self._txt2img_latents(sched, req.latents, req, gen)
            extra = np.repeat(condition(req.init_image.pixels), lat.shape[0], axis=0)
        elif req.init_image is not None:
            lat = self._img2img_latents(sched, req.init_image.pixels, timesteps, req, gen)
            self._release("vae_encoder")
        else:
            lat = self._txt2img_latents(sched, req.latents, req, gen)
        lat = self._denoise(sched, lat, embeds, timesteps, req, gen, progress, extra)
        provenance = self._provenance(lat.shape)
        self._release("unet")
        images = self.decode(lat)
        self._release("vae_decoder")
        timings = dict(self.timings)
        timings["total"] = time.perf_counter() - t_start
        timings["steps"] = len(timesteps)
        return Result(images, req, provenance, timings, dropped, lat)

    def _provenance(self, latent_shape: tuple) -> Provenance:
        unet, model = self.backend("unet"), self.manifest.schema.model
        tiling = self.vae_tiling.to_dict(*latent_shape[2:]) if self.vae_tiling else None
        loras = tuple(self._loras.provenance()) if self._loras is not None else None
        return Provenance(backend=unet.name, precision=unet.precision,
                          model=model.source, model_sha256=model.sha256, vae_tiling=tiling,
                          loras=loras)

    def _embeddings(self, req: GenerationRequest) -> tuple[np.ndarray, list[int]]:
        n = req.num_images_per_prompt
        prompts = [q for q in req.prompts for _ in range(n)]
        negs = [q for q in req.negative_prompts for _ in range(n)]
        cfg = req.guidance_scale > 1.0
        emb, dropped = self.encode_text(negs + prompts if cfg else prompts)
        if cfg:
            self._warn_truncated("negative prompt", dropped[:len(negs):n])
            dropped = dropped[len(negs):]
        self._warn_truncated("prompt", dropped[::n])
        return emb, dropped[::n]

    def _warn_truncated(self, label: str, dropped: list[int]) -> None:
        for i, k in enumerate(dropped):
            if k:
                log.warning("%s %d is longer than the text encoder's %d tokens: %d token%s dropped",
                            label, i + 1, self.tokenizer.max_length, k, "s" if k > 1 else "")

    def _timesteps(self, sched, req: GenerationRequest) -> np.ndarray:
        sched.set_timesteps(req.num_inference_steps)
        if req.init_image is None or req.strength is None:  # strength None: super-resolution
            return sched.timesteps
        n = req.num_inference_steps
        init_steps = min(int(n * req.strength), n)
        start = max(n - init_steps, 0) * sched.order
        if start >= len(sched.timesteps):
            raise UsageError(f"--strength {req.strength} with {n} steps leaves no step to run; "
                             f"raise --strength or --steps")
        sched.set_begin_index(start)
        return sched.timesteps[start:]

    def _txt2img_latents(self, sched, latents, req: GenerationRequest, gen) -> np.ndarray:
        shape = self._latent_shape(req)
        if latents is None:
            latents = gen.standard_normal(size=shape, dtype=np.float32)
        return (latents * np.float32(sched.init_noise_sigma)).astype(np.float32)

    def _img2img_latents(self, sched, image, timesteps, req: GenerationRequest, gen) -> np.ndarray:
        shape = self._latent_shape(req)
        init = self.encode_image(image, gen)
        if shape[0] % init.shape[0]:
            raise UsageError("the number of images must be a multiple of the init images")
        init = np.concatenate([init] * (shape[0] // init.shape[0]), axis=0)
        noise = gen.standard_normal(size=shape, dtype=np.float32)
        t0 = np.repeat(np.asarray(timesteps[:1]), shape[0])
        return sched.add_noise(init, noise, t0).astype(np.float32)

    def _inpaint_latents(self, sched, timesteps, req: GenerationRequest, gen):
        """Initial latents (pure noise at strength 1, else the image's, noised) and the mask
        and masked-image latents, drawn in diffusers' order (runtime/inpaint.py)."""
        from .inpaint import condition

        if req.strength >= 1.0:
            lat = self._txt2img_latents(sched, req.latents, req, gen)
        else:
            lat = self._img2img_latents(sched, req.init_image.pixels, timesteps, req, gen)
        mask, masked = condition(req.init_image.pixels, req.mask.pixels,
                                 int(self.manifest.schema.vae_scale_factor))
        masked_lat = self.encode_pixels(masked, gen)
        extra = np.concatenate([mask, masked_lat], axis=1)
        return lat, np.repeat(extra, lat.shape[0] // extra.shape[0], axis=0).astype(np.float32)

    def _upscale_latents(self, sched, req: GenerationRequest, gen):
        """The SD x4 upscaler: the low-resolution image noised to ``noise_level`` by its
        low_res_scheduler (drawn first, as diffusers does), then the initial latents."""
        from .schedulers import make_scheduler as make
        from .superres import condition

        low = condition(req.init_image.pixels)
        noise = gen.standard_normal(size=low.shape, dtype=np.float32)
        ddpm = make("ddpm", self.manifest.schema.upscaler["low_res_scheduler"])
        low = ddpm.add_noise(low, noise, np.array([req.noise_level]))
        lat = self._txt2img_latents(sched, req.latents, req, gen)
        return lat, np.repeat(low, lat.shape[0], axis=0).astype(np.float32)

    def _latent_shape(self, req: GenerationRequest) -> tuple:
        m = self.manifest.schema
        f = int(m.vae_scale_factor)
        return (req.num_images, int(m.latent_channels), req.height // f,
                req.width // f)

    def _unet_max_batch(self) -> int:
        """Largest batch one U-Net call takes: a fixed engine batch, or the exported range."""
        spec = self.backend("unet").spec
        dim = spec.input("sample").shape[0]
        return dim if isinstance(dim, int) else int(spec.ranges.get("batch", (1, 1 << 30))[1])

    def _unet(self, x, t, t_dtype, embeds, chunk: int, noise_level=None) -> np.ndarray:
        """One batched call when it fits (embeddings bound once), else several calls.
        ``noise_level``: the SD x4 upscaler's class label, one per sample."""
        def more(n):
            return {} if noise_level is None else {"noise_level": np.full((n,), noise_level,
                                                                          dtype=np.int64)}
        if chunk >= x.shape[0]:
            return self._call("unet", {"sample": x, "timestep": np.full((x.shape[0],), t, dtype=t_dtype),
                                       **more(x.shape[0])})
        outs = []
        for s in range(0, x.shape[0], chunk):
            xs = x[s:s + chunk]
            feeds = {"sample": xs, "timestep": np.full((xs.shape[0],), t, dtype=t_dtype),
                     **more(xs.shape[0])}
            if embeds is not None:
                feeds["encoder_hidden_states"] = embeds[s:s + chunk]
            outs.append(self._call("unet", feeds))
        return np.concatenate(outs)

    def _denoise(self, sched, lat, embeds, timesteps, req, gen, progress,
                 extra=None) -> np.ndarray:
        unet = self.backend("unet")
        cfg = req.guidance_scale > 1.0
        t_dtype = np.dtype(unet.spec.input("timestep").dtype)
        chunk = self._unet_max_batch()
        if embeds is not None:  # None: a U-Net without cross-attention (unconditional)
            embeds = embeds.astype(np.float32)
            if chunk >= embeds.shape[0]:
                unet.bind({"encoder_hidden_states": embeds})
        per_step = []
        t_loop = time.perf_counter()
        if progress is not None:
            progress(0, len(timesteps))  # the run has started: nothing left to refuse
        try:
            for i, t in enumerate(timesteps):
                x = np.concatenate([lat, lat]) if cfg else lat
                if extra is not None and req.task == SUPER_RESOLUTION:  # scaled with it
                    x = np.concatenate([x, extra], 1)
                x = sched.scale_model_input(x, t).astype(np.float32)
                if extra is not None and req.task in (INPAINT, UPSCALE):  # after scaling
                    x = np.concatenate([x, np.concatenate([extra, extra]) if cfg else extra], 1)
                t0 = time.perf_counter()
                out = self._unet(x, t, t_dtype, embeds, chunk, req.noise_level)
                per_step.append(time.perf_counter() - t0)
                if cfg:
                    uncond, text = np.split(out, 2)
                    out = uncond + np.float32(req.guidance_scale) * (text - uncond)
                lat = sched.step(out, t, lat, generator=gen).astype(np.float32)
                if progress is not None:
                    progress(i + 1, len(timesteps))
        finally:
            unet.unbind()
        self.timings["unet_per_step"] = per_step
        self.timings["denoise_loop"] = time.perf_counter() - t_loop
        return lat


def _lora_key(lora_set, component: str) -> str:
    return "" if lora_set is None else lora_set.key(component)
