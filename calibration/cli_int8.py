"""``ldm-export int8 BUNDLE``: add a calibrated INT8 (QDQ) U-Net to a bundle.

Registered in ``export/cli.py`` with ``main.add_command(int8_cmd, "int8")``; it also runs on
its own (``python -m ldm_edge.calibration.cli_int8 BUNDLE``).
"""

from __future__ import annotations

import time

import click

from ldm_edge.runtime.cli.errors import fail

from .capture import read_prompts
from .ranges import METHODS


def summary(m) -> str:
    """What ``make_int8`` recorded (a BundleManifest), in a few lines."""
    unet = m.components["unet"].variants
    v, q = unet["int8"], m.quality["int8"]
    mb = {p: sum(f.size for f in unet[p].files) / 1e6 for p in ("fp32", "int8")}
    n_excl = sum(len(x) for k, x in v.excluded_nodes.items() if k != "kept by min_psnr")
    calib = v.calibration
    lines = [f"unet (int8): {v.file}, {mb['int8']:.1f} MB (fp32 {mb['fp32']:.1f} MB); "
             f"{len(v.quantized_nodes)} layers INT8 ({v.method} ranges, "
             f"{calib.samples} calibration calls over timesteps "
             f"{calib.timesteps[0]:.0f}..{calib.timesteps[-1]:.0f}), "
             f"{n_excl} nodes float by rule",
             f"int8 end to end: PSNR {q.psnr_db:.2f} dB vs fp32, worst of "
             + ", ".join(f"{s} {v['psnr_db']:.2f}" for s, v in (q.per_scheduler or {}).items())
             + f" dB ({len(q.prompts)} prompts, {q.steps} steps, seed {q.seed}; "
             f"{(q.cpu or {}).get('int8_kernels', '?')} INT8 kernels)"]
    if q.unet_cosine_min is not None:
        lines.append("int8 U-Net output vs fp32 on the fp32 trajectory: cosine ≥ "
                     f"{q.unet_cosine_min:.5f} at every step of every scheduler (content-"
                     "independent; final latents' relative error "
                     + ", ".join(f"{s} {v['latent_rel_error']:.3f}"
                                 for s, v in (q.per_scheduler or {}).items()) + ")")
    tiny = m.components.get("vae_decoder_tiny")
    if tiny is not None and "int8" in tiny.variants:
        par = tiny.variants["int8"].parity
        lines.append(f"vae_decoder_tiny (int8): {tiny.variants['int8'].file}; worst decode vs "
                     f"fp32 {par['psnr_db']:.2f} dB ({par['samples']} decodes not calibrated on, raw output)")
    budget = v.min_psnr
    if budget:
        plain = budget["plain_int8_psnr_db"]
        lines.append(f"--min-psnr {budget['target_db']:.2f} dB: all-INT8 gave {plain:.2f} dB; "
                     f"kept in float: {len(v.kept_float_units) or 'nothing'}")
        for s in budget["greedy"]:
            what = ("back to INT8?" if s.get("pruning") else "float") + \
                (" -> stays float" if s["kept"] else " -> INT8")
            lines.append(f"  {s['unit']} ({s['layers']} layers; U-Net SNR "
                         f"{s['unet_snr_db_only_this_int8']:.1f} dB when only it is INT8) {what}: "
                         f"{s['gain_db']:+.2f} dB -> {s['psnr_db_after']:.2f} dB")
    return "\n".join(lines)


@click.command("int8")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Text file, one prompt a line, for calibration (default: bundled list).")
@click.option("--num-prompts", default=8, show_default=True, type=click.IntRange(1, 1000),
              help="Calibration prompts to use (the file's or the bundled list's first N).")
@click.option("--calib-steps", default=10, show_default=True, type=click.IntRange(1, 1000),
              help="Sampling steps of the FP32 capture run (and of the quality check).")
@click.option("--method", type=click.Choice(METHODS), default="percentile", show_default=True,
              help="Activation ranges from histograms: percentile, entropy (KL) or min-max.")
@click.option("--min-psnr", type=float, default=None,
              help="Keep the most sensitive layers in float until the end-to-end 8-bit PSNR "
                   "vs fp32 reaches this many dB.")
@click.option("--symmetric", is_flag=True,
              help="Symmetric activation ranges (zero points 0) in the onnxruntime graph too "
                   "(the TensorRT form is always symmetric).")
@click.option("--schedulers", default=None,
              help="Comma-separated samplers the calibration runs take in turn and the end-to-end "
                   "check (and --min-psnr) holds for (default: the model's own, then ddim, "
                   "euler, dpm++2m).")
@click.option("--weight-bits", type=click.Choice(["7", "8"]), default="7", show_default=True,
              help="7: weights within -63..63, which onnxruntime's INT8 kernels on CPUs "
                   "without VNNI (AVX2-only) cannot saturate, so one graph serves both kinds; "
                   "8: full range, for VNNI CPUs and GPUs only. See docs/precision.md, INT8.")
@click.option("--size", type=click.IntRange(8, 8192), default=None,
              help="Square image side (pixels) to calibrate and check at: the size you deploy "
                   "(default: the model's own size).")
@click.option("--fused-form/--no-fused-form", default=True, show_default=True,
              help="Also write onnxruntime's fused-attention form of the INT8 U-Net (checked "
                   "against it; what ldm-run then runs, so the quality is measured on it).")
@click.option("--tensorrt-form/--no-tensorrt-form", default=True, show_default=True,
              help="Also write the TensorRT form of the INT8 U-Net (float biases, symmetric "
                   "activations, 8-bit weights; measured against FP32 like the INT8 graph): "
                   "what `ldm-export engines --precision int8` builds.")
def int8_cmd(bundle, prompts_file, num_prompts, calib_steps, method, min_psnr, symmetric,
             schedulers, weight_bits, size, fused_form, tensorrt_form):
    """Add an INT8 U-Net (QDQ, calibrated on the bundle's own sampling trajectory) to
    BUNDLE; record it and its end-to-end quality."""
    from ldm_edge.runtime.errors import LdmEdgeError

    from .int8 import make_int8

    t0 = time.perf_counter()
    try:
        prompts = read_prompts(prompts_file, num_prompts)
    except LdmEdgeError as e:
        fail("ldm-export", str(e), e.exit_code)
    try:
        names = [n.strip() for n in schedulers.split(",") if n.strip()] if schedulers else None
        m = make_int8(bundle, prompts, calib_steps=calib_steps, method=method,
                      min_psnr=min_psnr, symmetric=symmetric, schedulers=names,
                      weight_bits=int(weight_bits), size=size, fused_form=fused_form,
                      tensorrt_form=tensorrt_form,
                      progress=lambda msg: click.echo(f"  [{time.perf_counter() - t0:6.1f}s] {msg}",
                                                      err=True))
    except LdmEdgeError as e:
        fail("ldm-export", str(e), e.exit_code)
    click.echo(summary(m))
    click.echo(f"wrote {bundle} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    int8_cmd()
