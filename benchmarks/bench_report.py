"""Write the benchmark's JSON, markdown table and PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

BASELINE = "diffusers-eager"
ROWS = [("e2e_s", "end to end (s)"), ("text_encoder_s", "text encoder (s)"),
        ("unet_step_s", "U-Net per step (s)"), ("vae_decoder_s", "VAE decoder (s)"),
        ("overhead_per_step_s", "runtime overhead per step (s)"),
        ("cold_start_first_unet_s", "cold start → first U-Net call (s)"),
        ("cold_start_png_s", "cold start → PNG written (s)"), ("peak_rss_mb", "peak RSS (MB)")]


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def table(res: dict) -> str:
    med = res["medians"]
    names = list(med)
    lines = [f"### {res['model']} ({res['size']}², {res['steps']} steps, guidance on, "
             f"{res['threads']} threads, median of {res['repeats']})", "",
             "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label in ROWS:
        cells = []
        for n in names:
            v, b = med[n][key], med[BASELINE][key]
            ratio = f" ({b / v:.2f}×)" if n != BASELINE and v and b and key != "peak_rss_mb" else ""
            if key == "peak_rss_mb" and n != BASELINE and v and b:
                ratio = f" ({v / b:.2f}× of baseline)"
            cells.append(_fmt(v, 1 if key == "peak_rss_mb" else 3) + ratio)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    steps_s = [f"{1 / med[n]['unet_step_s']:.2f}" if med[n]["unet_step_s"] else "–" for n in names]
    lines.append("| steps / s (U-Net) | " + " | ".join(steps_s) + " |")
    if res.get("unet_gflop_per_call") and res.get("matmul_peak_gflops"):
        g, peak = res["unet_gflop_per_call"], res["matmul_peak_gflops"]
        eff = [f"{g / med[n]['unet_step_s']:.0f} GFLOP/s ({100 * g / med[n]['unet_step_s'] / peak:.0f}% of peak)"
               for n in names]
        lines.append("| U-Net achieved FLOP/s | " + " | ".join(eff) + " |")
    q = res["quality"]
    lines.append("| 8-bit PSNR vs diffusers (dB) | – | " + " | ".join(
        f"{q[n]:.1f}" for n in names if n != BASELINE) + " |")
    return "\n".join(lines)


def chart(results: list, path: Path) -> None:
    """Speed-up over diffusers per stage, one group of bars per model (pillow only)."""
    from PIL import Image, ImageDraw

    keys = ["e2e_s", "unet_step_s", "vae_decoder_s", "text_encoder_s"]
    bars = [(r["model"], n, k, r["medians"][BASELINE][k] / r["medians"][n][k])
            for r in results for n in r["medians"] if n != BASELINE for k in keys
            if r["medians"][n][k] and r["medians"][BASELINE][k]]
    w, h, pad = 60 + 26 * len(bars), 360, 40
    img = Image.new("RGB", (max(w, 400), h), "white")
    d = ImageDraw.Draw(img)
    top = max([b[3] for b in bars] + [1.0]) * 1.1
    y = lambda v: h - pad - (h - 2 * pad) * v / top  # noqa: E731
    d.line([(pad, y(1.0)), (img.width - 10, y(1.0))], fill="gray")
    d.text((5, y(1.0) - 6), "1.0x", fill="gray")
    colours = {"e2e_s": "#1f77b4", "unet_step_s": "#ff7f0e", "vae_decoder_s": "#2ca02c",
               "text_encoder_s": "#9467bd"}
    for i, (model, name, key, ratio) in enumerate(bars):
        x = pad + 10 + 26 * i
        d.rectangle([x, y(ratio), x + 18, h - pad], fill=colours[key])
        d.text((x, y(ratio) - 12), f"{ratio:.1f}", fill="black")
    d.text((pad, 8), "speed-up vs diffusers eager: e2e (blue), U-Net step (orange), "
           "decoder (green), text enc (purple)", fill="black")
    d.text((pad, h - pad + 8), "  ".join(sorted({f"{m}:{n}" for m, n, _, _ in bars})), fill="black")
    img.save(path)


def write_reports(results: list, out: Path, command: str, wall_s: float) -> None:
    (out / "results.json").write_text(json.dumps({"command": command, "wall_s": wall_s,
                                                  "results": results}, indent=2))
    md = [f"Command: `{command}` (wall {wall_s / 60:.1f} min)", ""]
    md += [table(r) + "\n" for r in results]
    (out / "results.md").write_text("\n".join(md))
    chart(results, out / "chart.png")
    print("\n".join(md))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'chart.png'}")
