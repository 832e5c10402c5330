"""Measure the demo ControlNet: does the shape land where the control edges put it?

    python -m ldm_edge.demo.eval_controlnet [--n 100] [--scale 1.0]   # the measurement
    python -m ldm_edge.demo.eval_controlnet --grid [--out out]        # docs/controlnet-demo.png

Everything is drawn by the lean runtime (``ldm_edge.runtime.pipeline.Pipeline``) from the demo
bundle exported with the demo ControlNet (``ldm-export onnx -o out/demo-controlnet-bundle
--controlnet canny=demo/weights/controlnet``; made here when missing or stale), each case
without and with the ControlNet from the same initial latents. The control image is given as a
user gives it: a rendered demo picture (the "photo") with ``control_preprocess="canny"``
(``ldm-run --control canny:photo.png --control-preprocess canny``).

Two sets of N cases, the photo of a random combination (dataset.all_combinations) each:

* ``conflict``: the prompt names the photo's colour, shape and background at *another*
  position, so the prompt and the edges disagree on where the shape goes;
* ``edges only``: the empty prompt; the edges alone say where the shape is and what it is.

The evaluator (evaluate.detect) reads each picture; the rates are the share whose position is
the photo's (the control's), whose position is the prompt's, and whose shape is the photo's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from . import dataset as D
from .evaluate import detect

HERE = Path(__file__).resolve().parent
DEFAULT_CONTROLNET = HERE / "weights" / "controlnet"
DEFAULT_BUNDLE = Path("out") / "demo-controlnet-bundle"
CONTROL_NAME = "canny"  # the bundle's name for it: --control canny:IMAGE
CASES_SEED = 20261206  # fixed: which photos and prompts the sets hold
LATENT_SHAPE = (1, 4, 8, 8)  # the demo model's latents at 64x64
BLOCK = 8  # the report gives the hit counts of consecutive blocks of this many cases (the test's size)
# the docs' picture: a photo and a prompt that puts the same shape elsewhere (grid rows)
GRID_CASES = (
    (("red", "circle", "top left", "white"), "a red circle in the bottom right on a white background"),
    (("blue", "square", "bottom right", "gray"), "blue square, top left, gray background"),
    (("yellow", "triangle", "top right", "black"), "a yellow triangle in the center on a black background"),
)
DOCS_PHOTO = (("red", "circle", "top left", "white"), 5)  # the worked example's photo: combo, render seed


def render(combo, seed: int) -> np.ndarray:
    return D.render(D.combo_attrs(combo), np.random.default_rng(seed))


def cases(n: int, seed: int = CASES_SEED) -> dict[str, list[dict]]:
    """N conflict cases and N edges-only cases: {photo, control attrs, prompt, prompt attrs}."""
    rng = np.random.default_rng(seed)
    combos = D.all_combinations()
    out: dict[str, list[dict]] = {"conflict": [], "edges only": []}
    for name in out:
        for _ in range(n):
            combo = combos[int(rng.integers(len(combos)))]
            attrs = D.combo_attrs(combo)
            photo = D.render(attrs, rng)
            if name == "conflict":
                others = [p for p in D.POSITIONS if p != attrs["position"]]
                want = dict(attrs, position=others[int(rng.integers(len(others)))])
                prompt = D.caption(want, rng)
            else:
                want, prompt = None, ""
            out[name].append({"photo": photo, "control": attrs, "prompt": prompt, "asked": want})
    return out


def latents(i: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + i).standard_normal(LATENT_SHAPE, dtype=np.float32)


# -- the bundle ---------------------------------------------------------------------------------
def bundle_is_current(bundle: Path, controlnet: Path) -> bool:
    """The bundle holds the demo model's current weights and this ControlNet."""
    from ldm_edge.export.load import _weight_files, default_source
    from ldm_edge.export.model_facts import hash_files

    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return False
    m = json.loads(manifest.read_text())
    files = [q for q in controlnet.rglob("*") if q.is_file() and q.suffix in (".json", ".safetensors", ".bin")]
    have = (m.get("controlnets") or {}).get(CONTROL_NAME) or {}
    return (m["model"]["sha256"] == hash_files(_weight_files(default_source()))
            and have.get("sha256") == hash_files(files))


def export_command(bundle: Path, controlnet: Path) -> list[str]:
    """`ldm-export onnx -o BUNDLE --controlnet canny=DIR --force` (the demo model is the default SOURCE)."""
    return [str(Path(sys.executable).with_name("ldm-export")), "onnx", "-o", str(bundle),
            "--controlnet", f"{CONTROL_NAME}={controlnet}", "--force"]


def ensure_bundle(bundle: Path, controlnet: Path) -> None:
    if bundle_is_current(bundle, controlnet):
        return
    cmd = export_command(bundle, controlnet)
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd)
    if r.returncode:
        sys.exit(r.returncode)


class Drawer:
    """The bundle through the lean runtime; ``photo`` None: no control (the residuals fed zeros)."""

    def __init__(self, bundle: Path, threads: int = 0, steps: int = 25, scale: float = 1.0):
        from ldm_edge.runtime.pipeline import Pipeline

        self.pipe = Pipeline(bundle, threads=threads)
        self.guidance = float(self.pipe.manifest.schema.defaults.guidance_scale)
        self.steps, self.scale = steps, scale

    def __call__(self, prompt: str, lat: np.ndarray, photo: np.ndarray | None) -> np.ndarray:
        control = {} if photo is None else {"control": [(CONTROL_NAME, photo, self.scale)],
                                            "control_preprocess": "canny"}
        r = self.pipe(prompt, num_inference_steps=self.steps, guidance_scale=self.guidance,
                      scheduler="ddim", latents=lat, **control)
        return r.images[0]


