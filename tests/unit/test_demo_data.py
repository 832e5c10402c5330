"""Fast tests for the demo dataset and the prompt-fidelity evaluator."""
import subprocess
import sys

import numpy as np
import pytest

from ldm_edge.demo import dataset as D
from ldm_edge.demo import evaluate as E

GROUND_TRUTH_BAR = 0.98  # the evaluator must read the dataset's own images this well


def test_train_set_is_deterministic():
    a = D.make_train_set(20, seed=3)
    b = D.make_train_set(20, seed=3)
    c = D.make_train_set(20, seed=4)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (20, 64, 64, 3) and a[0].dtype == np.uint8


def test_heldout_prompts_deterministic_and_heldout():
    p1, p2 = D.heldout_prompts(50, seed=1), D.heldout_prompts(50, seed=1)
    assert p1 == p2
    held = set(D.heldout_combinations())
    assert held and all(D.attrs_combo(a) in held for _, a in p1)


def test_heldout_combos_never_in_train():
    held = set(D.heldout_combinations())
    _, captions, attrs = D.make_train_set(500, seed=0)
    for cap, a in zip(captions, attrs):
        assert D.attrs_combo(a) not in held
        assert D.attrs_combo(E.parse_prompt(cap)) not in held
    assert all(D.attrs_combo(E.parse_prompt(c)) not in held for c in D.all_captions())


def test_every_attribute_value_seen_in_training():
    train = D.train_combinations()
    for i, values in enumerate((D.COLOURS, D.SHAPES, D.POSITIONS, D.BACKGROUNDS)):
        assert {c[i] for c in train} == set(values)


@pytest.mark.parametrize("template", D.TEMPLATES)
def test_parse_prompt_each_template(template):
    for combo in D.all_combinations()[::17]:
        attrs = D.combo_attrs(combo)
        assert E.parse_prompt(template.format(**attrs)) == attrs


def test_parse_prompt_synonyms():
    got = E.parse_prompt("A Red Square in the centre on a grey background")
    assert got == {"colour": "red", "shape": "square", "position": "center", "background": "gray"}


def test_evaluator_on_train_ground_truth():
    images, captions, _ = D.make_train_set(300, seed=11)
    result = E.score(images, captions)
    assert result["all"] >= GROUND_TRUTH_BAR, result


def test_evaluator_on_heldout_ground_truth():
    images, prompts, _ = D.heldout_set(200, seed=5)
    result = E.score(images, prompts)
    assert result["all"] >= GROUND_TRUTH_BAR, result


def test_evaluator_on_blank_image():
    got = E.detect(np.full((64, 64, 3), 128, np.uint8))
    assert got["colour"] is None and got["background"] == "gray"
    assert E.score([np.zeros((64, 64, 3), np.uint8)], ["a red circle in the center on a black background"])["all"] == 0


def test_no_torch_import():
    code = (
        "import sys, ldm_edge.demo.evaluate, ldm_edge.demo.dataset; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
