"""The variant transaction (bundletools/variant_txn.py): a committed variant is recorded with
its files, an uncommitted one (an exception, a refusal) leaves no file and the manifest as it
was. On a recorded manifest and a one-node graph; the parity tests run it through FP16, INT8
and the fused forms."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest

from ldm_edge.bundletools.variant_txn import VariantTransaction
from ldm_edge.runtime.bundle.schema import (MANIFEST_NAME, QualityRecord, VariantRecord,
                                            read_manifest_json)

DATA = Path(__file__).parent / "data"


def bundle_with(tmp_path: Path, manifest: str) -> Path:
    root = tmp_path / "b"
    root.mkdir()
    shutil.copy(DATA / manifest, root / MANIFEST_NAME)
    return root


@pytest.fixture()
def bundle(tmp_path):
    """A bundle's manifest with FP32 variants only (the files it names are not needed)."""
    return bundle_with(tmp_path, "manifest_v1_sd1.json")


@pytest.fixture()
def bundle_fp16_int8(tmp_path):
    return bundle_with(tmp_path, "manifest_v1_sd1_fp16_int8.json")


@pytest.fixture()
def graph():
    pytest.importorskip("onnx", reason="saving a graph needs onnx (the export extra)")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])],
                                               "g", [x], [y]))


def manifest_bytes(root: Path) -> bytes:
    return (root / MANIFEST_NAME).read_bytes()


def test_commit_records_the_variant_and_keeps_its_files(bundle, graph):
    with VariantTransaction(bundle) as txn:
        files = txn.save(graph, bundle / "unet.fp16.onnx")
        txn.put("unet", "fp16", VariantRecord(file="unet.fp16.onnx"))
        assert "fp16" in txn.manifest().precisions("unet")  # the trial names it ...
        on_disk = read_manifest_json(bundle).components["unet"].variants
        assert "fp16" not in on_disk  # ... the manifest on disk does not
        written = txn.commit(quality={"fp16": QualityRecord(psnr_db=40.0)})
    m = read_manifest_json(bundle)
    assert m.components["unet"].variants["fp16"].file == "unet.fp16.onnx"
    assert m.quality["fp16"].psnr_db == 40.0
    assert written.to_json() == m.to_json()
    assert all(p.is_file() for p in files)


@pytest.mark.parametrize("leave", ["exception", "no commit"])
def test_an_uncommitted_variant_leaves_no_file_and_the_manifest_as_it_was(bundle, graph, leave):
    before = manifest_bytes(bundle)
    with pytest.raises(RuntimeError) if leave == "exception" else nullcontext():
        with VariantTransaction(bundle) as txn:
            files = txn.save(graph, bundle / "unet.int8.onnx")
            txn.put("unet", "int8", VariantRecord(file="unet.int8.onnx"))
            if leave == "exception":
                raise RuntimeError("measured under the bar")
    assert not any(p.exists() for p in files)
    assert manifest_bytes(bundle) == before


def test_discard_deletes_a_refused_candidate_only(bundle, graph):
    with VariantTransaction(bundle) as txn:
        keep = txn.save(graph, bundle / "a.onnx")
        refused = txn.save(graph, bundle / "b.onnx")
        txn.discard(refused)
        assert txn.files == keep and not refused[0].exists()
        txn.commit()
    assert keep[0].is_file()


def test_forget_drops_the_old_variant_and_its_quality_first(bundle_fp16_int8):
    bundle = bundle_fp16_int8
    with pytest.raises(RuntimeError):
        with VariantTransaction(bundle) as txn:
            txn.forget("int8", ["unet"])
            assert "int8" not in txn.trial.components["unet"].variants
            raise RuntimeError("failed after forgetting")
    m = read_manifest_json(bundle)  # a bundle without INT8, not one whose hashes do not match
    assert "int8" not in m.components["unet"].variants and "int8" not in m.quality
    assert "fp16" in m.components["unet"].variants and "fp16" in m.quality


def test_forget_without_the_precision_leaves_the_manifest_untouched(bundle_fp16_int8):
    bundle = bundle_fp16_int8
    before = manifest_bytes(bundle)
    VariantTransaction(bundle).forget("int8", ["vae_decoder"])
    assert manifest_bytes(bundle) == before