# -- the measurement ----------------------------------------------------------------------------
def read(images, items) -> dict:
    got = [detect(im) for im in images]
    n = max(len(items), 1)
    hits = [g["position"] == c["control"]["position"] for g, c in zip(got, items)]
    res = {"control position": sum(g["position"] == c["control"]["position"] for g, c in zip(got, items)) / n,
           "control shape": sum(g["shape"] == c["control"]["shape"] for g, c in zip(got, items)) / n,
           "n": len(items), "positions read": dict(Counter(str(g["position"]) for g in got)),
           "hits": hits}
    if items and items[0]["asked"] is not None:
        res["prompt position"] = sum(g["position"] == c["asked"]["position"] for g, c in zip(got, items)) / n
    return res


def measure(draw: Drawer, n: int, seed: int = 0, progress: bool = True) -> dict:
    result = {}
    for name, items in cases(n).items():
        for with_control in (False, True):
            images = []
            for i, c in enumerate(items):
                images.append(draw(c["prompt"], latents(i, seed), c["photo"] if with_control else None))
                if progress:
                    print(f"\r{name}, {'with' if with_control else 'without'} ControlNet: "
                          f"{i + 1}/{n}", end="", file=sys.stderr, flush=True)
            if progress:
                print(file=sys.stderr)
            result[(name, with_control)] = read(images, items)
    return result


def report(result: dict, args) -> str:
    lines = [f"bundle {args.bundle}, ControlNet {CONTROL_NAME!r} at scale {args.scale}, {args.steps} DDIM "
             f"steps, the same latents with and without",
             f"{'cases':<22}{'ControlNet':<12}{'control position':>18}{'prompt position':>17}{'control shape':>15}"]
    for (name, with_control), s in result.items():
        pp = f"{100 * s['prompt position']:.1f}%" if "prompt position" in s else "-"
        label = f"{name} (n={s['n']})"
        lines.append(f"{label:<22}{'with' if with_control else 'without':<12}"
                     f"{100 * s['control position']:>17.1f}%{pp:>17}{100 * s['control shape']:>14.1f}%")
    for (name, with_control), s in result.items():
        lines.append(f"{name}, {'with' if with_control else 'without'}: positions read "
                     + ", ".join(f"{k} {v}" for k, v in sorted(s["positions read"].items(), key=lambda kv: -kv[1])))
    for (name, with_control), s in result.items():  # the spread a small sample sees (the test's 8)
        blocks = [sum(s["hits"][i:i + BLOCK]) for i in range(0, len(s["hits"]) - BLOCK + 1, BLOCK)]
        if blocks:
            lines.append(f"{name}, {'with' if with_control else 'without'}: control position in "
                         f"blocks of {BLOCK} cases: {min(blocks)}..{max(blocks)} (first: {blocks[0]})")
    return "\n".join(lines)


# -- the docs' picture --------------------------------------------------------------------------
def grid(draw: Drawer, out: Path, seed: int = 0) -> Path:
    """Rows of GRID_CASES: photo | its canny edges | without | with the ControlNet, 4x upscaled.
    Also writes the worked example's photo (out/controlnet-photo.png)."""
    from PIL import Image

    from ldm_edge.runtime.control_preprocess import Preprocess

    out.mkdir(parents=True, exist_ok=True)
    combo, render_seed = DOCS_PHOTO
    Image.fromarray(render(combo, render_seed)).save(out / "controlnet-photo.png")
    rows = []
    for i, (combo, prompt) in enumerate(GRID_CASES):
        photo = render(combo, i)
        lat = latents(i, seed)
        without, with_cn = draw(prompt, lat, None), draw(prompt, lat, photo)
        for label, im in (("without", without), ("with", with_cn)):
            g = detect(im)
            print(f"{prompt!r}, photo {combo[2]}: {label} the ControlNet the evaluator reads "
                  f"{g['colour']} {g['shape']}, {g['position']}")
        sep = np.full((64, 2, 3), 255, np.uint8)
        rows.append(np.concatenate([photo, sep, Preprocess("canny").apply(photo), sep, without, sep,
                                    with_cn], axis=1))
    sep = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    img = np.concatenate([x for r in rows for x in (r, sep)][:-1], axis=0)
    path = out / "controlnet-demo.png"
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)
    print(f"wrote {path} and {out / 'controlnet-photo.png'}")
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="cases per set")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                    help="the demo bundle with the ControlNet (exported here when missing or stale)")
    ap.add_argument("--controlnet", type=Path, default=DEFAULT_CONTROLNET)
    ap.add_argument("--scale", type=float, default=1.0, help="the ControlNet's conditioning scale")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0, help="of the initial latents")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    ap.add_argument("--grid", action="store_true", help="draw the docs' picture into --out instead")
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args(argv)
    if not (args.controlnet / "config.json").is_file():
        sys.exit(f"eval-controlnet: error: no ControlNet in {args.controlnet}; train it with "
                 f"`python -m ldm_edge.demo.train_controlnet`")
    ensure_bundle(args.bundle, args.controlnet)
    draw = Drawer(args.bundle, args.threads, args.steps, args.scale)
    if args.grid:
        grid(draw, args.out, args.seed)
        return
    print(report(measure(draw, args.n, args.seed), args))


if __name__ == "__main__":
    main()
