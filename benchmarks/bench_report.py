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
        # achieved rates only: torch's FP32 matmul rate is no peak for onnxruntime's
        # convolutions or INT8 kernels (VNNI, AMX), which ran above it (docs/benchmarks.md)
        g = res["unet_gflop_per_call"]
        eff = [f"{g / med[n]['unet_step_s']:.0f} GFLOP/s" for n in names]
        lines.append("| U-Net achieved FLOP/s | " + " | ".join(eff) + " |")
    q = res["quality"]
    lines.append("| 8-bit PSNR vs diffusers (dB) | – | " + " | ".join(
        f"{q[n]:.1f}" for n in names if n != BASELINE) + " |")
    if res.get("matmul_peak_gflops"):
        lines += ["", f"(torch FP32 2048² matmul in the same run: {res['matmul_peak_gflops']:.0f} "
                      f"GFLOP/s, for scale; not a peak for the other kernels)"]
    return "\n".join(lines)


def side_by_side(head: str, rows, med: dict, baseline_of, psnr: dict, psnr_label: str) -> str:
    """The markdown table of a side-by-side run (bench_few_step.py, bench_sdxl.py): medians per
    candidate, each cell of ours with its ratio to ``baseline_of(name)``'s medians (× faster;
    peak RSS as × of diffusers'; None: a diffusers candidate), U-Net calls, 8-bit PSNR."""
    lines = [head, "", "| metric | " + " | ".join(med) + " |", "|---" * (len(med) + 1) + "|"]
    for key, label, digits in rows:
        cells = []
        for n, m in med.items():
            v, base = m.get(key), (baseline_of(n) or {}).get(key)
            cell = "–" if v is None else f"{v:.{digits}f}"
            if v and base:
                cell += (f" ({v / base:.2f}× of diffusers')" if key == "peak_rss_mb"
                         else f" ({base / v:.2f}×)")
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| U-Net calls | " + " | ".join(str(int(m["unet_calls"])) for m in med.values())
                 + " |")
    lines.append(f"| {psnr_label} | " + " | ".join(
        "–" if n not in psnr else f"{psnr[n]:.1f}" for n in med) + " |")
    return "\n".join(lines)


def chart(results: list, path: Path) -> None:
    """Speed-up over diffusers per stage (log scale), a group of bars per model and
    candidate. Pillow only."""
    import math

    from PIL import Image, ImageDraw

    keys = [("e2e_s", "#1f77b4"), ("unet_step_s", "#ff7f0e"), ("vae_decoder_s", "#2ca02c"),
            ("text_encoder_s", "#9467bd")]
    groups = [(r["model"], n, r["medians"]) for r in results for n in r["medians"] if n != BASELINE]
    bar, gap, pad, h = 16, 30, 50, 380
    w = pad + len(groups) * (len(keys) * bar + gap) + 20
    img = Image.new("RGB", (max(w, 520), h), "white")
    d = ImageDraw.Draw(img)
    ratios = [m[BASELINE][k] / m[n][k] for _, n, m in groups for k, _ in keys
              if m[n][k] and m[BASELINE][k]]
    top = math.log2(max(ratios + [2.0])) + 0.5
    bottom = min(0.0, math.log2(min(ratios + [1.0]))) - 0.25
    y = lambda r: h - 70 - (h - 110) * (math.log2(r) - bottom) / (top - bottom)  # noqa: E731
    for e in range(math.floor(bottom), math.ceil(top)):
        d.line([(pad, y(2 ** e)), (img.width - 10, y(2 ** e))], fill="#dddddd" if e else "gray")
        d.text((8, y(2 ** e) - 6), f"{2 ** e:g}x", fill="gray")
    x = pad + 10
    for model, name, m in groups:
        for k, colour in keys:
            if m[name][k] and m[BASELINE][k]:
                r = m[BASELINE][k] / m[name][k]
                d.rectangle([x, min(y(r), y(1)), x + bar - 3, max(y(r), y(1))], fill=colour)
                d.text((x - 2, min(y(r), y(1)) - 12), f"{r:.1f}", fill="black")
            x += bar
        d.text((x - len(keys) * bar, h - 60), model, fill="black")
        d.text((x - len(keys) * bar, h - 46), name.replace("ldm-edge-", ""), fill="black")
        x += gap
    d.text((pad, 6), "speed-up vs diffusers eager (log scale, same run)", fill="black")
    d.text((pad, 20), "end to end (blue), U-Net step (orange), VAE decoder (green), "
           "text encoder (purple)", fill="black")
    img.save(path)


def write_reports(results: list, out: Path, command: str, wall_s: float) -> None:
    (out / "results.json").write_text(json.dumps({"command": command, "wall_s": wall_s,
                                                  "results": results}, indent=2))
    md = [f"Command: `{command}` (wall {wall_s / 60:.1f} min)", ""]
    md += [table(r) + "\n" for r in results]
    if any("lora" in r for r in results):
        from bench_lora import markdown as lora_table

        md += [lora_table(r["lora"]) + "\n" for r in results if "lora" in r]
    (out / "results.md").write_text("\n".join(md))
    chart(results, out / "chart.png")
    print("\n".join(md))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'chart.png'}")
