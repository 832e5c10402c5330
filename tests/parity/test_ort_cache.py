"""The onnxruntime graph cache (runtime/backends/ort_cache.py): the cached optimised graph draws the
same picture as optimising afresh, damaged entries are made again, a cache that cannot
be written (or would fill the disk) is skipped, the cache keeps within its bound, and it is on
unless turned off (tests/conftest.py turns it off for the rest of the suite)."""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import pytest

from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.backends.ort_cache import DATA, ENTRY, MODEL, STALE_S, GraphCache, graph_key
from ldm_edge.runtime.pipeline import Pipeline

PROMPT = "a photo of a cat"
COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LDM_EDGE_ORT_CACHE", raising=False)
    # the cache's mechanics on the plain graphs these tests change and key by; that the
    # fused-attention forms go through the cache too is test_fused_attention.py's
    monkeypatch.setenv("LDM_EDGE_FUSED_ATTENTION", "0")
    return tmp_path / "cache" / "ort-graphs"


def _draw(bundle, **kw):
    pipe = Pipeline(bundle, device="cpu", **kw)
    img = pipe(PROMPT, num_inference_steps=3, seed=0).images
    states = {c: getattr(pipe.backend(c), "cache_state", None) for c in COMPONENTS}
    pipe.close()
    return img, states


def _key(bundle, component):

    return graph_key(open_bundle(bundle).variant(component, "fp32").path)


def _entries(root):
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_cached_graph_draws_the_same_picture(tiny_bundles, cache_root):
    plain, states = _draw(tiny_bundles["sd1"], ort_cache=False)
    assert set(states.values()) == {"off"} and not cache_root.exists()
    miss, states = _draw(tiny_bundles["sd1"], ort_cache=True)
    assert set(states.values()) == {"miss"}
    entries = _entries(cache_root)
    assert len(entries) == len(COMPONENTS)
    for e in entries:
        sizes = json.loads((e / ENTRY).read_text())["sizes"]
        assert MODEL in sizes and all((e / n).stat().st_size == s for n, s in sizes.items())
    hit, states = _draw(tiny_bundles["sd1"], ort_cache=True)
    assert set(states.values()) == {"hit"}
    assert np.array_equal(plain, miss) and np.array_equal(plain, hit)


@pytest.fixture(scope="module")
def reduced_precision_bundle(tiny_bundles, tmp_path_factory):
    import shutil

    from ldm_edge.calibration import int8
    from ldm_edge.calibration import fp16

    dst = tmp_path_factory.mktemp("cache-precisions") / "sd1"
    shutil.copytree(tiny_bundles["sd1"], dst)
    prompts = ["a red cat", "a blue square on a white background"]
    fp16.make_fp16(dst, prompts, steps=4)
    int8.make_int8(dst, prompts, calib_steps=4, method="percentile", progress=lambda msg: None)
    return dst


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_cached_reduced_precision_graphs(precision, reduced_precision_bundle, cache_root):
    """FP16 graphs and Q/DQ graphs (fused into int8 kernels by the optimiser) survive the
    round trip through the saved optimised graph."""
    plain, _ = _draw(reduced_precision_bundle, precision=precision, ort_cache=False)
    miss, states = _draw(reduced_precision_bundle, precision=precision, ort_cache=True)
    hit, states2 = _draw(reduced_precision_bundle, precision=precision, ort_cache=True)
    assert states["unet"] == "miss" and states2["unet"] == "hit"
    assert np.array_equal(plain, miss) and np.array_equal(plain, hit)


def test_on_by_default_and_the_environment_turns_it_off(tiny_bundles, cache_root, monkeypatch):
    _, states = _draw(tiny_bundles["sd1"])  # LDM_EDGE_ORT_CACHE unset
    assert set(states.values()) == {"miss"}
    monkeypatch.setenv("LDM_EDGE_ORT_CACHE", "0")
    _, states = _draw(tiny_bundles["sd1"])
    assert set(states.values()) == {"off"}
    _, states = _draw(tiny_bundles["sd1"], ort_cache=True)  # the argument wins
    assert set(states.values()) == {"hit"}
    monkeypatch.setenv("LDM_EDGE_ORT_CACHE", "1")
    _, states = _draw(tiny_bundles["sd1"], ort_cache=False)
    assert set(states.values()) == {"off"}


@pytest.mark.parametrize("damage", ["truncated_data", "no_entry_record", "garbage_same_size"])
def test_damaged_entry_is_made_again(damage, tiny_bundles, cache_root, caplog):
    plain, _ = _draw(tiny_bundles["sd1"], ort_cache=False)
    _draw(tiny_bundles["sd1"], ort_cache=True)
    unet_entry = cache_root / _key(tiny_bundles["sd1"], "unet")
    if damage == "truncated_data":
        with open(unet_entry / DATA, "r+b") as f:
            f.truncate(1000)
    elif damage == "no_entry_record":
        (unet_entry / ENTRY).unlink()
    else:
        size = (unet_entry / MODEL).stat().st_size
        (unet_entry / MODEL).write_bytes(b"\xff" * size)
    with caplog.at_level(logging.WARNING):
        img, states = _draw(tiny_bundles["sd1"], ort_cache=True)
    assert states["unet"] == "miss" and states["text_encoder"] == "hit"
    assert np.array_equal(img, plain)
    assert "making it again" in caplog.text
    _, states = _draw(tiny_bundles["sd1"], ort_cache=True)
    assert states["unet"] == "hit"


