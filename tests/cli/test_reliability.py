"""Interrupted exports, damaged artifacts and full disks: nothing half-written looks whole."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ldm_edge.runtime.errors import BundleError
from ldm_edge.runtime.bundle.opener import open_bundle

# Points (seconds after start) at which the export is killed: during imports, model
# loading, each component's export and check, and the final rename. The tiny export
# takes ~6-10 s here; a kill after it has finished still has to leave a whole bundle.
KILL_AFTER_S = (0.5, 2.5, 4.0, 5.0, 6.0, 7.0, 8.5, 11.0)


def state(out):
    """'none' (nothing loads), or the manifest's creation stamp of a whole bundle."""
    try:
        return open_bundle(out).schema.created
    except BundleError:
        return "none"


@pytest.mark.slow
def test_kill_9_at_any_point_leaves_old_bundle_or_nothing(tiny_models, tmp_path):
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "ldm_edge.export.cli", "onnx", str(tiny_models["sd1"]), "-o",
           str(out), "--force"]
    previous = "none"
    for delay in KILL_AFTER_S:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        now = state(out)  # open_bundle verifies every hash: what loads is whole
        if now == "none" and previous != "none":
            # killed between moving the old bundle aside and renaming the new one in:
            # the old one must still be on disk, to be put back by the next export
            assert list(tmp_path.glob(".b.old-*")), delay
        if now != "none":
            previous = now
    # a rerun completes and leaves no debris next to the bundle
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    open_bundle(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_disk_full_during_export_one_line_nothing_written(tiny_models, tmp_path, monkeypatch):
    import onnx

    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.runtime.errors import LdmEdgeError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx, "save_model", full)
    with pytest.raises(LdmEdgeError, match="disk full"):
        export_bundle(load_model(tiny_models["sd1"]), tmp_path / "b",
                      ExportOptions(components=("text_encoder",)))
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx_same_size_is_caught_by_hash_and_by_onnxruntime(tiny_bundles, tmp_path):
    import shutil

    from helpers import run_cli

    b = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], b)
    data = bytearray((b / "unet.onnx").read_bytes())
    data[100:4100] = os.urandom(4000)
    (b / "unet.onnx").write_bytes(bytes(data))
    r = run_cli("-m", "ldm_edge.runtime", str(b), "-p", "x", "--steps", "1", "-q", "-o", str(tmp_path / "o.png"))
    assert r.returncode == 3 and "sha256" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("-m", "ldm_edge.runtime", str(b), "-p", "x", "--steps", "1", "-q", "--no-verify",
                "-o", str(tmp_path / "o.png"))
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert ("not a readable ONNX" in r.stderr) or ("cannot load" in r.stderr)


def test_external_data_outside_bundle_refused_before_opening(tiny_bundles, tmp_path):
    import shutil

    import onnx

    b = tmp_path / "b"
    shutil.copytree(tiny_bundles["sd1"], b)
    proto = onnx.load(str(b / "vae_decoder.onnx"))
    onnx.save_model(proto, str(b / "vae_decoder.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    (b / "w.data").rename(tmp_path / "w.data")
    p = onnx.load(str(b / "vae_decoder.onnx"), load_external_data=False)
    for t in p.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.data"
    (b / "vae_decoder.onnx").write_bytes(p.SerializeToString())
    m = json.loads((b / "manifest.json").read_text())
    m["components"]["vae_decoder"]["variants"]["fp32"]["files"] = []
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside the bundle"):
        open_bundle(b)
