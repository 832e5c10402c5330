"""``ldm-run``: generate images from a bundle. numpy + onnxruntime only, never torch."""

from __future__ import annotations

import logging
import sys
import time

import click

from ..errors import UsageError
from ..fields import request_keywords
from ..tasks import TASKS
from .errors import invoke_reporting


class _Command(click.Command):
    """One-line errors and an exit code instead of tracebacks."""

    def invoke(self, ctx):
        return invoke_reporting("ldm-run", super().invoke, ctx,
                                debug=lambda: bool(ctx.params.get("debug")))


def _list_schedulers(ctx, _param, value):
    """--list-schedulers: the names --scheduler takes, one a line; needs no bundle."""
    if not value or ctx.resilient_parsing:
        return
    from ..schedulers import scheduler_names

    click.echo("\n".join(scheduler_names()))
    ctx.exit(0)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(), required=False)
@click.option("-p", "--prompt", "prompts", multiple=True,
              help="Text prompt; repeat for several prompts in one batch. Required unless the "
                   "bundle's model is unconditional.")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="What to run (default: what the bundle's model does, see the support "
                   "table in the README); a text-to-image model also samples unconditionally.")
@click.option("-n", "--negative-prompt", default=None, help="What the image should not show.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option("-g", "--guidance-scale", type=float, default=None,
              help="Classifier-free guidance; <= 1 turns it off (default: the model's).")
@click.option("--scheduler", default=None, help="Sampler, e.g. ddim, euler, dpm++2m (see --list-schedulers).")
@click.option("--list-schedulers", is_flag=True, is_eager=True, expose_value=False,
              callback=_list_schedulers, help="Print the scheduler names and exit.")
@click.option("--seed", type=int, default=None,
              help="Seed of the numpy noise generator, 0 to 2**64-1 "
                   "(default: drawn, and recorded in the PNG).")
@click.option("--height", type=int, default=None, help="Image height in pixels (multiple of 8).")
@click.option("--width", type=int, default=None, help="Image width in pixels (multiple of 8).")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--init-image", type=click.Path(), default=None, help="Start from this image (img2img).")
@click.option("--mask", type=click.Path(), default=None,
              help="Inpainting (a bundle of an inpainting model): white = repaint; the init "
                   "image's size.")
@click.option("--noise-level", type=int, default=None,
              help="SD x4 upscaler: noise added to the low-resolution --init-image "
                   "(default: the bundle's, 20).")
@click.option("--strength", type=float, default=None,
              help="With --init-image: how much of the schedule to run (0..1], default 0.8.")
@click.option("--eta", type=float, default=None,
              help="tcd's stochasticity in [0, 1] (gamma in the TCD paper; default 0.3; 0: "
                   "deterministic); other schedulers refuse it.")
@click.option("--original-size", type=(int, int), default=None, metavar="H W",
              help="SDXL micro-conditioning: the size the model is told the picture was before "
                   "cropping (default: the output size).")
@click.option("--crop-top-left", type=(int, int), default=None, metavar="TOP LEFT",
              help="SDXL micro-conditioning: the crop's top-left corner (default: 0 0, an "
                   "uncropped, centred picture).")
@click.option("--target-size", type=(int, int), default=None, metavar="H W",
              help="SDXL micro-conditioning: the size aimed at (default: the output size).")
@click.option("--aesthetic-score", type=float, default=None,
              help="SDXL refiner: the aesthetic score conditioned on (default 6.0).")
@click.option("--negative-aesthetic-score", type=float, default=None,
              help="SDXL refiner: the score of the unconditioned half (default 2.5).")
@click.option("--refiner", type=click.Path(), default=None, metavar="DIR",
              help="SDXL's ensemble of experts: BUNDLE (the base) stops at --denoising-end and "
                   "hands its latents to this refiner bundle, which draws the rest of the same "
                   "schedule (diffusers' denoising_end / denoising_start).")
@click.option("--denoising-end", type=float, default=None,
              help="With --refiner: the fraction of the schedule the base draws (default 0.8).")
@click.option("--latents", "latents_path", type=click.Path(), default=None,
              help="float32 .npy [num_images, C, H/f, W/f] of initial noise (as diffusers' latents=).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]),
              default="auto", show_default=True,
              help="auto: TensorRT where this bundle has an engine for this GPU, else onnxruntime.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              show_default=True, help="onnxruntime execution provider.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32",
              show_default=True)
@click.option("--threads", type=click.IntRange(0, 1024), default=0, help="CPU threads (0: all).")
@click.option("--ort-cache/--no-ort-cache", default=None,
              help="onnxruntime on the CPU: keep the graphs it optimises for this CPU in "
                   "~/.cache/ldm-edge/ort-graphs (a copy of the weights, kept under "
                   "$LDM_EDGE_ORT_CACHE_MAX_GB, default 20), so later starts skip the "
                   "optimisation; the first start pays for writing them (docs/run.md has "
                   "both measured). Default: on, unless $LDM_EDGE_ORT_CACHE=0.")
