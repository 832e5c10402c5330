"""Read Stable Diffusion folders exported by Hugging Face Optimum or diffusers' legacy script.

Such a folder (``ORTStableDiffusionPipeline.save_pretrained``, ``optimum-cli export onnx``,
diffusers' ``scripts/convert_stable_diffusion_checkpoint_to_onnx.py``) looks like::

    model_index.json
    text_encoder/model.onnx        input_ids -> last_hidden_state, pooler_output
    unet/model.onnx (+ model.onnx_data or weights.pb: external weights)
                                   sample, timestep, encoder_hidden_states -> out_sample
    vae_decoder/model.onnx         latent_sample -> sample
    vae_encoder/model.onnx         sample -> latent_parameters (or latent_sample)
    {unet,vae_decoder,vae_encoder,text_encoder}/config.json   (Optimum only)
    tokenizer/  vocab.json merges.txt tokenizer_config.json [tokenizer.json]
    scheduler/scheduler_config.json

The conventions changed over the years, so nothing is assumed that the graph can tell:

* ``input_ids`` is int32 in diffusers' script and in Optimum until Nov 2024, int64 since;
* ``timestep`` is int64 of shape [batch] (diffusers' script; Optimum until Nov 2024, axis
  "steps") or a float32 *scalar* (Optimum since Nov 2024, 1.24+). The pipeline feeds one
  value per batch row, so a scalar-timestep U-Net runs only after
  ``ldm-export import-optimum`` (which puts a one-node adapter in front of it);
* the VAE encoder returns the posterior's parameters (``latent_parameters``, Optimum
  since Oct 2024) or a latent already sampled inside the graph (``latent_sample``: older
  Optimum and diffusers' script) — recorded as the component's ``output_kind``.

numpy / onnxruntime / json only: this is part of the lean runtime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import BundleError
from .onnx_scan import ScanError, graph_io
from .schema import (FORMAT_VERSION, BundleManifest, ComponentRecord, FileRecord, ModelRecord,
                     TokenizerRecord, VariantRecord)
from .spec import ComponentSpec, ModelDims, TensorSpec, describe

log = logging.getLogger(__name__)

GRAPH = "model.onnx"
REQUIRED = ("text_encoder", "unet", "vae_decoder")
OPTIONAL = ("vae_encoder",)
IMPORT_HINT = "ldm-export import-optimum DIR -o BUNDLE"

# Fallbacks for the diffusers script's folders, which carry no VAE config: SD 1.x/2.x values.
DEFAULT_LATENT_CHANNELS = 4
DEFAULT_VAE_SCALE_FACTOR = 8
DEFAULT_SCALING_FACTOR = 0.18215
DEFAULT_MAX_LENGTH = 77
# The graphs' axes are open; these are only the bounds the runtime checks requests against.
MIN_SIZE, MAX_SIZE, MAX_BATCH = 32, 2048, 8

# our spec name -> the graph's name(s) for it, in the order tried
GRAPH_NAMES = {
    "text_encoder": {"input_ids": ("input_ids",), "attention_mask": ("attention_mask",),
                     "last_hidden_state": ("last_hidden_state",)},
    "unet": {"sample": ("sample",), "timestep": ("timestep",),
             "encoder_hidden_states": ("encoder_hidden_states",),
             "model_output": ("out_sample", "sample")},
    "vae_decoder": {"latent": ("latent_sample",), "image": ("sample",)},
    "vae_encoder": {"image": ("sample",),
                    "latent_parameters": ("latent_parameters", "latent_sample")},
}

def is_optimum_folder(path) -> bool:
    """A folder laid out as Optimum / diffusers' ONNX export writes one (not one of our bundles)."""
    p = Path(path)
    return (p.is_dir() and (p / "model_index.json").is_file()
            and all((p / c / GRAPH).is_file() for c in REQUIRED))


