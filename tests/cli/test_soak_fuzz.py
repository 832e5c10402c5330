"""Long runs and fuzzing: no growth over 500 images; no input crashes the readers."""

from __future__ import annotations

import json
import shutil
import string
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldm_edge.runtime.errors import LdmEdgeError
from ldm_edge.runtime.manifest import Manifest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

# The reliability issue's bar: RSS may grow by at most 5 % over 500 images after warm-up.
MAX_RSS_GROWTH_PCT = 5.0


@pytest.mark.slow
def test_soak_500_images_no_growth(tiny_bundles, tmp_path):
    from soak import soak

    r = soak(tiny_bundles["sd1"], images=500, steps=1, out_dir=tmp_path)
    print(json.dumps(r))
    assert r["rss_growth_pct"] <= MAX_RSS_GROWTH_PCT, r
    assert r["fds_end"] <= r["fds_after_warmup"], r


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def good_manifest(tiny_bundles):
    return json.loads((tiny_bundles["sd1"] / "manifest.json").read_text())


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_manifest_reader_only_raises_bundle_errors(data, tiny_bundles, good_manifest, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("fz")
    for f in tiny_bundles["sd1"].iterdir():
        (bundle / f.name).symlink_to(f) if f.name != "manifest.json" else None
    m = json.loads(json.dumps(good_manifest))
    paths = list(_paths(m))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = m
        try:
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass
    (bundle / "manifest.json").write_text(json.dumps(m))
    try:
        Manifest.load(bundle, verify=False)
    except LdmEdgeError:
        pass
    shutil.rmtree(bundle)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(opt=st.sampled_from(["--steps", "--height", "--width", "--guidance-scale", "--strength",
                            "--num-images", "--seed", "--scheduler", "--threads", "--precision"]),
       value=st.text(alphabet=string.printable + "é🐱", max_size=12))
def test_fuzz_cli_arguments_never_traceback(opt, value, tiny_bundles, tmp_path_factory):
    from click.testing import CliRunner

    from ldm_edge.runtime.cli import main

    out = tmp_path_factory.mktemp("cli") / "o.png"
    r = CliRunner().invoke(main, [str(tiny_bundles["sd1"]), "-p", "x", "--steps", "1", "-q",
                                  opt, value, "-o", str(out)])
    # click's usage errors exit 2; ours exit with their own code; success writes the file
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    assert (r.exit_code == 0) == out.exists()