def test_unwritable_cache_is_skipped_with_a_warning(tiny_bundles, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LDM_EDGE_CACHE", str(blocker / "cache"))
    plain, _ = _draw(tiny_bundles["sd1"], ort_cache=False)
    with caplog.at_level(logging.WARNING):
        img, states = _draw(tiny_bundles["sd1"], ort_cache=True)
    assert set(states.values()) == {"off"} and np.array_equal(img, plain)
    assert "cannot write" in caplog.text


def test_a_changed_graph_gets_its_own_entry(tiny_bundles, cache_root, tmp_path):
    import shutil

    import onnx

    other = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], other)
    _draw(tiny_bundles["sd1"], ort_cache=True)
    _, states = _draw(other, ort_cache=True)  # same files, other place: same entries
    assert set(states.values()) == {"hit"}
    graph = onnx.load(other / "unet.onnx")
    w = next(t for t in graph.graph.initializer if t.raw_data and t.data_type == onnx.TensorProto.FLOAT)
    values = np.frombuffer(w.raw_data, np.float32).copy()
    values[0] += 1e-3  # other weights, same size: the manifest's hash no longer holds
    w.raw_data = values.tobytes()
    onnx.save(graph, other / "unet.onnx")
    _, states = _draw(other, ort_cache=True, verify=False)
    assert states == {"text_encoder": "hit", "unet": "miss", "vae_decoder": "hit"}
    assert len(_entries(cache_root)) == len(COMPONENTS) + 1


def test_stale_staging_folders_are_removed(tmp_path):
    cache = GraphCache(tmp_path)
    old, fresh = tmp_path / ".dead.partial", tmp_path / ".busy.partial"
    old.mkdir(), fresh.mkdir()
    past = time.time() - STALE_S - 60
    os.utime(old, (past, past))
    staged = cache.stage("k")
    assert not old.exists() and fresh.exists() and staged.is_dir()


def test_cli_flag(tiny_bundles, tmp_path):
    from helpers import run_cli

    env = {"LDM_EDGE_CACHE": str(tmp_path / "cache")}
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.png"
        r = run_cli("-m", "ldm_edge.runtime", str(tiny_bundles["sd1"]), "-p", PROMPT, "--steps", "2",
                    "--seed", "0", "-q", "--ort-cache", "-o", str(out), env_extra=env)
        assert r.returncode == 0, r.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert len(_entries(tmp_path / "cache" / "ort-graphs")) == len(COMPONENTS)


def test_cli_caches_by_default_and_says_so_once(tiny_bundles, tmp_path):
    from helpers import run_cli

    env = {"LDM_EDGE_CACHE": str(tmp_path / "cache"), "LDM_EDGE_ORT_CACHE": ""}
    args = ["-m", "ldm_edge.runtime", str(tiny_bundles["sd1"]), "-p", PROMPT, "--steps", "2",
            "--seed", "0"]
    root = tmp_path / "cache" / "ort-graphs"
    first = run_cli(*args, "-o", str(tmp_path / "a.png"), env_extra=env)
    assert first.returncode == 0, first.stderr
    assert len(_entries(root)) == len(COMPONENTS)
    assert "kept onnxruntime's optimised" in first.stderr and str(root) in first.stderr
    second = run_cli(*args, "-o", str(tmp_path / "b.png"), env_extra=env)
    assert second.returncode == 0 and "kept onnxruntime's" not in second.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    off = run_cli(*args, "--no-ort-cache", "-o", str(tmp_path / "c.png"),
                  env_extra={**env, "LDM_EDGE_CACHE": str(tmp_path / "other")})
    assert off.returncode == 0 and not (tmp_path / "other" / "ort-graphs").exists()


def _fake_entry(root, name: str, size: int, age_s: float):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / MODEL).write_bytes(b"x" * size)
    (folder / ENTRY).write_text("{}")
    past = time.time() - age_s
    os.utime(folder / ENTRY, (past, past))
    return folder


def test_trim_keeps_the_cache_within_its_bound_least_recently_used_first(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_EDGE_ORT_CACHE_MAX_GB", str(2500 / 1e9))  # 2 500 bytes
    old = _fake_entry(tmp_path, "old", 1000, 300)
    mid = _fake_entry(tmp_path, "mid", 1000, 200)
    new = _fake_entry(tmp_path, "new", 1000, 100)
    keep = _fake_entry(tmp_path, "keep", 1000, 400)  # the oldest, but just written
    GraphCache(tmp_path).trim(keep="keep")
    assert not old.exists() and not mid.exists() and new.exists() and keep.exists()


def test_a_hit_counts_as_recent_use(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_EDGE_ORT_CACHE_MAX_GB", str(2500 / 1e9))
    used = _fake_entry(tmp_path, "used", 1000, 300)
    (used / ENTRY).write_text(json.dumps({"sizes": {MODEL: 1000}}))
    os.utime(used / ENTRY, (time.time() - 300, time.time() - 300))
    other = _fake_entry(tmp_path, "other", 1000, 200)
    cache = GraphCache(tmp_path)
    assert cache.lookup("used") == used / MODEL
    _fake_entry(tmp_path, "keep", 1000, 0)
    cache.trim(keep="keep")
    assert used.exists() and not other.exists()


def test_no_entry_where_it_would_fill_the_disk(tiny_bundles, cache_root, monkeypatch, caplog):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12, 2**30))
    plain, _ = _draw(tiny_bundles["sd1"], ort_cache=False)
    with caplog.at_level(logging.WARNING):
        img, states = _draw(tiny_bundles["sd1"], ort_cache=True)
    assert set(states.values()) == {"off"} and np.array_equal(img, plain)
    assert "not enough room" in caplog.text and not _entries(cache_root)