def manifest_from_optimum(path, *, hashes: bool = True,
                          for_import: bool = False) -> BundleManifest:
    """Our manifest (format 1) for an Optimum folder, its file paths relative to the folder.

    ``hashes``: record each graph file's sha256 and the model's (False: sizes only).
    ``for_import``: for ``ldm-export import-optimum``, which copies the files (following
    links), writes the tokenizer.json and adapts a scalar timestep itself; then none of
    them is refused here, and the U-Net record says ``"timestep_input": "scalar"``.
    Without it, what only the importer can fix raises a BundleError naming the command.
    """
    root = Path(path)
    if not is_optimum_folder(root):
        raise BundleError(f"{str(root)!r} is not an Optimum / diffusers ONNX export: it needs "
                          f"model_index.json and {', '.join(c + '/' + GRAPH for c in REQUIRED)}")
    index = check_supported(root)
    sched = _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    vae_cfg = _vae_config(root)
    unet_cfg = _optional_json(root / "unet" / "config.json")
    te_cfg = _optional_json(root / "text_encoder" / "config.json")

    tok = _tokenizer_facts(root, te_cfg, require_json=not for_import)
    names = [c for c in REQUIRED + OPTIONAL if (root / c / GRAPH).is_file()]
    files_by_comp = {c: graph_files(root, c) for c in names}
    if not for_import:
        _no_links_out(root, [p for ps in files_by_comp.values() for p in ps]
                      + [root / tok["file"]])
    graphs = {c: read_graph_io(root / c / GRAPH, c) for c in names}
    io_maps = {c: _io_map(c, graphs[c]) for c in names}
    vae = _vae_facts(root, vae_cfg, graphs["unet"][0][io_maps["unet"]["sample"]][1])
    dims = ModelDims(latent_channels=vae["latent_channels"],
                     vae_scale_factor=vae["vae_scale_factor"],
                     text_hidden_size=_text_hidden_size(graphs, io_maps, te_cfg),
                     text_max_length=tok["max_length"],
                     use_attention_mask="attention_mask" in io_maps["text_encoder"],
                     min_size=MIN_SIZE, max_size=MAX_SIZE, max_batch=MAX_BATCH)
    specs = describe(dims)
    size = int(unet_cfg["sample_size"]) * dims.vae_scale_factor \
        if unet_cfg and unet_cfg.get("sample_size") else 512
    records, model_sha = _file_records(root, files_by_comp, hashes)
    components = {c: _component(c, specs[c], graphs[c], io_maps[c], records[c], dims,
                                for_import, root) for c in names}
    return _bundle_manifest(root, index, sched, vae, dims, size, tok, components, model_sha)


def _vae_facts(root: Path, vae_cfg: dict | None, unet_sample_shape) -> dict:
    """The manifest's VAE fields, from the VAE config; without one (diffusers' script), the
    U-Net's latent channels and SD's other values."""
    if vae_cfg is not None:
        return {"latent_channels": int(vae_cfg.get("latent_channels", DEFAULT_LATENT_CHANNELS)),
                "vae_scale_factor": 2 ** (len(vae_cfg.get("block_out_channels", (0,) * 4)) - 1),
                "scaling_factor": float(vae_cfg.get("scaling_factor", DEFAULT_SCALING_FACTOR)),
                "shift_factor": vae_cfg.get("shift_factor")}
    unet_c = unet_sample_shape[1:2]
    latent_channels = unet_c[0] if unet_c and isinstance(unet_c[0], int) \
        else DEFAULT_LATENT_CHANNELS
    factor, scaling = DEFAULT_VAE_SCALE_FACTOR, DEFAULT_SCALING_FACTOR
    log.warning("%s has no VAE config (vae_decoder/config.json); assuming SD's %d latent "
                "channels, scale factor %d, scaling factor %s", root.name, latent_channels,
                factor, scaling)
    return {"latent_channels": latent_channels, "vae_scale_factor": factor,
            "scaling_factor": scaling, "shift_factor": None}


