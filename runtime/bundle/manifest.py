"""The bundle's manifest: the single source of truth, validated before anything is opened.

A bundle is a folder with ``manifest.json`` and the files it names. Every file the
manifest names must lie inside the bundle (no absolute paths, no ``..``, no symlink
out), exist, and have the size and sha256 recorded at export.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import BundleError
from ..fsutil import sha256_cached
from .onnx_scan import ScanError, external_locations
from .schema import TENSORRT_FORM, BundleManifest, ComponentRecord, FileRecord, VariantRecord
from .spec import ComponentSpec


def safe_member(root: Path, rel: str, what: str) -> Path:
    """Resolve ``rel`` inside ``root`` or refuse: the manifest may not point outside."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{what}: file name missing in manifest")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or "\x00" in rel:
        raise BundleError(f"{what}: manifest names {rel!r}, outside the bundle; refusing it")
    full = root / p
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
        raise BundleError(f"{what}: {rel!r} is a link that leads outside the bundle; refusing it")
    return full


@dataclass
class Variant:
    """One precision of one component: its ONNX file (plus external data) and engines."""

    component: str
    precision: str
    path: Path
    record: VariantRecord


class Manifest:
    """A bundle's typed manifest (``schema``) bound to its folder, whose files it checks."""

    def __init__(self, root: Path, schema: BundleManifest | dict):
        self.root = Path(root)
        self.schema = schema if isinstance(schema, BundleManifest) \
            else BundleManifest.from_json(schema)

    # -- loading --------------------------------------------------------------
    def validate(self, verify: bool = True) -> None:
        """Every file the manifest names is inside the bundle, present, of its recorded size
        and (``verify``) sha256. Types and shapes were checked when the schema was read."""
        for name, rec in self.schema.components.items():
            for precision in rec.variants:
                self._check_files(name, precision, verify)
            if rec.weights_map is not None:  # LoRA's weights map (runtime/lora/weights_map.py)
                self._check_file_record(rec.weights_map, f"{name} weights map", verify)
        for key in ("tokenizer", "tokenizer_2"):  # none for a model that takes no prompt
            if (tok := getattr(self.schema, key)) is not None:
                self._check_file_record(tok.file_record, key, verify)

    def _check_files(self, name: str, precision: str, verify: bool) -> None:
        rec = self.schema.components[name].variants[precision]
        what = f"{name} ({precision})"
        for f in rec.files:
            self._check_file_record(f, what, verify)
        main = safe_member(self.root, rec.file, what)
        if not main.is_file():
            raise BundleError(f"{what}: {main.name} is missing from the bundle; re-export it")
        listed = {f.path for f in rec.files}
        self._check_external_data(listed, Path(rec.file).parent, main, what)
        for kind, form in rec.forms.items():  # e.g. ort-mha: may read the plain graph's weights
            form_what = f"{what} {kind} form"
            for f in form.files:
                self._check_file_record(f, form_what, verify)
            form_main = safe_member(self.root, form.file, form_what)
            if not form_main.is_file():
                raise BundleError(f"{form_what}: {form_main.name} is missing from the bundle; "
                                  f"re-export it or run `ldm-export fuse`")
            self._check_external_data(listed | {f.path for f in form.files},
                                      Path(form.file).parent, form_main, form_what)

    def _check_external_data(self, listed: set, folder: Path, main: Path, what: str) -> None:
        """Every external-data file the graph names must be inside the bundle and listed."""
        try:
            locations = external_locations(main)
        except (ScanError, OSError) as e:
            raise BundleError(f"{what}: {main.name} is not a readable ONNX file ({e}); "
                              f"re-export the bundle")
        for loc in locations:
            rel = (folder / loc).as_posix() if not Path(loc).is_absolute() else loc
            data = safe_member(self.root, rel, f"{what} external data")
            if not data.is_file():
                raise BundleError(f"{what}: {main.name} reads weights from {loc!r}, which is "
                                  f"missing; copy it next to {main.name} or re-export")
            if Path(rel).as_posix() not in listed:
                raise BundleError(f"{what}: {main.name} reads weights from {loc!r}, which the "
                                  f"manifest does not list; re-export the bundle")

    def _check_file_record(self, rec: FileRecord, what: str, verify: bool) -> None:
        path = safe_member(self.root, rec.path, what)
        if not path.is_file():
            raise BundleError(f"{what}: {path.name} is missing from the bundle; re-export it")
        size = rec.size
        if size is not None and path.stat().st_size != size:
            raise BundleError(f"{what}: {path.name} has {path.stat().st_size} bytes, the manifest "
                              f"says {size} (truncated copy?); copy or re-export it again")
        if verify and rec.sha256 and sha256_cached(path) != rec.sha256:
            raise BundleError(f"{what}: {path.name} does not match its sha256 in the manifest "
                              f"(damaged copy?); copy or re-export it again")

    # -- accessors --------------------------------------------------------------
    @property
    def component_names(self) -> list[str]:
        return list(self.schema.components)

    def has(self, name: str) -> bool:
        return name in self.schema.components

    def component(self, name: str) -> ComponentRecord:
        return self.schema.components[name]

    def spec(self, name: str) -> ComponentSpec:
        return self.schema.components[name].spec

    def precisions(self, name: str) -> list[str]:
        return self.schema.precisions(name)

    def variant(self, name: str, precision: str) -> Variant:
        variants = self.schema.components[name].variants
        if precision not in variants:
            have = ", ".join(variants) or "none"
            hint = {"fp16": "ldm-export fp16 BUNDLE", "int8": "ldm-export int8 BUNDLE"}.get(
                precision, "ldm-export onnx")
            raise BundleError(f"{name} has no {precision} variant in this bundle (has: {have}); "
                              f"make it with `{hint}`")
        rec = variants[precision]
        return Variant(name, precision, safe_member(self.root, rec.file, name), rec)

    def tensorrt_source(self, name: str, precision: str) -> tuple[Path, str | None]:
        """The graph TensorRT builds ``name``'s ``precision`` engine from, and its sha256: the
        variant's TensorRT form where it has one (INT8), else its plain graph."""
        variant = self.variant(name, precision)
        form = variant.record.forms.get(TENSORRT_FORM)
        if form is None:
            return variant.path, variant.record.sha256
        path = safe_member(self.root, form.file, f"{name} ({precision}) {TENSORRT_FORM} form")
        own = next((f for f in form.files if f.path == form.file), None)
        return path, own.sha256 if own else None

    @property
    def tokenizer_path(self) -> Path:
        return safe_member(self.root, self.schema.tokenizer.file, "tokenizer")

    def tokenizer_file(self, key: str = "tokenizer") -> Path:
        """The file of tokenizer record ``key`` ("tokenizer", or SDXL's "tokenizer_2")."""
        return safe_member(self.root, getattr(self.schema, key).file, key)
