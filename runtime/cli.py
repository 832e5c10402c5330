"""``ldm-run``: generate images from a bundle. numpy + onnxruntime only, never torch."""

from __future__ import annotations

import logging
import sys
import time

import click

from .cli_errors import invoke_reporting
from .errors import UsageError


class _Command(click.Command):
    """One-line errors and an exit code instead of tracebacks."""

    def invoke(self, ctx):
        return invoke_reporting("ldm-run", super().invoke, ctx,
                                debug=lambda: bool(ctx.params.get("debug")))


def _scheduler_help() -> str:
    from .schedulers import scheduler_names

    return "Sampler: " + ", ".join(scheduler_names()) + " (default: the model's own)."


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path())
@click.option("-p", "--prompt", "prompts", multiple=True, required=True,
              help="Text prompt; repeat for several prompts in one batch.")
@click.option("-n", "--negative-prompt", default=None, help="What the image should not show.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's).")
@click.option("-g", "--guidance-scale", type=float, default=None,
              help="Classifier-free guidance; <= 1 turns it off (default: the model's).")
@click.option("--scheduler", default=None, help="Sampler, e.g. ddim, euler, dpm++2m (see --list-schedulers).")
@click.option("--seed", type=int, default=None, help="Seed of the numpy noise generator.")
@click.option("--height", type=int, default=None, help="Image height in pixels (multiple of 8).")
@click.option("--width", type=int, default=None, help="Image width in pixels (multiple of 8).")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--init-image", type=click.Path(), default=None, help="Start from this image (img2img).")
@click.option("--strength", type=float, default=0.8, show_default=True,
              help="img2img: how much of the schedule to run (0..1].")
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
                   "~/.cache/ldm-edge/ort-graphs (a copy of the weights), so later starts skip "
                   "the optimisation (SD1.5 U-Net: 8.7 s -> 1.3 s). Default: off, or "
                   "$LDM_EDGE_ORT_CACHE=1.")
@click.option("--no-verify", is_flag=True, help="Skip sha256 verification of the bundle files.")
@click.option("-o", "--output", "out", default="out.png", show_default=True,
              help="PNG to write (several images: out-0.png, out-1.png, ...).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or timing table.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
def main(bundle, prompts, negative_prompt, steps, guidance_scale, scheduler, seed, height, width,
         num_images, init_image, strength, latents_path, backend, device, precision, threads,
         ort_cache, no_verify, out, quiet, debug):
    """Generate images from BUNDLE (a folder written by `ldm-export onnx`)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="ldm-run: %(levelname)s: %(message)s")
    from .image import load_init_image, output_paths, save_png
    from .pipeline import Pipeline

    t_proc = time.perf_counter()
    paths = output_paths(out, len(prompts) * num_images)
    latents = _load_latents(latents_path) if latents_path else None
    pipe = Pipeline(bundle, backend=backend, precision=precision, device=device, threads=threads,
                    verify=not no_verify, ort_cache=ort_cache)
    defaults = pipe.manifest.get("defaults", {})
    init = None
    if init_image:
        init = load_init_image(init_image, int(width or defaults.get("width", 512)),
                               int(height or defaults.get("height", 512)))
    bar = _progress_bar(quiet)
    try:
        result = pipe(list(prompts), negative_prompt, num_inference_steps=steps,
                      guidance_scale=guidance_scale, scheduler=scheduler, height=height,
                      width=width, num_images_per_prompt=num_images, seed=seed, latents=latents,
                      init_image=init, strength=strength,
                      progress=(lambda i, n: _advance(bar, i, n)) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    meta = _metadata(result.params, pipe, init_image)
    for i, (img, path) in enumerate(zip(result.images, paths)):
        save_png(img, path, {**meta, "prompt": result.params["prompts"][i // num_images],
                             "index": i})
    if not quiet:
        click.echo(timing_table(result.timings), err=True)
    for path in paths:
        click.echo(str(path))
    if not quiet:
        click.echo(f"done in {time.perf_counter() - t_proc:.2f} s", err=True)


def _progress_bar(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(desc="denoising", unit="step", file=sys.stderr, leave=False)


def _advance(bar, done: int, total: int) -> None:
    if bar.total != total:
        bar.total = total
    bar.update(done - bar.n)


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


def _metadata(params: dict, pipe, init_image) -> dict:
    m = pipe.manifest
    keep = ("negative_prompts", "num_inference_steps", "guidance_scale", "scheduler", "height",
            "width", "seed", "strength")
    meta = {k: params[k] for k in keep}
    meta["negative_prompt"] = meta.pop("negative_prompts")[0]
    meta.update({"init_image": str(init_image) if init_image else None,
                 "precision": pipe.options["precision"], "backend": pipe.options["backend"],
                 "model": m["model"].get("source"), "model_sha256": m["model"].get("sha256")})
    return meta


def timing_table(t: dict) -> str:
    steps = t.get("unet_per_step") or []
    per = sorted(steps)[len(steps) // 2] if steps else float("nan")
    rows = [("text encoder", t.get("text_encoder", 0.0)),
            ("vae encoder", t.get("vae_encoder")),
            (f"unet ({len(steps)} steps)", t.get("unet", 0.0)),
            ("unet per step (median)", per),
            ("vae decoder", t.get("vae_decoder", 0.0)),
            ("total", t.get("total", 0.0))]
    lines = ["stage                      seconds"]
    lines += [f"{name:<26} {v:8.3f}" for name, v in rows if v is not None]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