def _component(c: str, spec: ComponentSpec, graph, io_map: dict, files: list[FileRecord],
               dims: ModelDims, for_import: bool, root: Path) -> ComponentRecord:
    """Component ``c``'s record: its spec typed as the graph declares, its one fp32 variant."""
    spec = _typed_spec(spec, graph, io_map)
    rec = ComponentRecord(c, io_map=io_map)
    if c == "unet":
        spec, scalar = _unet_timestep(spec, graph, io_map, for_import, root)
        if scalar:
            rec.timestep_input = "scalar"
    if c == "vae_encoder":
        spec, rec.output_kind = _encoder_output(spec, graph, io_map, dims.latent_channels)
    rec.spec = spec
    rec.variants = {"fp32": VariantRecord(file=f"{c}/{GRAPH}", files=files)}
    return rec


def _bundle_manifest(root: Path, index: dict, sched: dict, vae: dict, dims: ModelDims,
                     size: int, tok: dict, components: dict,
                     model_sha: str | None) -> BundleManifest:
    prediction = sched.get("prediction_type", "epsilon")
    return BundleManifest(
        format_version=FORMAT_VERSION,
        producer={"name": "ldm-edge optimum reader", "from": index.get("_class_name")},
        model=ModelRecord(source=root.resolve().name, sha256=model_sha,
                          family="sd2" if prediction == "v_prediction" else "sd1",
                          format="optimum-onnx"),
        prediction_type=prediction,
        **vae,
        size_multiple=max(8, dims.vae_scale_factor),
        dims=dims.asdict(),
        defaults={"height": size, "width": size, "guidance_scale": 7.5, "num_inference_steps": 50},
        tokenizer=TokenizerRecord(file=tok["file"], size=tok.get("size"),
                                  max_length=tok["max_length"], pad_id=tok["pad_id"],
                                  pad_token=tok["pad_token"],
                                  use_attention_mask=dims.use_attention_mask,
                                  truncation="longest_first"),
        scheduler=sched,
        components=components,
    )


def check_supported(root: Path) -> dict:
    """Cheap checks before any graph is opened; returns model_index.json."""
    index = _read_json(root / "model_index.json", "model_index.json")
    for extra in ("text_encoder_2", "text_encoder_3", "transformer"):
        if (root / extra).is_dir() or extra in index:
            raise BundleError(f"{root.name}: has {extra}; only SD 1.x/2.x-style pipelines "
                              f"(one CLIP text encoder and a U-Net) can be read")
    _read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    return index


# -- the graphs ------------------------------------------------------------------------------
def read_graph_io(path: Path, what: str) -> tuple[dict, dict]:
    """({input: (dtype, shape)}, {output: (dtype, shape)}) read from the file's protobuf
    header fields, without loading the weights (the backend opens the graph once, later)."""
    try:
        return graph_io(path)
    except (ScanError, OSError) as e:
        raise BundleError(f"{what}: {what}/{path.name} is not a readable ONNX model ({e}); "
                          f"the export is damaged or incomplete")


def _io_map(component: str, graph: tuple[dict, dict]) -> dict:
    inputs, outputs = graph
    wanted = GRAPH_NAMES[component]
    io_map = {}
    for ours, theirs in wanted.items():
        pool = outputs if ours in _output_names(component) else inputs
        hit = next((n for n in theirs if n in pool), None)
        if hit is None and pool is outputs and len(pool) == 1:
            hit = next(iter(pool))
        if hit is not None:
            io_map[ours] = hit
    required_in = [n for n in wanted if n not in _output_names(component) and n != "attention_mask"]
    missing = [wanted[n][0] for n in required_in + _output_names(component) if n not in io_map]
    extra = sorted(set(inputs) - set(io_map.values()))
    if missing or extra:
        detail = (f"lacks {', '.join(missing)}" if missing else "") + \
                 ("; " if missing and extra else "") + \
                 (f"has inputs this runtime does not feed: {', '.join(extra)}" if extra else "")
        raise BundleError(f"{component}/{GRAPH} {detail} (inputs {sorted(inputs)}, outputs "
                          f"{sorted(outputs)}); only SD 1.x/2.x text-to-image exports are supported")
    return io_map


def _output_names(component: str) -> list[str]:
    return {"text_encoder": ["last_hidden_state"], "unet": ["model_output"],
            "vae_decoder": ["image"], "vae_encoder": ["latent_parameters"]}[component]