@click.option("--low-memory", is_flag=True,
              help="One component in memory at a time (each opened when its stage starts and "
                   "released when it ends), onnxruntime's memory arena off: a lower peak, a "
                   "slower start. Same picture.")
@click.option("--vae-tiling", is_flag=True,
              help="Decode the image in overlapping tiles, blended as diffusers' "
                   "enable_tiling(): a large decode fits in less memory. Changes the picture "
                   "slightly (recorded in the PNG).")
@click.option("--vae-tile-size", type=int, default=None,
              help="With --vae-tiling: tile side in pixels, a multiple of 8 in the decoder's "
                   "exported range (default: the bundle's default image size).")
@click.option("--vae", type=click.Choice(["full", "tiny"]), default=None,
              help="Decode (and encode) with the model's VAE or the tiny one, TAESD, where the "
                   "bundle has it (ldm-export onnx --tiny-vae): faster, rougher. Default: full, "
                   "or tiny where that is the bundle's only VAE. Recorded in the PNG.")
@click.option("--preview", type=int, default=None, metavar="N",
              help="Every N steps, decode the latents with the tiny VAE and write them to "
                   "OUT.preview.png (replaced each time): the picture forming.")
@click.option("--lora", "loras", multiple=True, metavar="FILE:SCALE",
              help="Apply a LoRA (diffusers/PEFT or kohya safetensors) at this scale "
                   "(default 1); repeat to blend several. The bundle is not changed.")
@click.option("--control", multiple=True, metavar="NAME:IMAGE[:SCALE]",
              help="Steer the picture with the bundle's ControlNet NAME (ldm-export onnx "
                   "--controlnet) and its control image (edges, depth, pose... as the ControlNet "
                   "was trained; resized to the output size) at SCALE (default 1); repeat for "
                   "several, their residuals summed. Recorded in the PNG.")
@click.option("--control-start", type=float, default=None,
              help="Fraction of the steps after which the ControlNets start acting (default 0).")
@click.option("--control-end", type=float, default=None,
              help="Fraction of the steps after which they stop (default 1).")
@click.option("--control-preprocess", default=None, metavar="canny[:LOW:HIGH]",
              help="Make each --control image from a photo first: canny, OpenCV's edge map "
                   "(thresholds LOW, HIGH; default 100:200, as diffusers' examples). Needs "
                   "pip install 'ldm-edge[control]'.")
@click.option("--guess-mode", is_flag=True,
              help="ControlNet guess mode (diffusers'): its residuals ramp from 0.1 to 1 down the "
                   "U-Net, and under guidance only the prompted half gets them.")
@click.option("--check-lora-int8", is_flag=True,
              help="With --precision int8 and a --lora on the U-Net: draw the request a second "
                   "time with the FP32 graphs (and the same LoRAs) and print the 8-bit PSNR "
                   "between the two pictures, what re-quantising the merged weights cost. "
                   "Takes as long again.")
@click.option("--no-verify", is_flag=True, help="Skip sha256 verification of the bundle files.")
@click.option("-o", "--output", "out", default="out.png", show_default=True,
              help="PNG to write (several images: out-0.png, out-1.png, ...).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or timing table.")
