"""The manifest reader refuses what it must, with messages that say what to do."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from ldm_edge.runtime.errors import BundleError
from ldm_edge.runtime.bundle.opener import open_bundle


@pytest.fixture()
def bundle(tiny_bundles, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], dst)
    return dst


def edit(bundle, fn):
    p = bundle / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def unet_file(m):
    return m["components"]["unet"]["variants"]["fp32"]


def test_whole_bundle_loads(bundle):
    m = open_bundle(bundle)
    assert m.spec("unet").input_names == ["sample", "timestep", "encoder_hidden_states"]


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m.update(format_version=99), "newer than this ldm-edge"),
    (lambda m: m.update(format_version="1"), "not an integer"),
    (lambda m: m.pop("scheduler"), "lacks scheduler"),
    (lambda m: m["components"].pop("unet"), "has no unet"),
    (lambda m: m["components"].update(foo={}), "unknown component"),
    (lambda m: unet_file(m).update(file="/etc/passwd"), "outside the bundle"),
    (lambda m: unet_file(m).update(file="../x.onnx"), "outside the bundle"),
    (lambda m: unet_file(m)["files"][0].update(path="../../x"), "outside the bundle"),
    (lambda m: unet_file(m)["files"][0].update(sha256="0" * 64), "does not match its sha256"),
    (lambda m: unet_file(m)["files"][0].update(size=1), "truncated"),
    (lambda m: m.update(prediction_type="x"), "prediction_type"),
])
def test_bad_manifest_refused(bundle, mutate, needle):
    edit(bundle, mutate)
    with pytest.raises(BundleError, match=needle):
        open_bundle(bundle)


def test_symlink_out_of_bundle_refused(bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.copy(bundle / "unet.onnx", outside)
    (bundle / "unet.onnx").unlink()
    os.symlink(outside, bundle / "unet.onnx")
    with pytest.raises(BundleError, match="link that leads outside"):
        open_bundle(bundle)


def test_damaged_or_missing_files(bundle):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="damaged"):
        open_bundle(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        open_bundle(bundle)


def test_truncated_onnx_refused(bundle):
    data = (bundle / "unet.onnx").read_bytes()
    (bundle / "unet.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        open_bundle(bundle)


def test_hashes_are_remembered_but_a_rewritten_file_is_hashed_again(bundle, monkeypatch):
    from ldm_edge.runtime import fsutil

    open_bundle(bundle)  # fills the cache
    calls = []
    real = fsutil.sha256_file
    monkeypatch.setattr(fsutil, "sha256_file", lambda p: calls.append(p) or real(p))
    open_bundle(bundle)
    assert calls == []  # nothing re-read
    p = bundle / "unet.onnx"
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-100] ^= 0xFF  # same size ...
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime put back
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(bundle)
    assert [os.path.basename(c) for c in calls] == ["unet.onnx"]
