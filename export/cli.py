"""``ldm-export``: turn a trained latent diffusion model into a checked bundle."""

from __future__ import annotations

import logging
import time

import click

from ldm_edge.calibration.cli_int8 import int8_cmd
from ldm_edge.runtime.cli import errors as cli_errors
from ldm_edge.serve.cli import triton_cmd


def fail(msg: str, code: int = 1):
    cli_errors.fail("ldm-export", msg, code)


class Group(click.Group):
    """Turns known errors into one line and an exit code; --debug shows tracebacks."""

    def invoke(self, ctx):
        return cli_errors.invoke_reporting(
            "ldm-export", super().invoke, ctx, interrupted="interrupted; nothing was written",
            debug=lambda: bool(ctx.obj and ctx.obj.get("debug")))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def main(ctx, debug):
    """Export latent diffusion models (SD1.x, SD2.x, LDM, the ldm-edge demo) to checked bundles."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command("onnx")
@click.argument("source", required=False)
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Bundle folder to write (a folder with manifest.json).")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(18, 23),
              help="ONNX opset.")
@click.option("--min-size", default=32, show_default=True, type=int,
              help="Smallest image side (pixels, multiple of 8) the graphs accept.")
@click.option("--max-size", default=1024, show_default=True, type=int,
              help="Largest image side (pixels, multiple of 8) the graphs accept.")
@click.option("--max-batch", default=4, show_default=True, type=int,
              help="Most images per call (the U-Net sees twice this under guidance).")
@click.option("--exporter", type=click.Choice(["auto", "torchscript", "dynamo"]), default="auto",
              show_default=True, help="torch.onnx exporter; auto tries TorchScript, then dynamo.")
@click.option("--config", type=click.Path(exists=True, file_okay=False),
              help="For an original-layout SD or SDXL checkpoint: a diffusers folder of the same "
                   "model (configs and tokenizers; weights not needed).")
@click.option("--skip-vae-encoder", is_flag=True, help="Do not export the VAE encoder (no img2img).")
@click.option("--tiny-vae", type=click.Path(), default=None, metavar="DIR",
              help="Also export this TAESD (a diffusers AutoencoderTiny folder: config.json + "
                   "weights) as the tiny VAE beside the full one (ldm-run --vae tiny, --preview).")
@click.option("--default-steps", type=int, default=None,
              help="Record this many steps as the bundle's default (what the model's makers "
                   "recommend, e.g. SD-Turbo 1; default: the pipeline's own).")
@click.option("--default-guidance-scale", type=float, default=None,
              help="Record this guidance scale as the bundle's default (SD-Turbo: 0, no "
                   "classifier-free guidance).")
@click.option("--default-scheduler", default=None,
              help="Record this sampler (ldm-run --list-schedulers) as the bundle's default "
                   "(default: the one the model's scheduler config names).")
@click.option("--controlnet", "controlnets", multiple=True, metavar="[NAME=]DIR|FILE",
              help="Also export this ControlNet (a diffusers ControlNetModel folder, or a "
                   ".safetensors/.pth/.ckpt file in the original control_* layout, read as a "
                   "ControlNet of SOURCE's U-Net), named by its folder, its file's stem or NAME; "
                   "repeatable. The U-Net then takes its residuals "
                   "(ldm-run --control NAME:IMAGE; without --control, the plain picture).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def onnx_cmd(source, out, opset, min_size, max_size, max_batch, exporter, config,
             skip_vae_encoder, tiny_vae, default_steps, default_guidance_scale,
             default_scheduler, controlnets, force):
    """Export SOURCE (a diffusers folder, a .safetensors/.ckpt file; default: the bundled
    demo model) to ONNX, check every component against PyTorch, write the bundle."""
    from .bundle import ExportOptions, export_bundle
    from .load import default_source, load_model
    from .model_facts import recommend_defaults

    t0 = time.perf_counter()
    if source is None:
        source = default_source()
        if source is None:
            fail("no SOURCE given and the bundled demo model is not installed", 2)
    recommended = recommend_defaults(default_steps, default_guidance_scale, default_scheduler)
    click.echo(f"loading {source}", err=True)
    model = load_model(source, config=config)
    model.defaults.update(recommended)
    if tiny_vae is not None:
        from .load import attach_tiny_vae

        attach_tiny_vae(model, tiny_vae)
    comps = ("text_encoder", "unet", "vae_decoder") + (() if skip_vae_encoder else ("vae_encoder",))
    opts = ExportOptions(opset=opset, min_size=min_size, max_size=max_size, max_batch=max_batch,
                         exporter=exporter, components=comps, force=force,
                         controlnets=tuple(controlnets))
    click.echo(f"family {model.family}, prediction {model.prediction_type}, "
               f"latents {model.latent_channels}ch /{model.vae_scale_factor}", err=True)
    manifest = export_bundle(model, out, opts,
                             progress=lambda m: click.echo(f"  [{time.perf_counter() - t0:6.1f}s] {m}", err=True))
    click.echo(summary_table(manifest))
    click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f} s")


@main.command("controlnet")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("controlnet", metavar="[NAME=]DIR|FILE")
@click.option("--config", type=click.Path(exists=True, file_okay=False),
              help="For a single-file ControlNet (original control_* layout): the diffusers "
                   "folder of the bundle's model (its unet/config.json; weights not needed) or a "
                   "ControlNetModel folder (config.json).")
def controlnet_cmd(bundle, controlnet, config):
    """Add a ControlNet (a diffusers ControlNetModel folder, or a single file in the original
    layout with --config) to BUNDLE, whose U-Net must take ControlNet residuals (exported with
    --controlnet); checked against PyTorch like the rest."""
    from .controlnet import add_controlnet

    t0 = time.perf_counter()
    m = add_controlnet(bundle, controlnet, config=config,
                       progress=lambda msg: click.echo(f"  [{time.perf_counter() - t0:6.1f}s] {msg}", err=True))
    click.echo(summary_table(m))
    click.echo(f"ControlNets in {bundle}: {', '.join(m.controlnets)}")


@main.command("fp16")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file, one prompt a line, for capturing real inputs (default: bundled list).")
@click.option("--num-prompts", default=4, show_default=True, type=click.IntRange(1, 1000))
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Sampling steps of the FP32 capture run.")
def fp16_cmd(bundle, prompts_file, num_prompts, steps):
    """Add FP16 graphs (FP32 islands decided by running) to BUNDLE; record their quality."""
    from ldm_edge.calibration.capture import read_prompts
    from ldm_edge.calibration.fp16 import make_fp16

    t0 = time.perf_counter()
    prompts = read_prompts(prompts_file, num_prompts)
    m = make_fp16(bundle, prompts, steps=steps,
                  progress=lambda msg: click.echo(f"  [{time.perf_counter() - t0:6.1f}s] {msg}", err=True))
    click.echo(summary_table(m))
    q = m.quality["fp16"]
    click.echo(f"fp16 end to end: PSNR {q.psnr_db:.1f} dB vs fp32 "
               f"({len(q.prompts)} prompts, {q.steps} steps)")


@main.command("fuse")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), multiple=True,
              help="Variants to add the form to (default: every precision the bundle has).")
@click.option("--component", "components", multiple=True, metavar="NAME",
              help="Only this component (unet, vae_decoder, vae_encoder, controlnet/NAME); "
                   "repeatable. Default: each of them the bundle has.")
def fuse_cmd(bundle, precision, components):
    """Add the onnxruntime form (attention fused into MultiHeadAttention) to BUNDLE's U-Net,
    VAE and ControlNet variants; each form is checked against its plain graph and recorded."""
    from ldm_edge.bundletools.forms import add_fused_forms, attention_components
    from ldm_edge.runtime.bundle.schema import read_manifest_json
    from ldm_edge.runtime.errors import UsageError

    manifest = read_manifest_json(bundle)
    known = attention_components(manifest)
    for name in components:
        if name not in known:
            raise UsageError(f"--component {name}: not one of this bundle's components with "
                             f"attention ({', '.join(n for n in known if n in manifest.components)})")
    have = sorted({p for c in manifest.components.values() for p in c.variants})
    for prec in precision or have:
        made = add_fused_forms(bundle, prec, components=list(components) or None)
        for name, form in made.items():
            click.echo(f"{name} ({prec}): " + ("no fusable attention or check failed (see log)"
                       if form is None else f"{form.file}, {form.fused_attention} attentions, "
                       f"max-abs {form.check['max_abs']:.2e} vs plain"))


def summary_table(manifest) -> str:
    """One row per component variant of a BundleManifest: file, size, parity at export."""
    rows = [("component", "file", "MB", "max-abs", "max-rel", "cosine", "check")]
    for name, rec in manifest.components.items():
        for prec, v in rec.variants.items():
            par = v.parity or {}
            mb = sum(f.size for f in v.files) / 1e6
            rows.append((f"{name} ({prec})", v.file, f"{mb:.1f}",
                         f"{par.get('max_abs', float('nan')):.2e}",
                         f"{par.get('max_rel', float('nan')):.2e}",
                         f"{par.get('cosine', float('nan')):.6f}",
                         "pass" if par.get("passed") else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@main.command("import-optimum")
@click.argument("folder", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Bundle folder to write (a folder with manifest.json).")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
def import_optimum_cmd(folder, out, force):
    """Make a bundle from FOLDER, an SD 1.x/2.x ONNX export by Hugging Face Optimum
    (optimum-cli export onnx, ORTStableDiffusionPipeline) or diffusers' legacy script.
    The graphs are copied as they are; nothing is re-exported."""
    from .optimum_import import import_optimum

    t0 = time.perf_counter()
    manifest = import_optimum(folder, out, force=force,
                              progress=lambda m: click.echo(f"  [{time.perf_counter() - t0:6.1f}s] {m}", err=True))
    for name, rec in manifest.components.items():
        v = rec.variants["fp32"]
        io = ", ".join(f"{k}={g}" for k, g in rec.io_map.items() if k != g)
        click.echo(f"{name:<13} {v.file:<22} {sum(f.size for f in v.files) / 1e6:8.1f} MB"
                   f"  {io}")
    click.echo(f"wrote {out} in {time.perf_counter() - t0:.1f} s")


@main.command("engines")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16",
              show_default=True, help="Which ONNX variant to build from (strongly typed: the "
              "graph's own precision; components without it use the next wider one).")
@click.option("--static", is_flag=True, help="One fixed shape: --opt-size and --max-batch "
              "(default: the model's default size, 1 image).")
@click.option("--min-size", type=int, default=None,
              help="Smallest image side, pixels (default: as exported).")
@click.option("--opt-size", type=int, default=None,
              help="Image side TensorRT tunes for (default: the model's).")
@click.option("--max-size", type=int, default=None,
              help="Largest image side, pixels (default: as exported).")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=None, help="Most images per "
              "call; U-Net and text encoder get twice this (default: as exported).")
@click.option("--workspace", "workspace_mb", type=click.IntRange(1, None), default=None,
              help="Builder workspace cap in MiB (e.g. 1024-2048 on 8 GB Jetsons; "
              "default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Tactic timing cache to read and update (speeds up rebuilds on this GPU).")
@click.option("--optimization-level", type=click.IntRange(0, 5), default=None,
              help="TensorRT builder optimisation level 0-5 (default: TensorRT's, 3).")
@click.option("--components", default=None,
              help="Comma-separated components to build (default: all in the bundle).")
@click.option("--refittable", is_flag=True,
              help="Keep the U-Net's and text encoder's LoRA-targetable weights refittable "
                   "(only those), so `ldm-run --lora` works on the engines.")
@click.option("--tf32", is_flag=True,
              help="Let FP32 convolutions and matrix products use TF32 (Ampere and later: "
                   "faster, 10-bit mantissa inputs). Default off: FP32 as the ONNX graph.")
@click.pass_context
def engines_cmd(ctx, bundle, precision, static, min_size, opt_size, max_size, max_batch,
                workspace_mb, timing_cache, optimization_level, components, refittable, tf32):
    """Build TensorRT engines for BUNDLE on this GPU and record them in its manifest.
    Needs TensorRT (10.3+: JetPack 6.1, or 11.x), Polygraphy, cuda-python and a CUDA GPU."""
    from .engines import ProfileOptions, build_engines

    t0 = time.perf_counter()
    names = tuple(c.strip() for c in components.split(",") if c.strip()) if components else None
    opts = ProfileOptions(static=static, min_size=min_size, opt_size=opt_size, max_size=max_size,
                          max_batch=max_batch)
    records = build_engines(
        bundle, precision=precision, options=opts, components=names, workspace_mb=workspace_mb,
        timing_cache=timing_cache, optimization_level=optimization_level,
        debug=bool(ctx.obj and ctx.obj.get("debug")), refittable=refittable, tf32=tf32,
        progress=lambda m: click.echo(f"  [{time.perf_counter() - t0:6.1f}s] {m}", err=True))
    for r in records:
        shapes = ", ".join(f"{k} {p['min']}..{p['max']}" for k, p in r["profile"].items())
        click.echo(f"{r['component']:<13} {r['precision']:<5} {r['size'] / 1e6:8.1f} MB  "
                   f"{r['file']}  [{shapes}]")
    click.echo(f"built {len(records)} engine(s) in {time.perf_counter() - t0:.1f} s")


main.add_command(int8_cmd, "int8")  # lives in calibration/, where INT8 is made
main.add_command(triton_cmd, "triton")  # lives in serve/, with the server it is for

if __name__ == "__main__":
    main()
