"""``ldm-export import-optimum``: an Optimum / diffusers ONNX export folder -> a checked bundle.

Nothing is re-exported: the graphs (and their external data) are copied as they are,
keeping each component's sub-folder so external-data paths stay valid; the manifest
(from :func:`ldm_edge.runtime.bundle.optimum.manifest_from_optimum`) maps our tensor names to
theirs. Two things the runtime cannot do itself are done here, once:

* the tokenizer becomes one ``tokenizer.json`` (converted with transformers'
  CLIPTokenizer when the folder only has vocab.json / merges.txt);
* a U-Net that takes one scalar timestep (Optimum >= 1.24) gets a Gather node in front,
  so it takes one timestep per batch row like every other bundle's U-Net.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import ldm_edge
from ldm_edge.bundletools.files import file_record
from ldm_edge.bundletools.staging import staged_dir
from ldm_edge.runtime.bundle.opener import open_bundle
from ldm_edge.runtime.bundle.optimum import (GRAPH, OPTIONAL, REQUIRED, check_supported,
                                             graph_files, is_optimum_folder, manifest_from_optimum,
                                             read_graph_io)
from ldm_edge.runtime.bundle.schema import BundleManifest, write_manifest_json
from ldm_edge.runtime.errors import BundleError, ExportError, first_line
from ldm_edge.runtime.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)


def import_optimum(src: str | Path, out: str | Path, *, force: bool = False,
                   progress: Callable[[str], None] = lambda msg: None) -> BundleManifest:
    """Write the bundle ``out`` from the Optimum folder ``src``; return its manifest."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise BundleError(f"{str(src)!r} not found: pass the folder Optimum wrote "
                          f"(model_index.json, unet/model.onnx, ...)")
    if not is_optimum_folder(src):
        raise BundleError(f"{str(src)!r} is not an Optimum / diffusers ONNX export: it needs "
                          f"model_index.json, text_encoder/{GRAPH}, unet/{GRAPH} and "
                          f"vae_decoder/{GRAPH}")
    if out.resolve() == src.resolve():
        raise BundleError("the bundle must be a new folder, not the Optimum folder itself")
    check_supported(src)
    if out.exists() and not force:  # before copying gigabytes; staged_dir checks again
        raise ExportError(f"{out} already exists; pass --force to replace it")
    with staged_dir(out, force) as stage:
        # Copy first (links followed: a Hugging Face cache snapshot links into blobs/, and
        # onnxruntime refuses external data that lies outside the model's folder), then read
        # the copy; the source's configs come along only until the manifest is made.
        progress("copying the graphs")
        scratch = _copy_source(src, stage)
        progress("reading the graphs' inputs and outputs, hashing them")
        manifest = manifest_from_optimum(stage, hashes=True, for_import=True)
        for name, rec in manifest.components.items():
            variant = rec.variants["fp32"]
            if rec.timestep_input == "scalar":
                rec.timestep_input = None
                progress(f"{name}: adapting the scalar timestep input to one per batch row")
                adapt_scalar_timestep(stage / variant.file, rec.io_map["timestep"])
                variant.files = [file_record(stage / f.path, stage)
                                 for f in variant.files]

        progress("tokenizer: writing tokenizer.json")
        tok_path = stage / "tokenizer.json"
        atomic_write_bytes(tok_path, tokenizer_json(stage / "tokenizer").encode())
        tok = file_record(tok_path, stage)
        manifest.tokenizer.file, manifest.tokenizer.size = tok.path, tok.size
        manifest.tokenizer.sha256 = tok.sha256
        for p in scratch:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

        manifest.model.source = src.resolve().name
        manifest.producer = {"name": "ldm-edge", "version": ldm_edge.__version__,
                             "command": "import-optimum", "from": manifest.producer.get("from")}
        manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        write_manifest_json(stage, manifest)
        open_bundle(stage, verify=False)  # what we wrote reads back as a valid bundle
    return manifest


def _copy_source(src: Path, stage: Path) -> list[Path]:
    """Copy the graphs (with external data) and what the manifest is read from; return
    the latter, to remove once the manifest is made."""
    scratch = [stage / "model_index.json", stage / "scheduler", stage / "tokenizer"]
    shutil.copyfile(src / "model_index.json", stage / "model_index.json")
    for sub in ("scheduler", "tokenizer"):
        (stage / sub).mkdir()
        if (src / sub).is_dir():
            for p in (src / sub).iterdir():
                if p.is_file() and p.suffix in (".json", ".txt"):
                    shutil.copyfile(p, stage / sub / p.name)
    for c in REQUIRED + OPTIONAL:
        if not (src / c / GRAPH).is_file():
            continue
        (stage / c).mkdir()
        for p in graph_files(src, c):
            shutil.copyfile(p, stage / c / p.name)
        for cfg in (src / c).glob("*.json"):
            shutil.copyfile(cfg, stage / c / cfg.name)
            scratch.append(stage / c / cfg.name)
    return scratch


def tokenizer_json(tdir: Path) -> str:
    """tokenizer.json text: the folder's own, or converted from vocab.json + merges.txt."""
    own = tdir / "tokenizer.json"
    if own.is_file():
        return own.read_text(encoding="utf-8")
    if not ((tdir / "vocab.json").is_file() and (tdir / "merges.txt").is_file()):
        raise BundleError(f"{tdir}: neither tokenizer.json nor vocab.json + merges.txt; "
                          f"cannot make the bundle's tokenizer")
    import transformers

    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    try:
        tok = cls.from_pretrained(str(tdir))
    except Exception as e:
        msg = first_line(e)
        raise BundleError(f"{tdir}: transformers cannot read the CLIP tokenizer ({msg})")
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise BundleError(f"{tdir}: this transformers cannot convert the tokenizer to "
                          f"tokenizer.json (no fast tokenizer); upgrade transformers")
    raw = json.loads(backend.to_str())
    raw["padding"] = None  # the runtime pads and truncates as the manifest says
    raw["truncation"] = None
    return json.dumps(raw, ensure_ascii=False)


def adapt_scalar_timestep(path: Path, name: str) -> None:
    """Make the U-Net's rank-0 timestep input a [batch] one: take element 0 and feed that to
    everything that used the scalar. External data stays where it is (not loaded, not moved)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    used = {n for node in graph.node for n in list(node.input) + list(node.output)}
    inner, index = name + "__scalar", name + "__index"
    while inner in used or index in used:
        inner, index = inner + "_", index + "_"

    def rename(g):
        for node in g.node:
            for i, x in enumerate(node.input):
                if x == name:
                    node.input[i] = inner
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    rename(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        rename(sub)

    rename(graph)
    inp = next(i for i in graph.input if i.name == name)
    shape = inp.type.tensor_type.shape
    del shape.dim[:]
    shape.dim.add().dim_param = "batch"
    const = helper.make_node("Constant", [], [index],
                             value=helper.make_tensor(index, onnx.TensorProto.INT64, [], [0]))
    gather = helper.make_node("Gather", [name, index], [inner], axis=0)
    graph.node.insert(0, gather)
    graph.node.insert(0, const)
    onnx.save(model, str(path))
    dtype, shape_now = read_graph_io(path, "unet")[0][name]
    if len(shape_now) != 1:  # pragma: no cover - a guard, not a path
        raise BundleError(f"unet: adapting the timestep input failed (shape {shape_now})")
