"""LoRA adapters as users have them, merged into the bundle's weights in numpy (float32).

Two file layouts are read (safetensors, ``safetensors_read.py``):

* diffusers / PEFT, as ``pipe.save_lora_weights`` writes it:
  ``unet.<module>.lora_A.weight`` (A, [r, in, ...]) and ``lora_B.weight`` (B, [out, r, ...]),
  ``text_encoder.<module>...``, SDXL's ``text_encoder_2.<module>...`` (or ``<module>.lora.down.weight`` / ``lora.up.weight``, the
  names diffusers' training scripts save after ``convert_state_dict_to_diffusers``); alpha from the header's ``lora_adapter_metadata``
  (``unet.lora_alpha``, ``alpha_pattern``, ``use_rslora``) or a ``<module>.alpha`` key, else
  alpha = r (what diffusers assumes);
* kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` (A), ``lora_up.weight`` (B),
  ``.alpha``; ``lora_te_`` for the text encoder, SDXL's ``lora_te1_`` / ``lora_te2_`` for its
  two; U-Net modules by diffusers' names or, in SDXL bundles (as kohya's SDXL files have
  them), by the original U-Net's (``input_blocks_4_1_...``, ``sgm.py``).

Module names resolve against the bundle's weights map (``weights_map.py``); a key that
matches nothing is an error naming how many and the first few, so a LoRA for another model
family is never applied half-way; one for a text encoder the bundle lacks (an SDXL refiner has
only ``text_encoder_2``) is refused saying so. Modules the graph does not depend on (the weights
map's ``unused``: SDXL's first encoder drops its last layer) are matched and left out. The merged weight of a parameter is

    W' = W + sum_i s_i * (alpha_i / r_i) * B_i @ A_i

(convolutions: B and A flattened to matrices, the product reshaped to W's shape), computed
from the base weights every time: switching LoRAs never builds on the previous set.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UsageError
from .safetensors_read import SafetensorsError, read_safetensors
from .sgm import sgm_module

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# how many unmatched keys an error names
SHOW_KEYS = 3
_DIFFUSERS = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+)\.alpha$")
_KOHYA = re.compile(r"^lora_(unet|te1|te2|te)_(.+)\.(lora_down|lora_up)\.weight$")
_KOHYA_ALPHA = re.compile(r"^lora_(unet|te1|te2|te)_(.+)\.alpha$")
_PART = {"lora_A": "down", "lora_down": "down", "lora.down": "down",
         "lora_B": "up", "lora_up": "up", "lora.up": "up"}
_COMPONENT = {"unet": "unet", "text_encoder": "text_encoder", "te": "text_encoder",
              "text_encoder_2": "text_encoder_2", "te1": "text_encoder", "te2": "text_encoder_2"}
# an SDXL U-Net (its added text/time embedding): only there are kohya's U-Net names the
# original U-Net's (sgm.py); SD 1.x/2.x kohya files use diffusers' names
SDXL_MARK = "add_embedding.linear_1"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry for the adapters' configs


class LoraError(UsageError):
    """A LoRA file or --lora argument that cannot be applied (exit 2)."""


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE:SCALE`` (or ``FILE``, scale 1) -> (file, scale); one-line errors."""
    path, sep, tail = text.rpartition(":")
    if not sep:
        path, tail = text, "1"
    if not path:
        raise LoraError(f"--lora {text!r}: give FILE:SCALE, e.g. style.safetensors:0.8")
    try:
        scale = float(tail)
    except ValueError:
        raise LoraError(f"--lora {text!r}: {tail!r} is not a number; give FILE:SCALE, "
                        f"e.g. style.safetensors:0.8")
    return path, check_scale(scale, text)


def check_scale(scale, what) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise LoraError(f"--lora {what}: the scale {scale!r} is not a number")
    if not math.isfinite(scale):
        raise LoraError(f"--lora {what}: the scale {scale} must be a finite number")
    return scale


