"""The committed demo ControlNet (demo/weights/controlnet, demo/train_controlnet.py) exported
with the demo model (``ldm-export onnx --controlnet canny=demo/weights/controlnet``) and drawn
by the lean runtime with ``control_preprocess="canny"`` from a rendered picture, as
``ldm-run --control canny:photo.png --control-preprocess canny`` does: the shape lands where
the picture's edges put it far more often with the ControlNet than without, from the same
latents (onnxruntime threads pinned, fixed cases: the same numbers on every run)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="needs torch (pip install .[export])")
pytest.importorskip("cv2", reason="--control-preprocess canny needs OpenCV (pip install .[control])")

from ldm_edge.demo import eval_controlnet as EC  # noqa: E402
from ldm_edge.demo import train_controlnet as TC  # noqa: E402
from ldm_edge.export.load import default_source  # noqa: E402

CONTROLNET = EC.DEFAULT_CONTROLNET
pytestmark = pytest.mark.skipif(
    default_source() is None or not (CONTROLNET / "config.json").is_file(),
    reason="demo weights or the demo ControlNet not in this checkout")

THREADS = 1  # onnxruntime intra-op threads: one, so every run sums in the same order
N_CASES = 8  # EC.cases(N_CASES): fixed photos and prompts (EC.CASES_SEED), seed-0 latents
SET = "conflict"  # the prompt names the photo's shape at another position than its edges
# Bars out of N_CASES, from `python -m ldm_edge.demo.eval_controlnet --n 100 --threads 1`
# (docs/controlnet.md, the demo ControlNet): over the 12 blocks of 8 conflict cases, the
# control position was read in 7 to 8 of 8 with the ControlNet (98 of 100; these 8 cases, the
# first block: 7) and in 0 of 8 in every block without (the prompt's position: 100 of 100).
MIN_HITS_WITH = 6  # one under the worst block measured, for other CPUs' kernels; 6 of 8 is 75 %
MAX_HITS_WITHOUT = 1  # measured 0 everywhere; 1 leaves one borderline read, still far from 6


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from helpers import run_cli

    out = tmp_path_factory.mktemp("demo-cn") / "bundle"
    r = run_cli("-m", "ldm_edge.export.cli", "onnx", "-o", str(out),
                "--controlnet", f"{EC.CONTROL_NAME}={CONTROLNET}")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_the_committed_controlnet_is_small_and_fits_the_demo_vae():
    cfg = json.loads((CONTROLNET / "config.json").read_text())
    assert cfg["_class_name"] == "ControlNetModel"
    # one stride-2 conv between each pair of channels: 2^(k-1) must be the demo VAE's factor 8
    assert 2 ** (len(cfg["conditioning_embedding_out_channels"]) - 1) == 8
    size = sum(f.stat().st_size for f in CONTROLNET.iterdir() if f.is_file())
    assert size <= TC.MAX_DIR_BYTES


def test_the_controlnet_is_not_part_of_the_demo_models_hash():
    """demo/weights/controlnet sits beside the model (as lora/): adding or retraining it must not
    make `make demo` or `make eval-demo` re-export the plain demo bundle."""
    from ldm_edge.export.load import _weight_files

    files = _weight_files(default_source())
    assert files and not any("controlnet" in q.relative_to(default_source()).parts for q in files)


def test_the_controlnet_puts_the_shape_where_the_edges_are(bundle):
    draw = EC.Drawer(bundle, threads=THREADS)
    items = EC.cases(N_CASES)[SET]
    res = {}
    for with_control in (False, True):
        images = [draw(c["prompt"], EC.latents(i, 0), c["photo"] if with_control else None)
                  for i, c in enumerate(items)]
        res[with_control] = EC.read(images, items)
    hits = {k: round(v["control position"] * N_CASES) for k, v in res.items()}
    assert hits[True] >= MIN_HITS_WITH, res
    assert hits[False] <= MAX_HITS_WITHOUT, res
