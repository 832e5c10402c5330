"""Measure the demo LoRA: does the model draw ``top center`` with it, and only then?

    python -m ldm_edge.demo.eval_lora [--n 100] [--scale 1.0]              # diffusers (PyTorch)
    python -m ldm_edge.demo.eval_lora --bundle out/demo-bundle [--n 100]    # lean runtime (see below)
    python -m ldm_edge.demo.eval_lora --draw [--out out]                    # `make demo-lora`

Draws N held-out ``top center`` prompts (combinations the LoRA never trained on) and N of the
base model's held-out prompts, each without and with the LoRA from the same initial latents,
and reads them back with the evaluator extended by the new position
(``evaluate.WITH_LORA_POSITIONS``). The diffusers reference applies the LoRA as a user would:
``load_lora_weights`` + ``fuse_lora(lora_scale=scale)``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from . import lora_data as L
from .dataset import heldout_prompts
from .evaluate import WITH_LORA_POSITIONS, detect, score

HERE = Path(__file__).resolve().parent
DEFAULT_LORA = HERE / "weights" / "lora" / "top_center.safetensors"
BATCH = 4  # images per call, as eval_bundle (the demo bundle is exported for --max-batch 4)
LATENT_SHAPE = (4, 8, 8)  # the demo model's latents at its 64x64 default size
# `make demo-lora`: a held-out combination of the new position (not in the LoRA's training)
DRAW_PROMPT = "a blue triangle in the top center on a white background"


def latents(k: int, seed: int) -> np.ndarray:
    """The initial latents eval_bundle uses for the same chunk (seed + chunk offset)."""
    return np.random.default_rng(seed).standard_normal((k, *LATENT_SHAPE), dtype=np.float32)


# -- the two ways to draw: diffusers (now) and the lean runtime (once ldm-run --lora lands) -----
class DiffusersDrawer:
    """The demo model in diffusers; ``lora`` is None or (file, scale), fused into the U-Net."""

    def __init__(self, weights: Path, lora):
        from .diffusers_pipe import demo_pipeline

        self.pipe = demo_pipeline(weights)
        self.pipe.set_progress_bar_config(disable=True)
        self.guidance = float(json.loads((weights / "ldm_edge_demo.json").read_text())["guidance_scale"])
        if lora is not None:
            self.apply(*lora)

    def apply(self, file, scale: float) -> None:
        """load_lora_weights + fuse_lora(lora_scale=scale), as a diffusers user applies a LoRA."""
        self.pipe.load_lora_weights(str(Path(file).parent), weight_name=Path(file).name,
                                    adapter_name="demo")
        self.pipe.fuse_lora(lora_scale=scale, adapter_names=["demo"])

    def __call__(self, prompts: list[str], lat: np.ndarray, steps: int) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.pipe(prompts, num_inference_steps=steps, guidance_scale=self.guidance,
                            latents=torch.from_numpy(lat), output_type="np").images
        return list((out * 255).round().astype(np.uint8))


class BundleDrawer:
    """The exported demo bundle through the lean runtime, ``Pipeline(bundle, loras=[(file,
    scale)])``; a runtime without LoRA support stops with a message saying so."""

    def __init__(self, bundle: Path, lora):
        from ldm_edge.runtime.pipeline import Pipeline

        check_runtime_lora()
        self.pipe = Pipeline(bundle) if lora is None else Pipeline(
            bundle, loras=[(str(lora[0]), float(lora[1]))])
        self.guidance = float(self.pipe.manifest.schema.defaults.guidance_scale)

    def __call__(self, prompts: list[str], lat: np.ndarray, steps: int) -> list[np.ndarray]:
        r = self.pipe(prompts, num_inference_steps=steps, guidance_scale=self.guidance,
                      scheduler="ddim", latents=lat)
        return list(r.images)


def check_runtime_lora() -> None:
    """Stop with one line where the runtime's Pipeline cannot take a LoRA yet."""
    from ldm_edge.runtime.pipeline import Pipeline

    if "loras" not in inspect.signature(Pipeline).parameters:
        raise SystemExit("eval-lora: error: this ldm-edge's runtime Pipeline takes no loras= yet "
                         "(`ldm-run --lora`); use --reference diffusers")


def drawer(args, lora):
    if args.bundle is not None:
        return BundleDrawer(args.bundle, lora)
    return DiffusersDrawer(args.weights, lora)