def _typed_spec(spec: ComponentSpec, graph: tuple[dict, dict], io_map: dict) -> ComponentSpec:
    """Our spec, with each tensor's dtype as the graph declares it; float32 graphs only."""
    inputs, outputs = graph

    def retype(t: TensorSpec, table: dict) -> TensorSpec:
        if t.name == "timestep":  # int or float: see _unet_timestep
            return t
        dtype = table[io_map[t.name]][0]
        if t.dtype.startswith("float") and dtype != "float32":
            raise BundleError(f"{spec.name}: {io_map[t.name]} is {dtype}; only float32 Optimum "
                              f"exports can be read (export in fp32, then `ldm-export fp16`)")
        if t.dtype.startswith("int") and dtype not in ("int32", "int64"):
            raise BundleError(f"{spec.name}: {io_map[t.name]} is {dtype}, expected an integer type")
        return TensorSpec(t.name, dtype, t.shape)

    return ComponentSpec(spec.name, tuple(retype(t, inputs) for t in spec.inputs),
                         tuple(retype(t, outputs) for t in spec.outputs), spec.ranges)


def _unet_timestep(spec: ComponentSpec, graph, io_map, allow_scalar: bool, root: Path):
    dtype, shape = graph[0][io_map["timestep"]]
    if dtype not in ("float32", "int64", "int32"):
        raise BundleError(f"unet: timestep is {dtype}; expected float32, int64 or int32")
    if len(shape) > 1:
        raise BundleError(f"unet: timestep has shape {shape}; expected a scalar or [batch]")
    scalar = len(shape) == 0
    if scalar and not allow_scalar:
        raise BundleError(f"{root.name}: this U-Net takes one scalar timestep (Optimum 1.24+), "
                          f"the runtime feeds one per image; convert the folder once with "
                          f"`{IMPORT_HINT}`")
    inputs = tuple(TensorSpec(t.name, dtype if t.name == "timestep" else t.dtype, t.shape)
                   for t in spec.inputs)
    return ComponentSpec(spec.name, inputs, spec.outputs, spec.ranges), scalar


def _encoder_output(spec: ComponentSpec, graph, io_map, channels: int):
    """'parameters' (mean || logvar on channels) or 'sample' (a latent drawn in the graph)."""
    name = io_map["latent_parameters"]
    shape = graph[1][name][1]
    c = shape[1] if len(shape) == 4 and isinstance(shape[1], int) else None
    if name == "latent_parameters" or c == 2 * channels:
        return spec, "parameters"
    out = spec.outputs[0]
    shape = (out.shape[0], channels) + tuple(out.shape[2:])
    return (ComponentSpec(spec.name, spec.inputs, (TensorSpec(out.name, out.dtype, shape),),
                          spec.ranges), "sample")


def _text_hidden_size(graphs, io_maps, te_cfg) -> int:
    shape = graphs["text_encoder"][1][io_maps["text_encoder"]["last_hidden_state"]][1]
    if shape and isinstance(shape[-1], int):
        return shape[-1]
    if te_cfg and te_cfg.get("hidden_size"):
        return int(te_cfg["hidden_size"])
    shape = graphs["unet"][0][io_maps["unet"]["encoder_hidden_states"]][1]
    if shape and isinstance(shape[-1], int):
        return shape[-1]
    raise BundleError("cannot tell the text encoder's hidden size (no static dim in the graphs, "
                      "no text_encoder/config.json)")


# -- files ---------------------------------------------------------------------------------
def graph_files(root: Path, component: str) -> list[Path]:
    """model.onnx and its external data (model.onnx_data, weights.pb or one file per tensor):
    every file of the component's folder but configs, hidden files and other graphs."""
    folder = root / component
    out = [folder / GRAPH]
    for p in sorted(folder.iterdir()):
        if (p.is_file() and p.name != GRAPH and not p.name.startswith(".")
                and p.suffix not in (".json", ".onnx", ".txt", ".md")):
            out.append(p)
    return out


