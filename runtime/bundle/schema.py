"""The bundle manifest, typed: the one contract between the export half and the runtime half.

Every record is a dataclass whose field names are the JSON keys, with ``from_json`` (which
checks types and shapes, raising :class:`BundleError` with a message that says what to do)
and ``to_json``. Keys a record does not know are kept in its ``extra``, and a record read
from JSON writes back exactly the keys it was read with, in their order: an old manifest
round-trips unchanged. Records built in code write the fields that are set (not None);
``NULLABLE`` fields are written even when None, as the exporters always did.

Writers (export, fp16, int8, engines, the Optimum reader) build these objects; readers use
their attributes; the defaults of absent keys are supplied here, once.
Pure python: imported by both halves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from ..errors import BundleError
from ..fsutil import atomic_write_json
from ..tasks import TASKS, takes_prompt
from .spec import COMPONENTS, TINY_VAE, ComponentSpec
from .control_spec import is_controlnet

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
REQUIRED_KEYS = ("format_version", "model", "components", "tokenizer", "scheduler",
                 "prediction_type", "latent_channels", "vae_scale_factor", "scaling_factor")
REQUIRED_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
# SDXL's refiner has only the second text encoder, which then stands for the first
SECOND_ENCODER = {"text_encoder": "text_encoder_2"}
# Read when a manifest does not say (bundles written before the key existed).
DEFAULT_SIZE_MULTIPLE = 8


def need(value, kind, what: str, positive: bool = False):
    """``value`` if it is a ``kind`` (bools are not numbers here), else a BundleError."""
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and positive:
        ok = value > 0
    if not ok:
        raise BundleError(f"manifest {what} is {value!r}; re-export the bundle")
    return value


def _dump(v):
    """A JSON value, copied (nothing returned by to_json aliases a record's state)."""
    if isinstance(v, (Record, ComponentSpec)):
        return v.to_json()
    if isinstance(v, dict):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    return v


@dataclass
class Record:
    """A JSON object: its known keys are the dataclass fields, the rest is kept in ``extra``."""

    NULLABLE: ClassVar[tuple] = ()  # fields written as null when None (records built in code)
    OMIT_EMPTY: ClassVar[tuple] = ()  # fields left out when {} or [] (unless read that way)

    extra: dict = field(default_factory=dict, kw_only=True, repr=False)
    # the keys this record was read with, in order; None for one built in code
    read_keys: tuple | None = field(default=None, kw_only=True, repr=False, compare=False)

    @classmethod
    def known(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("extra", "read_keys")]

    @classmethod
    def _from(cls, d: dict, **parsed):
        """The record of JSON object ``d``: known keys as fields (``parsed`` gives those
        already converted), unknown ones in ``extra``; remembers d's keys and their order."""
        names = set(cls.known())
        kw = {k: v for k, v in d.items() if k in names}
        kw.update(parsed)
        return cls(**kw, extra={k: v for k, v in d.items() if k not in names},
                   read_keys=tuple(d))

    def _written(self, name: str, value) -> bool:
        if self.read_keys is not None and name in self.read_keys:
            return True
        if value is None:
            return self.read_keys is None and name in self.NULLABLE
        return not (name in self.OMIT_EMPTY and value in ({}, []))

    def to_json(self) -> dict:
        out = {k: _dump(getattr(self, k)) for k in self.known()
               if self._written(k, getattr(self, k))}
        out.update((k, _dump(v)) for k, v in self.extra.items() if k not in out)
        if self.read_keys is not None:  # read keys in their order, then the new ones
            rank = {k: i for i, k in enumerate(self.read_keys)}
            out = dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        return out


def _object(d, what: str) -> dict:
    if not isinstance(d, dict):
        raise BundleError(f"manifest {what} is {d!r}; re-export the bundle")
    return d


# -- files ------------------------------------------------------------------------------------
@dataclass
class FileRecord(Record):
    """One file of the bundle: its path inside the bundle, size and sha256."""

    path: str | None = None
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def from_json(cls, d, what: str = "file") -> "FileRecord":
        if not isinstance(d, dict):
            raise BundleError(f"{what}: malformed file record in manifest")
        return cls._from(d)


@dataclass
class TokenizerRecord(Record):
    """tokenizer.json (recorded under ``file``, with size and sha256) and how prompts are padded."""

    size: int | None = None
    sha256: str | None = None
    file: str | None = None
    max_length: int | None = None
    pad_id: int | None = None
    pad_token: str | None = None
    use_attention_mask: bool | None = None
    truncation: str | None = None

    @classmethod
    def from_json(cls, d) -> "TokenizerRecord":
        need(d, dict, "tokenizer")
        need(d.get("max_length"), int, "tokenizer.max_length", positive=True)
        need(d.get("pad_id"), int, "tokenizer.pad_id")
        need(d.get("pad_token"), str, "tokenizer.pad_token")
        return cls._from(d)

    @property
    def file_record(self) -> FileRecord:
        return FileRecord(self.file, self.size, self.sha256)


@dataclass
class ModelRecord(Record):
    """Where the weights came from: the checkpoint's name, content hash, family."""

    NULLABLE: ClassVar[tuple] = ("source", "sha256", "family")

    source: str | None = None
    sha256: str | None = None
    family: str | None = None
    format: str | None = None  # "optimum-onnx" for folders read from Optimum exports

    @classmethod
    def from_json(cls, d) -> "ModelRecord":
        return cls._from(_object(d, "model"))


@dataclass
class TinyVaeRecord(Record):
    """The tiny VAE (TAESD: diffusers' AutoencoderTiny) whose graphs are ``vae_decoder_tiny``
    and ``vae_encoder_tiny``: where it came from (``ldm-export onnx --tiny-vae DIR``, or the
    model's own ``vae/``), and its config's scaling factor, which latents are divided by
    before its decoder and multiplied by after its encoder, as diffusers' pipelines do with
    ``vae.config.scaling_factor`` (1.0 for TAESD: it works on the U-Net's latents as they are)."""

    source: str | None = None
    sha256: str | None = None
    scaling_factor: float = 1.0

    @classmethod
    def from_json(cls, d) -> "TinyVaeRecord":
        d = _object(d, "tiny_vae")
        need(d.get("scaling_factor", 1.0), (int, float), "tiny_vae.scaling_factor", positive=True)
        return cls._from(d)


@dataclass
class AddedConditioningRecord(Record):
    """SDXL's pipeline settings for the U-Net's added conditioning (``text_embeds``,
    ``time_ids``), as its model_index.json says them: ``force_zeros_for_empty_prompt``: with
    no negative prompt the unconditioned half of the guidance batch gets zero embeddings;
    ``requires_aesthetics_score``: the time ids end with an aesthetic score (the refiner)."""

    force_zeros_for_empty_prompt: bool = True
    requires_aesthetics_score: bool = False

    @classmethod
    def from_json(cls, d) -> "AddedConditioningRecord":
        d = _object(d, "added_conditioning")
        for key in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
            if not isinstance(d.get(key, False), bool):
                raise BundleError(f"manifest added_conditioning.{key} is {d[key]!r}; "
                                  f"re-export the bundle")
        return cls._from(d)


# -- components -------------------------------------------------------------------------------
# The INT8 U-Net's form for TensorRT (calibration/trt_form.py): float biases (TensorRT's parser
# dequantizes no INT32), symmetric activations, 8-bit weights; what `ldm-export engines` builds.
TENSORRT_FORM = "tensorrt"


@dataclass
class FormRecord(Record):
    """Another form of a variant's graph for one backend (``"ort-mha"``: attention fused into
    onnxruntime's MultiHeadAttention, bundletools/forms.py; ``TENSORRT_FORM``: the INT8 graph
    TensorRT can parse), checked when it was made; ``check`` is that check's record."""

    file: str | None = None
    files: list[FileRecord] = field(default_factory=list)
    fused_attention: int | None = None  # attentions rewritten
    check: dict | None = None

    @classmethod
    def from_json(cls, d, what: str) -> "FormRecord":
        d = _object(d, what)
        need(d.get("file"), str, f"{what}.file")
        files = d.get("files", [])
        if not isinstance(files, list):
            raise BundleError(f"manifest {what}.files is {files!r}; re-export the bundle")
        return cls._from(d, files=[FileRecord.from_json(f, what) for f in files])


@dataclass
class CalibrationRecord(Record):
    """How an INT8 variant's activation ranges were measured: over the FP32 sampling runs of
    ``prompts`` (what stood for them, for a model without a prompt), ``steps`` each, at
    ``size`` [height, width], with ``schedulers`` in turn; ``samples`` U-Net calls kept, at
    ``timesteps``."""

    prompts: list | None = None
    steps: int | None = None
    size: list | None = None
    samples: int | None = None
    schedulers: list | None = None
    timesteps: list | None = None

    @classmethod
    def from_json(cls, d, what: str) -> "CalibrationRecord":
        return cls._from(_object(d, what))


@dataclass
class VariantRecord(Record):
    """One precision of one component: its graph, the files it reads, and how it was made."""

    OMIT_EMPTY: ClassVar[tuple] = ("forms",)

    file: str | None = None
    files: list[FileRecord] = field(default_factory=list)
    opset: int | None = None
    parity: dict | None = None  # measured when it was made (compare().to_json() + context)
    # fp16: the FP32 islands
    islands: str | None = None
    fp32_nodes: list | None = None
    # int8: the quantisation facts
    format: str | None = None
    weights: str | None = None
    activations: str | None = None
    method: str | None = None
    ops: list | None = None
    quantized_nodes: list | None = None
    excluded_nodes: dict | None = None
    kept_float_units: list | None = None
    calibration: CalibrationRecord | None = None
    min_psnr: dict | None = None  # the --min-psnr budget's record
    # other forms of this graph for particular backends, by form name ("ort-mha")
    forms: dict[str, FormRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d, what: str) -> "VariantRecord":
        d = _object(d, what)
        files = d.get("files", [])
        if not isinstance(files, list):
            raise BundleError(f"manifest {what}.files is {files!r}; re-export the bundle")
        forms = _object(d.get("forms", {}), f"{what}.forms")
        cal = d.get("calibration")
        parsed = {} if cal is None else {
            "calibration": CalibrationRecord.from_json(cal, f"{what}.calibration")}
        return cls._from(d, **parsed, files=[FileRecord.from_json(f, what) for f in files],
                         forms={k: FormRecord.from_json(v, f"{what}.forms.{k}")
                                for k, v in forms.items()})

    @property
    def sha256(self) -> str | None:
        """The recorded sha256 of the main graph file (None when the manifest has none)."""
        for f in self.files:
            if f.path == self.file:
                return f.sha256
        return None


@dataclass
class EngineRecord(Record):
    """A TensorRT engine built from one variant, on one kind of device. Its keys are checked
    when an engine is chosen (trt_engines.tensorrt_records), not on load."""

    NULLABLE: ClassVar[tuple] = ("workspace_mb", "optimization_level")

    backend: str | None = None
    precision: str | None = None
    trt_version: str | None = None
    device_name: str | None = None
    compute_capability: str | None = None
    profile: dict | None = None
    onnx_sha256: str | None = None
    file: str | None = None
    size: int | None = None
    sha256: str | None = None
    build_seconds: float | None = None
    workspace_mb: int | None = None
    optimization_level: int | None = None
    # "lora-weights": built --refittable, the weights map's weights can be refitted (LoRA)
    refittable: str | None = None
    # built --tf32: FP32 convolutions/matrix products may round inputs to TF32 (False: FP32,
    # as the ONNX graph; None: built before this was recorded, i.e. without TF32)
    tf32: bool | None = None

    @classmethod
    def from_json(cls, d, what: str) -> "EngineRecord":
        return cls._from(_object(d, what))


@dataclass
class ComponentRecord(Record):
    """One network: its interface (spec), its precision variants and engines, and the
    names its graph uses where they differ from ours (``io_map``, Optimum folders)."""

    OMIT_EMPTY: ClassVar[tuple] = ("io_map", "engines")

    name: str = field(default="", metadata={"json": False})
    io_map: dict = field(default_factory=dict)  # our tensor name -> the graph's
    timestep_input: str | None = None  # "scalar": only while import-optimum adapts the graph
    # VAE encoder: "parameters" (mean || logvar) or "sample" (older Optimum graphs draw the
    # latent themselves); the backend layer exposes the latter as an output named "latent"
    output_kind: str | None = None
    spec: ComponentSpec | None = None
    variants: dict[str, VariantRecord] = field(default_factory=dict)
    engines: list[EngineRecord] = field(default_factory=list)
    # which initializer of the graphs holds which PyTorch parameter (runtime/lora/weights_map.py),
    # a JSON side file written and verified at export; what LoRA needs. None: exported before
    weights_map: FileRecord | None = None

    @classmethod
    def known(cls) -> list[str]:
        return [n for n in super().known() if n != "name"]

    @classmethod
    def from_json(cls, name: str, d) -> "ComponentRecord":
        if name not in COMPONENTS and not is_controlnet(name):
            raise BundleError(f"unknown component {name!r} in manifest")
        d = _object(d, name)
        try:
            spec = ComponentSpec.from_json(name, d["spec"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BundleError(f"{name}: malformed spec in manifest ({e}); re-export the bundle")
        variants = _object(d.get("variants", {}), f"{name}.variants")
        for precision in variants:
            if precision not in PRECISIONS:
                raise BundleError(f"{name}: unknown precision {precision!r}")
        engines = d.get("engines") or []
        if not isinstance(engines, list):
            raise BundleError(f"manifest {name}.engines is {engines!r}; re-export the bundle")
        io_map = d.get("io_map") or {}
        _object(io_map, f"{name}.io_map")
        wmap = d.get("weights_map")
        if wmap is not None:
            wmap = FileRecord.from_json(_object(wmap, f"{name}.weights_map"), f"{name} weights map")
        rec = cls._from(d, spec=spec, io_map=io_map, weights_map=wmap,
                        variants={p: VariantRecord.from_json(v, f"{name} ({p})")
                                  for p, v in variants.items()},
                        engines=[EngineRecord.from_json(e, f"{name} engine") for e in engines])
        rec.name = name
        return rec

    def graph_name(self, ours: str) -> str:
        """The graph's name for one of our tensor names."""
        return self.io_map.get(ours, ours)

    def engine_dicts(self) -> list[dict]:
        """The engine records as JSON, for trt_engines' record checks and selection."""
        return [e.to_json() for e in self.engines]


@dataclass
class ControlNetRecord(Record):
    """A ControlNet the bundle carries (``ldm-export onnx --controlnet DIR``, ``ldm-export
    controlnet``), by its name (``ldm-run --control NAME:IMAGE``): its graph is the component
    ``component`` (``controlnet/NAME``); where it came from and the family it was checked
    against (runtime/bundle/control_spec.py, runtime/control.py)."""

    component: str | None = None
    source: str | None = None
    sha256: str | None = None
    family: str | None = None

    @classmethod
    def from_json(cls, name: str, d, components: dict) -> "ControlNetRecord":
        d = _object(d, f"controlnets.{name}")
        comp = d.get("component")
        if not isinstance(comp, str) or not is_controlnet(comp) or comp not in components:
            raise BundleError(f"manifest controlnets.{name} names no ControlNet graph "
                              f"({comp!r}); re-export the bundle")
        return cls._from(d)


# -- quality ----------------------------------------------------------------------------------
@dataclass
class QualityRecord(Record):
    """End-to-end quality of a precision variant: FP32 and it on the same prompts and seeds."""

    psnr_db: float | None = None
    per_prompt_db: list | None = None
    prompts: list | None = None
    steps: int | None = None
    seed: int | None = None
    reference: str | None = None
    components_kept_fp32: list | None = None  # fp16
    # per scheduler {"psnr_db", "per_prompt_db", "latent_rel_error", "unet_cosine_min",
    # "unet_cosine_per_step"}; psnr_db above is the worst PSNR of them
    per_scheduler: dict | None = None
    worst_scheduler: str | None = None
    # the lowest cosine of the variant's U-Net output vs FP32's at any step of any scheduler's
    # FP32 trajectory: a measure that does not depend on what the picture looks like
    unet_cosine_min: float | None = None
    size: list | None = None  # [height, width] measured at, when not the model's own
    # with a ControlNet active (bundletools/quality.py control_quality): psnr_db,
    # unet_cosine_min, controlnet_cosine_min, ...; a bundle with ControlNets only
    control: dict | None = None

    @classmethod
    def from_json(cls, d, what: str) -> "QualityRecord":
        return cls._from(_object(d, what))


@dataclass
class Int8QualityRecord(QualityRecord):
    NULLABLE: ClassVar[tuple] = ("min_psnr",)

    method: str | None = None
    min_psnr: float | None = None
    kept_float_units: list | None = None
    # the CPU it was measured on (machine, model, int8_kernels): onnxruntime's INT8 kernels,
    # and so this figure, differ between CPUs with and without VNNI (runtime/cpu.py)
    cpu: dict | None = None


QUALITY_RECORDS = {"int8": Int8QualityRecord}


# -- the manifest -----------------------------------------------------------------------------
class _GivenKeys(Record):
    """A record that writes back the keys it was given (read from JSON or passed as a dict)
    and any field set away from its fallback, never a fallback it only supplied: a manifest
    that lacks a key keeps lacking it."""

    @classmethod
    def of(cls, d) -> "_GivenKeys":
        """From a JSON object or a dict built in code (an existing record passes through)."""
        return d if isinstance(d, cls) else cls._from(dict(d or {}))

    def _written(self, name: str, value) -> bool:
        fallback = next(f.default for f in fields(self) if f.name == name)
        return name in (self.read_keys or ()) or value != fallback

    def __bool__(self) -> bool:
        return bool(self.to_json())


@dataclass
class DefaultsRecord(_GivenKeys):
    """The model's generation defaults. A key the manifest lacks reads as the SD 1.x/2.x
    pipelines' own default: these field defaults are the one fallback."""

    height: int = 512
    width: int = 512
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    # the runtime scheduler name to sample with by default, where it is not the one the model's
    # scheduler config names (`ldm-export onnx --default-scheduler`); None: that one
    scheduler: str | None = None


@dataclass
class DimsRecord(_GivenKeys):
    """The dimensions the components were exported for (spec.ModelDims.asdict()). Absent
    limits read as none (1 << 16); an absent min_size as the size multiple
    (``BundleManifest.min_size``)."""

    latent_channels: int | None = None
    vae_scale_factor: int | None = None
    text_hidden_size: int | None = None
    text_max_length: int | None = None
    use_attention_mask: bool | None = None
    min_size: int | None = None
    max_size: int = 1 << 16
    max_batch: int = 1 << 16
    time_cond_proj_dim: int | None = None  # an LCM U-Net's (spec.ModelDims)
    text_hidden_size_2: int | None = None  # SDXL's (spec.ModelDims)
    text_embeds_dim: int | None = None
    time_ids_dim: int | None = None


@dataclass
class BundleManifest(Record):
    """manifest.json."""

    NULLABLE: ClassVar[tuple] = ("shift_factor",)
    OMIT_EMPTY: ClassVar[tuple] = ("quality", "controlnets")

    format_version: int = FORMAT_VERSION
    producer: dict | None = None
    created: str | None = None
    model: ModelRecord = field(default_factory=ModelRecord)
    # what the model does (runtime/tasks/); absent: text-to-image. Written only when set,
    # so SD1/SD2 manifests keep their keys
    task: str | None = None
    # the SD x4 upscaler (task "upscale"): max_noise_level, default_noise_level and the
    # low_res_scheduler config (as diffusers writes it) that noises the low-resolution image
    upscaler: dict | None = None
    # the tiny VAE (TAESD) of the *_tiny components; written only when the bundle has one
    tiny_vae: TinyVaeRecord | None = None
    prediction_type: str = "epsilon"
    latent_channels: int = 4
    vae_scale_factor: int = 8
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    size_multiple: int | None = None
    dims: DimsRecord = field(default_factory=DimsRecord)  # the exported ranges
    defaults: DefaultsRecord = field(default_factory=DefaultsRecord)
    # None for a model that takes no prompt (tasks.PROMPTLESS)
    tokenizer: TokenizerRecord | None = field(default_factory=TokenizerRecord)
    # SDXL: the second text encoder's tokenizer (tokenizer_2.json; SDXL's pads with "!"), and
    # the added conditioning's settings; written only for such a bundle
    tokenizer_2: TokenizerRecord | None = None
    added_conditioning: AddedConditioningRecord | None = None
    # the model's VAE overflows in FP16 (its config's force_upcast, which SDXL's pipelines
    # honour): `ldm-export fp16` keeps it FP32; written for SDXL bundles only
    vae_force_upcast: bool | None = None
    scheduler: dict = field(default_factory=dict)  # as diffusers writes it
    components: dict[str, ComponentRecord] = field(default_factory=dict)
    quality: dict[str, QualityRecord] = field(default_factory=dict)
    # the ControlNets, by name (written only when there are some)
    controlnets: dict[str, ControlNetRecord] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d) -> "BundleManifest":
        if not isinstance(d, dict):
            raise BundleError("manifest.json is not a JSON object; re-export the bundle")
        task = d.get("task")
        if task is not None and task not in TASKS:
            raise BundleError(f"unknown task {task!r} in manifest; upgrade ldm-edge or re-export")
        prompted = takes_prompt(task)
        # a model without a prompt has no tokenizer; SDXL's refiner only the second one
        tok_free = not prompted or "tokenizer_2" in d
        missing = [k for k in REQUIRED_KEYS if k not in d and (k != "tokenizer" or not tok_free)]
        if missing:
            raise BundleError(f"manifest.json lacks {', '.join(missing)}; re-export the bundle")
        fv = d["format_version"]
        if not isinstance(fv, int) or isinstance(fv, bool):
            raise BundleError(f"manifest format_version {fv!r} is not an integer")
        if fv > FORMAT_VERSION:
            raise BundleError(f"bundle format {fv} is newer than this ldm-edge reads "
                              f"({FORMAT_VERSION}); upgrade ldm-edge")
        if fv < FORMAT_VERSION:
            raise BundleError(f"bundle format {fv} is no longer read; re-export the bundle")
        if d["prediction_type"] not in PREDICTION_TYPES:
            raise BundleError(f"unknown prediction_type {d['prediction_type']!r}")
        _check_scalars(d)
        comps = d["components"]
        if not isinstance(comps, dict):
            raise BundleError("manifest components is not an object; re-export the bundle")
        for name in REQUIRED_COMPONENTS:  # a tiny VAE's decoder may stand for the VAE's
            stand_in = TINY_VAE.get(name) or SECOND_ENCODER.get(name)
            if name not in comps and stand_in not in comps \
                    and (prompted or name != "text_encoder"):
                raise BundleError(f"bundle has no {name}; re-export it")
        if "tiny_vae" not in d and any(n in comps for n in TINY_VAE.values()):
            raise BundleError("manifest has tiny VAE graphs but no tiny_vae record; "
                              "re-export the bundle")
        quality = _object(d.get("quality", {}), "quality")
        return cls._from(
            d, model=ModelRecord.from_json(d["model"]),
            dims=DimsRecord.of(d.get("dims")), defaults=DefaultsRecord.of(d.get("defaults")),
            tokenizer=TokenizerRecord.from_json(d["tokenizer"]) if "tokenizer" in d else None,
            tiny_vae=TinyVaeRecord.from_json(d["tiny_vae"]) if "tiny_vae" in d else None,
            **_added_conditioning(d), controlnets=_controlnets(d),
            components={n: ComponentRecord.from_json(n, r) for n, r in comps.items()},
            quality={p: QUALITY_RECORDS.get(p, QualityRecord).from_json(q, f"quality.{p}")
                     for p, q in quality.items()})

    def __post_init__(self):  # writers may pass plain dicts (ModelDims.asdict(), defaults)
        self.dims, self.defaults = DimsRecord.of(self.dims), DefaultsRecord.of(self.defaults)

    def _written(self, name: str, value) -> bool:
        if name in ("dims", "defaults") and not value:
            return name in (self.read_keys or ())  # absent stays absent
        return super()._written(name, value)

    # -- what readers ask ---------------------------------------------------------------------
    @property
    def min_size(self) -> int:
        """The smallest image side the components were exported for."""
        return self.dims.min_size or self.multiple

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this many pixels."""
        return self.size_multiple or DEFAULT_SIZE_MULTIPLE

    def precisions(self, component: str) -> list[str]:
        return list(self.components[component].variants)

    def vae_scaling(self, tiny: bool) -> tuple[float, float | None]:
        """(scaling factor, shift factor) of the VAE's latents, or of the tiny VAE's (never
        shifted: diffusers' SD pipelines apply no shift factor)."""
        if tiny:
            return float(self.tiny_vae.scaling_factor), None
        return float(self.scaling_factor), self.shift_factor


def _controlnets(d: dict) -> dict:
    nets = _object(d.get("controlnets", {}), "controlnets")
    return {n: ControlNetRecord.from_json(n, r, d["components"]) for n, r in nets.items()}


def _added_conditioning(d: dict) -> dict:
    """The SDXL records of manifest ``d``, parsed (none where it has none)."""
    out = {}
    if "tokenizer_2" in d:
        out["tokenizer_2"] = TokenizerRecord.from_json(d["tokenizer_2"])
    if "added_conditioning" in d:
        out["added_conditioning"] = AddedConditioningRecord.from_json(d["added_conditioning"])
    if "text_encoder_2" in d["components"] and "tokenizer_2" not in out:
        raise BundleError("manifest has text_encoder_2 but no tokenizer_2; re-export the bundle")
    return out


def _check_scalars(d: dict) -> None:
    """The scalar facts the runtime computes with must have usable types."""
    need(d["latent_channels"], int, "latent_channels", positive=True)
    need(d["vae_scale_factor"], int, "vae_scale_factor", positive=True)
    need(d["scaling_factor"], (int, float), "scaling_factor", positive=True)
    if d.get("shift_factor") is not None:
        need(d["shift_factor"], (int, float), "shift_factor")
    need(d["scheduler"], dict, "scheduler")
    if "tokenizer" in d:
        need(d["tokenizer"], dict, "tokenizer")
    for section in ("dims", "defaults"):
        need(d.get(section, {}), dict, section)
    for key in ("min_size", "max_size", "max_batch"):
        if key in d.get("dims", {}):
            need(d["dims"][key], int, f"dims.{key}", positive=True)
    for key in ("height", "width", "num_inference_steps"):
        if key in d.get("defaults", {}):
            need(d["defaults"][key], int, f"defaults.{key}", positive=True)
    if "guidance_scale" in d.get("defaults", {}):
        need(d["defaults"]["guidance_scale"], (int, float), "defaults.guidance_scale")
    if "size_multiple" in d:
        need(d["size_multiple"], int, "size_multiple", positive=True)


# -- reading and writing manifest.json ------------------------------------------------------------
def read_manifest_json(bundle) -> BundleManifest:
    """``bundle``/manifest.json, parsed and type-checked (its files are not looked at)."""
    path = Path(bundle) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is damaged ({e.__class__.__name__}); re-export the bundle")
    return BundleManifest.from_json(data)


def write_manifest_json(bundle, manifest: BundleManifest) -> dict:
    """Write ``manifest`` atomically as ``bundle``/manifest.json; return the JSON written."""
    data = manifest.to_json()
    atomic_write_json(Path(bundle) / MANIFEST_NAME, data)
    return data


def edit_manifest(bundle, change) -> BundleManifest:
    """Read, change (``change(manifest)`` edits the typed object) and atomically rewrite a
    bundle's manifest. New files are written first, so until this rename the bundle is the
    old, whole one. The one way a bundle tool changes a manifest."""
    manifest = read_manifest_json(bundle)
    change(manifest)
    write_manifest_json(bundle, manifest)
    return manifest