@dataclass
class LoraPair:
    """One adapted module: A (``down``, [r, in, ...]), B (``up``, [out, r, ...]), alpha."""

    component: str
    module: str  # dotted (diffusers layout) or with underscores (kohya)
    key: str  # the file's key stem, for messages
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, shape: tuple) -> np.ndarray:
        """B @ A in the parameter's ``shape`` (float32), unscaled."""
        up = self.up.reshape(self.up.shape[0], -1)
        down = self.down.reshape(self.down.shape[0], -1)
        if up.shape[1] != down.shape[0]:
            raise LoraError(f"{self.key}: rank mismatch (lora_up/B has rank {up.shape[1]}, "
                            f"lora_down/A has {down.shape[0]})")
        d = up @ down
        if d.size != int(np.prod(shape)):
            raise LoraError(f"{self.key}: B @ A is {list(d.shape)}, the weight it adapts is "
                            f"{list(shape)} (a LoRA of another model size or rank mismatch)")
        return d.reshape(shape).astype(np.float32, copy=False)


class LoraFile:
    """A LoRA file read and split into modules (not yet matched to a bundle)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        what = f"--lora {self.path}"
        if not self.path.is_file():
            raise LoraError(f"{what} not found")
        try:
            tensors, meta = read_safetensors(self.path)
        except OSError as e:
            raise LoraError(f"{what} cannot be read ({e.strerror or e})")
        except SafetensorsError as e:
            raise LoraError(f"{what} is not a LoRA: {e}")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.pairs, self.unknown = _split(tensors, _adapter_config(meta))
        if not self.pairs:
            raise LoraError(f"{what} is not a LoRA: none of its {len(tensors)} tensors is a "
                            f"lora_A/lora_B or lora_down/lora_up weight")
        for p in self.pairs:
            if p.down is None or p.up is None:
                raise LoraError(f"{what}: {p.key} has only one of its two LoRA matrices "
                                f"(damaged file?)")
            if p.up.ndim < 2 or p.down.ndim < 2 or p.up.shape[1] != p.down.shape[0]:
                raise LoraError(f"{what}: {p.key}: rank mismatch (lora_up/B is "
                                f"{list(p.up.shape)}, lora_down/A is {list(p.down.shape)})")

    @property
    def name(self) -> str:
        return self.path.name


def _adapter_config(meta: dict) -> dict:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _split(tensors: dict, config: dict) -> tuple[list[LoraPair], list[str]]:
    pairs: dict[tuple, LoraPair] = {}
    unknown = []
    for key, arr in tensors.items():
        m = _DIFFUSERS.match(key) or _KOHYA.match(key)
        if m:
            comp, module, part = _COMPONENT[m.group(1)], m.group(2), _PART[m.group(3)]
            stem = key[: -len(f".{m.group(3)}.weight")]
            p = pairs.setdefault((comp, module), LoraPair(comp, module, stem))
            setattr(p, part, arr)
            continue
        m = _DIFFUSERS_ALPHA.match(key) or _KOHYA_ALPHA.match(key)
        if m and arr.size == 1:
            comp, module = _COMPONENT[m.group(1)], m.group(2)
            p = pairs.setdefault((comp, module), LoraPair(comp, module, key[: -len(".alpha")]))
            p.alpha = float(arr.reshape(-1)[0])
            continue
        unknown.append(key)
    for (comp, module), p in pairs.items():
        if p.alpha is None and config:
            a = _pattern_value(config.get(f"{comp}.alpha_pattern"), module)
            a = a if a is not None else config.get(f"{comp}.lora_alpha")
            p.alpha = None if a is None else float(a)
        p.rslora = bool(config.get(f"{comp}.use_rslora", False))
    return list(pairs.values()), unknown


@dataclass(frozen=True)
class ActiveLora:
    file: LoraFile
    scale: float


class LoraSet:
    """The LoRAs a pipeline applies, matched to one bundle's weights maps.

    ``maps``: {component: WeightsMap}. Raises LoraError for keys that match nothing, a
    module the bundle cannot adapt, or a rank/shape mismatch."""

    def __init__(self, loras, maps: dict):
        self.entries = []
        for item in loras:
            path, scale = (item if isinstance(item, (tuple, list)) else (item, 1.0))
            scale = check_scale(scale, f"{path}:{scale}")
            self.entries.append(ActiveLora(LoraFile(path), scale))
        self.maps = maps
        self._resolved = [self._resolve(e.file) for e in self.entries]

    def _resolve(self, f: LoraFile) -> list[tuple[str, str, LoraPair]]:
        """[(component, parameter, pair)] of one file, or an error for what does not fit."""
        out, unmatched, shared = [], list(f.unknown), []
        _refuse_missing_component(f, self.maps)
        for p in f.pairs:
            wmap = self.maps.get(p.component)
            param = _param_of(p, wmap)
            if param is None:
                unmatched.append(p.key)
            elif param in wmap.unused:  # no output depends on it: nothing to merge
                continue
            elif param in wmap.shared:
                shared.append(p.key)
            else:
                out.append((p.component, param, p))
        if unmatched:
            total = len(f.pairs) + len(f.unknown)
            raise LoraError(f"--lora {f.name}: {len(unmatched)} of its {total} modules match nothing "
                            f"in this bundle (first: {', '.join(sorted(unmatched)[:SHOW_KEYS])}); "
                            f"is it a LoRA for another model?")
        if shared:
            raise LoraError(f"--lora {f.name}: {len(shared)} of its modules adapt weights the "
                            f"exporter stored once for several layers (first: {shared[0]}); "
                            f"they cannot be changed alone")
        for comp, param, p in out:
            p.delta(self.maps[comp].params[param].shape)  # shape/rank check now, not mid-run
        return out

    @property
    def active(self) -> list[ActiveLora]:
        return [e for e in self.entries if e.scale != 0.0]

    def components(self) -> set[str]:
        """The components some LoRA with a non-zero scale changes."""
        return {c for e, r in zip(self.entries, self._resolved) if e.scale != 0.0 for c, _, _ in r}

    def deltas(self, component: str) -> dict[str, np.ndarray]:
        """{parameter: sum_i s_i (alpha_i / r_i) B_i A_i} in float32, in the parameter's shape."""
        out: dict[str, np.ndarray] = {}
        wmap = self.maps.get(component)
        for e, resolved in zip(self.entries, self._resolved):
            if e.scale == 0.0:
                continue
            for comp, param, p in resolved:
                if comp != component:
                    continue
                d = p.delta(wmap.params[param].shape) * np.float32(e.scale * p.factor)
                out[param] = d if param not in out else out[param] + d
        return out

    def key(self, component: str) -> str:
        """What identifies this set's effect on ``component`` (for the graph cache): each
        active file's sha256 and scale, in order; "" when nothing changes it."""
        if component not in self.components():
            return ""
        return "|".join(f"{e.file.sha256}:{e.scale!r}" for e in self.active)

    def provenance(self) -> list[dict]:
        return [{"name": e.file.name, "sha256": e.file.sha256, "scale": e.scale}
                for e in self.entries]