def _file_records(root: Path, files_by_comp: dict,
                  hashes: bool) -> tuple[dict[str, list[FileRecord]], str | None]:
    """Per-component file records (path, size[, sha256]) and one sha256 over all the graphs'
    bytes in path order (the model's fingerprint), reading each file once."""
    model = hashlib.sha256()
    records = {c: [] for c in files_by_comp}
    everything = sorted((p.relative_to(root).as_posix(), c, p)
                        for c, ps in files_by_comp.items() for p in ps)
    for rel, c, p in everything:
        rec = FileRecord(rel, p.stat().st_size)
        if hashes:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
                    model.update(block)
            rec.sha256 = h.hexdigest()
        records[c].append(rec)
    for c in records:  # the graph first, then its data files
        records[c].sort(key=lambda r: (not r.path.endswith("/" + GRAPH), r.path))
    return records, (model.hexdigest() if hashes else None)


def _no_links_out(root: Path, paths: list[Path]) -> None:
    """Bundles may not link outside themselves; a Hugging Face cache snapshot does (into
    blobs/). Say so up front, with the way out."""
    real_root = os.path.realpath(root)
    for p in paths:
        if os.path.commonpath([real_root, os.path.realpath(p)]) != real_root:
            raise BundleError(f"{root.name}: {p.relative_to(root).as_posix()} links outside the "
                              f"folder (a Hugging Face cache snapshot?), which the runtime refuses; "
                              f"copy it into a bundle with `{IMPORT_HINT}`")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BundleError(f"{what} missing ({path}); not a complete Optimum export")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is damaged ({e.__class__.__name__})")
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data


def _optional_json(path: Path) -> dict | None:
    return _read_json(path, path.name) if path.is_file() else None


def _vae_config(root: Path) -> dict | None:
    """Optimum writes the AutoencoderKL config next to each VAE half."""
    for sub in ("vae_decoder", "vae_encoder", "vae"):
        cfg = _optional_json(root / sub / "config.json")
        if cfg is not None:
            return cfg
    return None


# -- tokenizer -------------------------------------------------------------------------------
def _tokenizer_facts(root: Path, te_cfg: dict | None, require_json: bool) -> dict:
    tdir = root / "tokenizer"
    tjson = tdir / "tokenizer.json"
    if not tjson.is_file() and require_json:
        raise BundleError(f"{root.name} has no tokenizer/tokenizer.json (only the slow "
                          f"tokenizer's vocab.json/merges.txt), which the runtime cannot read "
                          f"without transformers; convert the folder once with `{IMPORT_HINT}`")
    if not tjson.is_file() and not (tdir / "vocab.json").is_file():
        raise BundleError(f"{root.name}: tokenizer/ has neither tokenizer.json nor vocab.json")
    cfg = _optional_json(tdir / "tokenizer_config.json") or {}
    special = _optional_json(tdir / "special_tokens_map.json") or {}
    pad = cfg.get("pad_token", special.get("pad_token")) or "<|endoftext|>"
    if isinstance(pad, dict):
        pad = pad.get("content")
    pad_id = _token_id(tdir, str(pad))
    if pad_id is None:
        raise BundleError(f"{root.name}: the tokenizer's pad token {pad!r} is not in its vocabulary")
    cap = int((te_cfg or {}).get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
    ml = cfg.get("model_max_length")
    max_length = int(ml) if isinstance(ml, (int, float)) and 0 < ml <= cap else min(
        DEFAULT_MAX_LENGTH, cap)
    facts = {"file": "tokenizer/tokenizer.json", "max_length": max_length, "pad_id": pad_id,
             "pad_token": str(pad)}
    if tjson.is_file():
        facts["size"] = tjson.stat().st_size
    return facts


def _token_id(tdir: Path, token: str) -> int | None:
    tjson = tdir / "tokenizer.json"
    if tjson.is_file():
        data = _read_json(tjson, "tokenizer.json")
        for t in data.get("added_tokens") or []:
            if t.get("content") == token:
                return int(t["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    vpath = tdir / "vocab.json"
    if vpath.is_file():
        vocab = _read_json(vpath, "vocab.json")
        if token in vocab:
            return int(vocab[token])
    return None
