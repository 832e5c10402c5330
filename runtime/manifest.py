"""The bundle's manifest: the single source of truth, validated before anything is opened.

A bundle is a folder with ``manifest.json`` and the files it names. Every file the
manifest names must lie inside the bundle (no absolute paths, no ``..``, no symlink
out), exist, and have the size and sha256 recorded at export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .fsutil import sha256_cached
from .onnx_scan import ScanError, external_locations
from .spec import COMPONENTS, ComponentSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_REQUIRED = ("format_version", "model", "components", "tokenizer", "scheduler",
             "prediction_type", "latent_channels", "vae_scale_factor", "scaling_factor")


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
    record: dict


class Manifest:
    def __init__(self, root: Path, data: dict):
        self.root = root
        self.data = data

    # -- loading --------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | os.PathLike, verify: bool = True) -> "Manifest":
        root = Path(bundle)
        if not root.is_dir():
            raise BundleError(f"bundle {str(root)!r} not found: pass the folder that "
                              f"`ldm-export onnx` wrote")
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            from .optimum import is_optimum_folder, manifest_from_optimum

            if is_optimum_folder(root):  # run a Hugging Face Optimum export as it is
                m = cls(root, manifest_from_optimum(root, hashes=verify))
                m.validate(verify=False)  # its hashes were just taken from these very files
                return m
            raise BundleError(f"{str(root)!r} has no {MANIFEST_NAME}: not a bundle, or an "
                              f"export that did not finish; rerun `ldm-export onnx`")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath} is damaged ({e.__class__.__name__}); re-export the bundle")
        m = cls(root, data)
        try:
            m.validate(verify=verify)
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
            # a structural surprise the explicit checks did not name
            raise BundleError(f"manifest.json is malformed ({type(e).__name__}: {e}); "
                              f"re-export the bundle")
        return m

    def validate(self, verify: bool = True) -> None:
        d = self.data
        if not isinstance(d, dict):
            raise BundleError("manifest.json is not a JSON object; re-export the bundle")
        missing = [k for k in _REQUIRED if k not in d]
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
        self._check_types(d)
        comps = d["components"]
        if not isinstance(comps, dict):
            raise BundleError("manifest components is not an object; re-export the bundle")
        for name in ("text_encoder", "unet", "vae_decoder"):
            if name not in comps:
                raise BundleError(f"bundle has no {name}; re-export it")
        for name, rec in comps.items():
            if name not in COMPONENTS:
                raise BundleError(f"unknown component {name!r} in manifest")
            self.spec(name)  # parses
            for precision in rec.get("variants", {}):
                self._check_files(name, precision, verify)
        tok = d["tokenizer"]
        self._check_file_record(tok, "tokenizer", verify)

    @staticmethod
    def _check_types(d: dict) -> None:
        """The scalar facts the runtime computes with must have usable types."""
        def need(value, kind, what, positive=False):
            ok = isinstance(value, kind) and not isinstance(value, bool)
            if ok and positive:
                ok = value > 0
            if not ok:
                raise BundleError(f"manifest {what} is {value!r}; re-export the bundle")

        need(d["latent_channels"], int, "latent_channels", positive=True)
        need(d["vae_scale_factor"], int, "vae_scale_factor", positive=True)
        need(d["scaling_factor"], (int, float), "scaling_factor", positive=True)
        if d.get("shift_factor") is not None:
            need(d["shift_factor"], (int, float), "shift_factor")
        need(d["scheduler"], dict, "scheduler")
        tok = d["tokenizer"]
        need(tok, dict, "tokenizer")
        need(tok.get("max_length"), int, "tokenizer.max_length", positive=True)
        need(tok.get("pad_id"), int, "tokenizer.pad_id")
        need(tok.get("pad_token"), str, "tokenizer.pad_token")
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

    def _check_files(self, name: str, precision: str, verify: bool) -> None:
        rec = self.data["components"][name]["variants"][precision]
        if precision not in PRECISIONS:
            raise BundleError(f"{name}: unknown precision {precision!r}")
        what = f"{name} ({precision})"
        for f in rec.get("files", []):
            self._check_file_record(f, what, verify)
        main = safe_member(self.root, rec.get("file"), what)
        if not main.is_file():
            raise BundleError(f"{what}: {main.name} is missing from the bundle; re-export it")
        self._check_external_data(rec, main, what)

    def _check_external_data(self, rec: dict, main: Path, what: str) -> None:
        """Every external-data file the graph names must be inside the bundle and listed."""
        try:
            locations = external_locations(main)
        except (ScanError, OSError) as e:
            raise BundleError(f"{what}: {main.name} is not a readable ONNX file ({e}); "
                              f"re-export the bundle")
        listed = {f.get("path") for f in rec.get("files", []) if isinstance(f, dict)}
        folder = Path(rec["file"]).parent
        for loc in locations:
            rel = (folder / loc).as_posix() if not Path(loc).is_absolute() else loc
            data = safe_member(self.root, rel, f"{what} external data")
            if not data.is_file():
                raise BundleError(f"{what}: {main.name} reads weights from {loc!r}, which is "
                                  f"missing; copy it next to {main.name} or re-export")
            if Path(rel).as_posix() not in listed:
                raise BundleError(f"{what}: {main.name} reads weights from {loc!r}, which the "
                                  f"manifest does not list; re-export the bundle")

    def _check_file_record(self, rec: dict, what: str, verify: bool) -> None:
        if not isinstance(rec, dict):
            raise BundleError(f"{what}: malformed file record in manifest")
        path = safe_member(self.root, rec.get("file") or rec.get("path"), what)
        if not path.is_file():
            raise BundleError(f"{what}: {path.name} is missing from the bundle; re-export it")
        size = rec.get("size")
        if size is not None and path.stat().st_size != size:
            raise BundleError(f"{what}: {path.name} has {path.stat().st_size} bytes, the manifest "
                              f"says {size} (truncated copy?); copy or re-export it again")
        if verify and rec.get("sha256") and sha256_cached(path) != rec["sha256"]:
            raise BundleError(f"{what}: {path.name} does not match its sha256 in the manifest "
                              f"(damaged copy?); copy or re-export it again")

    # -- accessors --------------------------------------------------------------
    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def component_names(self) -> list[str]:
        return list(self.data["components"])

    def has(self, name: str) -> bool:
        return name in self.data["components"]

    def spec(self, name: str) -> ComponentSpec:
        try:
            return ComponentSpec.from_json(name, self.data["components"][name]["spec"])
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{name}: malformed spec in manifest ({e}); re-export the bundle")

    def precisions(self, name: str) -> list[str]:
        return list(self.data["components"][name].get("variants", {}))

    def variant(self, name: str, precision: str) -> Variant:
        variants = self.data["components"][name].get("variants", {})
        if precision not in variants:
            have = ", ".join(variants) or "none"
            hint = {"fp16": "ldm-export fp16 BUNDLE", "int8": "ldm-export int8 BUNDLE"}.get(
                precision, "ldm-export onnx")
            raise BundleError(f"{name} has no {precision} variant in this bundle (has: {have}); "
                              f"make it with `{hint}`")
        rec = variants[precision]
        return Variant(name, precision, safe_member(self.root, rec["file"], name), rec)

    @property
    def tokenizer_path(self) -> Path:
        return safe_member(self.root, self.data["tokenizer"]["file"], "tokenizer")