@click.option("--server", default=None, metavar="URL",
              help="Send the request to a served pipeline (`ldm-serve`, KServe v2 HTTP, e.g. "
                   "http://127.0.0.1:8000) instead of running BUNDLE here; same picture "
                   "(byte for byte with LDM_EDGE_ORT_PREPACK=1 here: docs/serving.md).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
def main(**options):
    """Generate images from BUNDLE (a folder written by `ldm-export onnx`), or on --server."""
    logging.basicConfig(level=logging.DEBUG if options["debug"] else logging.WARNING,
                        format="ldm-run: %(levelname)s: %(message)s")
    from ..image import output_paths

    t_proc = time.perf_counter()
    paths = output_paths(options["out"],
                         max(1, len(options["prompts"])) * options["num_images"])
    if options["server"] is not None:
        from .served import run_served

        return run_served(options, paths, t_proc)
    return _run_local(options, paths, t_proc)


def _run_local(options: dict, paths, t_proc: float) -> None:
    """Open BUNDLE here and draw the request: every option goes where runtime/fields.py says."""
    from ..image import save_png
    from ..lora.files import parse_lora_arg
    from ..pipeline import Pipeline

    if options["bundle"] is None:
        raise UsageError("give BUNDLE (a folder written by ldm-export onnx), or --server URL")
    quiet = options["quiet"]
    latents = _load_latents(options["latents_path"]) if options["latents_path"] else None
    kw = dict(backend=options["backend"], precision=options["precision"],
              device=options["device"], threads=options["threads"],
              verify=not options["no_verify"], ort_cache=options["ort_cache"],
              low_memory=options["low_memory"], vae_tiling=options["vae_tiling"],
              vae_tile_size=options["vae_tile_size"], vae=options["vae"],
              loras=[parse_lora_arg(x) for x in options["loras"]])
    pipe = Pipeline(options["bundle"], one_shot=True, **kw)
    if options["preview"] is not None:  # refused here, before the run, without a tiny VAE
        from ..preview import Preview, preview_path

        pipe.add_step_hook(Preview(pipe, preview_path(options["out"]), options["preview"]))
    if options["check_lora_int8"]:
        from ..lora.check import refuse_unless_int8_lora

        refuse_unless_int8_lora(pipe)  # before the run, not after it
    refiner = _open_refiner(options, kw)  # opened (and refused) before anything runs
    # resolved once, init image loaded at the resolved size: every argument error is raised here
    request = pipe.request(**request_keywords({**options, "latents_path": latents}))
    result = _draw(pipe, request, quiet, decode=refiner is None)
    base = None
    if refiner is not None:
        base, result = result, _refine(refiner, request, result, quiet)
    for i, path in enumerate(paths):
        meta = result.metadata(i)
        if base is not None:  # what the refiner continued
            meta["base"] = {**base.request.to_dict(), **base.provenance.to_dict()}
        save_png(result.images[i], path, meta)
    if not quiet:
        click.echo(timing_table(result.timings), err=True)
        _say_what_was_cached()
    if options["check_lora_int8"]:  # the merged weights were re-quantised: what it cost
        from ..lora.check import int8_lora_check

        click.echo(int8_lora_check(pipe, request, result.images, kw), err=True)
    for path in paths:
        click.echo(str(path))
    if not quiet:
        click.echo(f"done in {time.perf_counter() - t_proc:.2f} s", err=True)


def _say_what_was_cached() -> None:
    """Once, after a run that stored optimised graphs: why this start was slow, the next not."""
    from ..backends.ort_cache import STORED, GraphCache

    if STORED:
        click.echo(f"kept onnxruntime's optimised {', '.join(STORED)} for this CPU in "
                   f"{GraphCache().root}: later starts skip optimising them "
                   f"(--no-ort-cache to skip the cache)", err=True)


# diffusers' documented hand-over point for SDXL base + refiner (its high_noise_frac)
DENOISING_END = 0.8


def _open_refiner(options: dict, kw: dict):
    """The --refiner bundle's pipeline (no LoRA: those are the base's), or None; the base's
    --denoising-end defaulted where a refiner is given, refused where none is."""
    from ..pipeline import Pipeline

    if options["refiner"] is None:
        if options["denoising_end"] is not None:
            raise UsageError("--denoising-end is where the base hands its latents to a refiner; "
                             "give --refiner DIR (or drop --denoising-end)")
        return None
    if options["denoising_end"] is None:
        options["denoising_end"] = DENOISING_END
    return Pipeline(options["refiner"], one_shot=True, **{**kw, "loras": []})


def _draw(pipe, request, quiet: bool, decode: bool = True):
    bar = _ProgressBar(quiet)
    try:
        return pipe(request=request, progress=bar.advance, decode=decode)
    finally:
        bar.close()


def _refine(refiner, req, base, quiet: bool):
    """The refiner continuing the base's latents from where the base stopped, with the
    base's prompts, sampler, steps and seed."""
    negative = None if req.zero_negative else list(req.negative_prompts)
    asked = refiner.request(
        prompt=list(req.prompts), negative_prompt=negative,
        num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
        scheduler=req.scheduler, height=req.height, width=req.width,
        num_images_per_prompt=req.num_images_per_prompt, seed=req.seed,
        latents=base.latents, denoising_start=req.denoising_end)
    return _draw(refiner, asked, quiet)


class _ProgressBar:
    """tqdm on stderr, opened by the first step report (the run has started), not before."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def advance(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(desc="denoising", unit="step", total=total, file=sys.stderr,
                            leave=False)
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load_latents(path: str):
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UsageError(f"--latents {path} not found")
    except (ValueError, OSError) as e:
        raise UsageError(f"--latents {path} is not a .npy array ({e})")
    if arr.dtype != np.float32:
        raise UsageError(f"--latents must be float32, got {arr.dtype}")
    return arr


def timing_table(t) -> str:
    """``t``: a run's pipeline.Timings, as the table ldm-run prints on stderr."""
    rows = [("lora merge (numpy)", t.lora),
            ("text encoder", t.text_encoder),
            ("vae encoder", t.vae_encoder),
            (f"unet ({len(t.unet_per_step)} steps)", t.unet),
            ("unet per step (median)", t.unet_step_median),
            ("controlnet", t.controlnet),
            ("vae decoder", t.vae_decoder),
            ("total", t.total)]
    lines = ["stage                      seconds"]
    lines += [f"{name:<26} {v:8.3f}" for name, v in rows if v is not None]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
