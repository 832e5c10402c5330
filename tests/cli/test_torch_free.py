"""``ldm-export fp16``, ``int8`` and ``import-optimum`` run where PyTorch is not installed
(Jetsons): each runs in a subprocess in which importing torch, diffusers or transformers
fails, as ``engines`` does in test_engines_cli.py."""

from __future__ import annotations

import importlib
import json

from helpers import run_cli

HEAVY = ("torch", "diffusers", "transformers")
# A None in sys.modules makes `import torch` raise ImportError, as on a machine without it.
NO_TORCH = (f"import sys; sys.modules.update(dict.fromkeys({HEAVY!r})); "
            "from ldm_edge.export.cli import main; main()")


def ldm_export_without_torch(*args):
    r = run_cli("-c", NO_TORCH, *args, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_the_blocker_blocks():
    r = run_cli("-c", NO_TORCH.replace("from ldm_edge.export.cli import main; main()",
                                       "import torch"))
    assert r.returncode != 0 and "import of torch halted" in r.stderr


def test_fp16_without_torch(bundle):
    r = ldm_export_without_torch("fp16", str(bundle), "--num-prompts", "1", "--steps", "2")
    assert "fp16 end to end" in r.stdout
    m = manifest(bundle)
    assert "fp16" in m["components"]["unet"]["variants"] and "fp16" in m["quality"]


def test_int8_without_torch(bundle):
    r = ldm_export_without_torch("int8", str(bundle), "--num-prompts", "1", "--calib-steps", "2")
    assert "int8 end to end" in r.stdout
    m = manifest(bundle)
    assert "int8" in m["components"]["unet"]["variants"] and "int8" in m["quality"]


def test_import_optimum_without_torch(tiny_models, tmp_path):
    # the folder is made with torch here, in the test process; the import runs without it
    builder = importlib.import_module("parity.test_optimum_import")
    folder = builder.make_optimum_folder(tiny_models["sd2"], tmp_path / "optimum", "v2")
    out = tmp_path / "bundle"
    ldm_export_without_torch("import-optimum", str(folder), "-o", str(out))
    assert set(manifest(out)["components"]) >= {"text_encoder", "unet", "vae_decoder"}


def test_int8_is_registered_when_run_as_a_module():
    r = run_cli("-m", "ldm_edge.export.cli", "int8", "--help")
    assert r.returncode == 0 and "--calib-steps" in r.stdout
