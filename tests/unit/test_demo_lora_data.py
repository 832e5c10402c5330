"""Fast tests for the demo LoRA's data (demo/lora_data.py) and the evaluator's extra position."""
import numpy as np

from ldm_edge.demo import dataset as D
from ldm_edge.demo import evaluate as E
from ldm_edge.demo import lora_data as L

GROUND_TRUTH_BAR = 0.98  # as test_demo_data.py: the evaluator must read the dataset's own images this well


def test_new_position_is_not_a_base_value():
    assert L.NEW_POSITION not in D.POSITIONS
    assert all(c[2] != L.NEW_POSITION for c in D.all_combinations())
    assert E.WITH_LORA_POSITIONS == {**D.POSITIONS, L.NEW_POSITION: D.LORA_POSITIONS[L.NEW_POSITION]}


def test_lora_train_set_is_deterministic_and_never_held_out():
    a = L.make_lora_train_set(60, seed=3)
    b = L.make_lora_train_set(60, seed=3)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    held = set(L.heldout_new_combinations()) | set(D.heldout_combinations())
    new = [x for x in a[2] if x["position"] == L.NEW_POSITION]
    assert len(new) == round(60 * L.NEW_SHARE)
    for cap, attrs in zip(a[1], a[2]):
        assert D.attrs_combo(attrs) not in held
        assert E.parse_prompt(cap, E.WITH_LORA_POSITIONS) == attrs


def test_heldout_new_prompts():
    held = set(L.heldout_new_combinations())
    assert len(held) == round(len(L.new_combinations()) * L.LORA_HELDOUT_FRACTION)
    pairs = L.heldout_new_prompts(30, seed=1)
    assert pairs == L.heldout_new_prompts(30, seed=1)
    assert all(D.attrs_combo(a) in held for _, a in pairs)


def test_evaluator_reads_the_new_position_on_ground_truth():
    rng = np.random.default_rng(5)
    combos = L.new_combinations()
    images = np.stack([D.render(D.combo_attrs(c), rng) for c in combos])
    result = E.score(images, [D.combo_attrs(c) for c in combos], E.WITH_LORA_POSITIONS)
    assert result["all"] >= GROUND_TRUTH_BAR, result
    # the default table has no such position: it reads the nearest base anchor instead
    assert E.detect(images[0])["position"] in D.POSITIONS


def test_default_evaluator_unchanged_by_the_extra_table():
    images, captions, _ = D.make_train_set(100, seed=11)
    plain = [E.detect(im) for im in images]
    extended = [E.detect(im, E.WITH_LORA_POSITIONS) for im in images]
    assert E.parse_prompt("a red circle in the center on a white background")["position"] == "center"
    assert E.parse_prompt("a red circle in the top center on a white background",
                          E.WITH_LORA_POSITIONS)["position"] == "top center"
    # base images read the same position with or without the extra anchor
    assert [p["position"] for p in plain] == [x["position"] for x in extended]