def draw_all(draw, prompts: list[str], steps: int, seed: int, label: str) -> np.ndarray:
    images = []
    for i in range(0, len(prompts), BATCH):
        chunk = prompts[i:i + BATCH]
        images.extend(draw(chunk, latents(len(chunk), seed + i), steps))
        print(f"\r{label}: {len(images)}/{len(prompts)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.stack(images)


# -- the measurement ---------------------------------------------------------------------------
def measure(args) -> dict:
    new = L.heldout_new_prompts(args.n, args.seed)
    base = heldout_prompts(args.n, args.seed)
    sets = {"new": new, "base": base}
    result = {}
    for with_lora in (False, True):
        draw = drawer(args, (args.lora, args.scale) if with_lora else None)
        for name, pairs in sets.items():
            images = draw_all(draw, [p for p, _ in pairs], args.steps, args.seed,
                              f"{name} prompts, {'with' if with_lora else 'without'} LoRA")
            s = score(images, [a for _, a in pairs], WITH_LORA_POSITIONS)
            s["read_positions"] = dict(Counter(detect(im, WITH_LORA_POSITIONS)["position"] for im in images))
            result[(name, with_lora)] = s
    return result


def report(result: dict, args) -> str:
    what = f"bundle {args.bundle}" if args.bundle is not None else "diffusers (load_lora_weights + fuse_lora)"
    lines = [f"{what}; LoRA {Path(args.lora).name} at scale {args.scale}; {args.steps} DDIM steps; "
             f"the same latents with and without",
             f"{'prompts':<34}{'LoRA':<9}{'colour':>8}{'shape':>8}{'position':>10}{'all three':>11}"]
    names = {"new": f"held-out '{L.NEW_POSITION}' (n={args.n})", "base": f"base held-out (n={args.n})"}
    for name in ("new", "base"):
        for with_lora in (False, True):
            s = result[(name, with_lora)]
            lines.append(f"{names[name]:<34}{'with' if with_lora else 'without':<9}"
                         + "".join(f"{100 * s[k]:>7.1f}%" for k in ("colour", "shape"))
                         + f"{100 * s['position']:>9.1f}%{100 * s['all']:>10.1f}%")
    for with_lora in (False, True):
        read = result[("new", with_lora)]["read_positions"]
        lines.append(f"'{L.NEW_POSITION}' prompts {'with' if with_lora else 'without'} LoRA, positions read: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(read.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def draw_pair(args) -> None:
    """`make demo-lora`: one prompt without and with the LoRA, side by side, same latents."""
    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lat = latents(1, args.seed)
    tiles = []
    for with_lora in (False, True):
        draw = drawer(args, (args.lora, args.scale) if with_lora else None)
        img = draw([args.prompt], lat, args.steps)[0]
        path = out / f"demo-lora-{'with' if with_lora else 'without'}.png"
        Image.fromarray(img).save(path)
        got = detect(img, WITH_LORA_POSITIONS)
        print(f"wrote {path}: the evaluator reads {got['colour']} {got['shape']}, {got['position']}")
        tiles.append(img)
    pair = np.concatenate(tiles, axis=1)
    path = out / "demo-lora.png"
    Image.fromarray(pair).resize((pair.shape[1] * 4, pair.shape[0] * 4), Image.NEAREST).save(path)
    how = f"bundle {args.bundle}" if args.bundle is not None else "diffusers"
    print(f"wrote {path}: {args.prompt!r}, seed {args.seed}, without | with the LoRA ({how})")


def main(argv=None) -> None:
    from .sample_torch import DEFAULT_WEIGHTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="held-out prompts per set")
    ap.add_argument("--lora", type=Path, default=DEFAULT_LORA)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="the demo model (diffusers)")
    ap.add_argument("--reference", choices=["diffusers"], default="diffusers",
                    help="draw with diffusers in PyTorch (the default; --bundle draws with the runtime)")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="draw with the lean runtime from this demo bundle instead "
                         "(needs Pipeline(..., loras=...))")
    ap.add_argument("--draw", action="store_true", help="draw --prompt without and with the LoRA into --out")
    ap.add_argument("--prompt", default=DRAW_PROMPT)
    ap.add_argument("--out", default="out")
    args = ap.parse_args(argv)
    if not args.lora.is_file():
        sys.exit(f"eval-lora: error: LoRA file {args.lora} not found; train one with "
                 f"`python -m ldm_edge.demo.train_lora`")
    if args.bundle is not None and not (args.bundle / "manifest.json").is_file():
        sys.exit(f"eval-lora: error: {args.bundle} is not a bundle (no manifest.json); "
                 f"`ldm-export onnx -o {args.bundle}` makes the demo's")
    if args.bundle is not None:
        check_runtime_lora()  # before drawing anything
    import torch

    torch.set_num_threads(args.threads)
    if args.draw:
        draw_pair(args)
        return
    print(report(measure(args), args))


if __name__ == "__main__":
    main()
