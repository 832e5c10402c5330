"""A one-shot pipeline (ldm-run's) opens a float graph it calls only a few times without
onnxruntime's weight pre-packing, and draws the same picture as a pipeline that pre-packs."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from ldm_edge.runtime import pipeline as pipeline_module
from ldm_edge.runtime.backends.prepack import ENV, MIN_CALLS
from ldm_edge.runtime.cli import run as cli
from ldm_edge.runtime.pipeline import Pipeline

# No pre-packing changes the order of the float sums in a MatMul (max-abs ~1e-6 on real
# graphs); through a few steps of the tiny model that may move a pixel by one level of 255.
MAX_LEVELS_APART = 1


@pytest.fixture
def opened(monkeypatch):
    """{component: True where its session opened without pre-packing}, for every pipeline
    the test makes, ldm-run's included."""
    monkeypatch.setenv(ENV, "auto")
    seen = {}
    real = pipeline_module.open_bundle_component

    def provide(manifest, name, options, lora):
        b = real(manifest, name, options, lora)
        seen[name] = _not_prepacked(b.session)
        return b
    monkeypatch.setattr(pipeline_module, "open_bundle_component", provide)
    return seen


def _not_prepacked(session) -> bool:
    try:  # onnxruntime raises for a key never set
        return session.get_session_options().get_session_config_entry(
            "session.disable_prepacking") == "1"
    except RuntimeError:
        return False


def _draw(bundle, steps: int, **kw):
    return Pipeline(bundle, threads=1, **kw)("a red cat", num_inference_steps=steps, seed=3,
                                             height=64, width=64).images[0]


def test_one_shot_skips_prepacking_only_where_it_does_not_pay(tiny_bundles, opened):
    few = _draw(tiny_bundles["sd1"], 3, one_shot=True)
    assert opened == {"text_encoder": True, "unet": True, "vae_decoder": True}
    opened.clear()
    packed = _draw(tiny_bundles["sd1"], 3)  # a pipeline kept for many requests
    assert opened == {"text_encoder": False, "unet": False, "vae_decoder": False}
    opened.clear()
    _draw(tiny_bundles["sd1"], MIN_CALLS, one_shot=True)  # enough steps to pay for packing
    assert opened["unet"] is False and opened["text_encoder"] is True
    assert np.abs(few.astype(int) - packed.astype(int)).max() <= MAX_LEVELS_APART


def test_ldm_run_opens_its_pipeline_one_shot(tiny_bundles, opened, tmp_path):
    r = CliRunner().invoke(cli.main, [str(tiny_bundles["sd1"]), "-p", "a red cat", "--steps", "2",
                                      "--height", "64", "--width", "64", "-q",
                                      "-o", str(tmp_path / "o.png")])
    assert r.exit_code == 0, r.output
    assert opened["unet"] is True and opened["text_encoder"] is True
