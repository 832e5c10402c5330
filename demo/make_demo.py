"""``make demo``: export the bundled demo model and draw a picture with the lean runtime.

Runs the console scripts exactly as a user would and prints each command. Until the
demo model's weights exist it falls back to a tiny random SD1 model built here (which
draws noise, but proves the whole path).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

DEMO_PROMPT = "a red circle in the top left on a white background"
GRID_PROMPTS = (
    "a red circle in the top left on a white background",
    "blue square, bottom right, gray background",
    "a yellow triangle in the center on a black background",
    "green circle, top right, white background",
)


def sh(*args: str) -> None:
    print("+", " ".join(shlex.quote(a) for a in args), flush=True)
    r = subprocess.run(args)
    if r.returncode:
        sys.exit(r.returncode)


def bin_of(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def ensure_bundle(source: Path | None, bundle: Path) -> None:
    """Export unless the bundle already holds exactly this model."""
    from ldm_edge.export.load import hash_files, _weight_files

    manifest = bundle / "manifest.json"
    if source is not None and manifest.is_file():
        want = hash_files(_weight_files(source))
        m = json.loads(manifest.read_text())
        # a bundle made before LoRA support has no weights map (ldm-run --lora needs one)
        if m["model"]["sha256"] == want and m["components"]["unet"].get("weights_map"):
            print(f"{bundle} is up to date")
            return
    args = [bin_of("ldm-export"), "onnx"] + ([str(source)] if source else []) + ["-o", str(bundle), "--force"]
    sh(*args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out", help="folder for the bundle and the images")
    ap.add_argument("--grid", action="store_true", help="also draw a 2x2 grid of prompts")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from ldm_edge.export.load import default_source

    source = default_source()
    if source is None:
        from ldm_edge.export.tiny import save_tiny

        print("the demo model's weights are not in this checkout; using a tiny random SD1 model")
        source = out / "tiny-sd1"
        if not source.is_dir():
            save_tiny(source, "sd1")
        bundle, prompt = out / "tiny-bundle", "a red cat"
    else:
        bundle, prompt = out / "demo-bundle", DEMO_PROMPT
    ensure_bundle(source, bundle)
    sh(bin_of("ldm-run"), str(bundle), "--prompt", prompt, "--seed", "0", "-o", str(out / "demo.png"))
    if a.grid and bundle.name == "demo-bundle":
        grid(bundle, out / "demo-grid.png")
    print(f"wrote {out / 'demo.png'}: {prompt!r}")


def grid(bundle: Path, path: Path) -> None:
    """The README's sample grid: each prompt once, seed 0, upscaled 4x for viewing."""
    import numpy as np
    from PIL import Image

    from ldm_edge.runtime.pipeline import Pipeline

    pipe = Pipeline(bundle)
    tiles = [pipe(p, seed=0).images[0] for p in GRID_PROMPTS]
    img = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