def _refuse_missing_component(f: LoraFile, maps: dict) -> None:
    """A file adapting a text encoder (or U-Net) this bundle does not have: one line."""
    missing = sorted({p.component for p in f.pairs if p.component not in maps})
    if missing and maps:
        n = sum(p.component == missing[0] for p in f.pairs)
        hint = (" (an SDXL refiner has only text_encoder_2)" if missing[0] == "text_encoder"
                and "text_encoder_2" in maps else "")
        raise LoraError(f"--lora {f.name}: {n} of its modules adapt {missing[0]}, which this "
                        f"bundle does not have{hint}; is it a LoRA for another model?")


def _param_of(p: LoraPair, wmap) -> str | None:
    """The mapped parameter ``p`` adapts, or None. CLIP's text model is ``text_model.encoder``
    in transformers 4 and ``encoder`` in 5: files of either kind fit bundles of either."""
    if wmap is None:
        return None
    modules = wmap.modules
    flat = wmap.flat_modules  # kohya writes the dots as underscores
    for prefix in ("", "text_model.", "text_model_"):
        for name in (p.module, p.module[len(prefix):] if p.module.startswith(prefix) else None,
                     prefix + p.module):
            if name is None:
                continue
            if name in modules:
                return f"{name}.weight"
            if name in flat:
                return f"{flat[name]}.weight"
    if p.component == "unet" and p.key.startswith("lora_unet_") and SDXL_MARK in modules:
        name = sgm_module(p.module, modules)  # kohya's SDXL files: the original U-Net's names
        if name in flat:
            return f"{flat[name]}.weight"
    return None
