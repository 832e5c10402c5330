"""ControlNet interfaces: the residual inputs of a U-Net that takes them, and a ControlNet's own
graph. Pure python: imported by both halves (export builds these specs, the runtime reads them
back from the manifest and feeds them).

A ControlNet returns one residual per skip connection of the U-Net's down path (diffusers'
``down_block_additional_residuals``: the conv_in output, then each resnet's and each
down-sampler's output; 12 for SD1.5's layout) and one for the mid block
(``mid_block_additional_residual``). The U-Net adds them to its own; fed zeros it computes
exactly what the plain U-Net computes. A residual at down-sampling level ``k`` has
ceil(latent / 2**k) rows and columns (a stride-2, padding-1, 3x3 conv rounds up): its symbolic
dims are ``latent_height_div{2**k}`` (level 0: ``latent_height``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .spec import TIMESTEP_DTYPE, ComponentSpec, TensorSpec

# the bundle's component key of ControlNet NAME, and the folder its graph is written to
CONTROLNET_PREFIX = "controlnet/"
DOWN_RESIDUAL = "down_block_residual_{}"
MID_RESIDUAL = "mid_block_residual"
CONDITIONING_SCALE = "conditioning_scale"
# an SDXL U-Net's added conditioning (pooled text, micro-conditioning): an SDXL ControlNet
# (diffusers' addition_embed_type "text_time") takes them as the U-Net does
ADDED_INPUTS = ("text_embeds", "time_ids")
# a ControlNet's name: what --control NAME:IMAGE types and the graph's file name
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LEVEL_DIM = re.compile(r"^(latent_height|latent_width)_div(\d+)$")


def component_key(name: str) -> str:
    return CONTROLNET_PREFIX + name


def is_controlnet(component: str) -> bool:
    return component.startswith(CONTROLNET_PREFIX) and bool(
        NAME_PATTERN.match(component[len(CONTROLNET_PREFIX):]))


@dataclass(frozen=True)
class Residual:
    """One residual: its tensor name, channels and down-sampling level."""

    name: str
    channels: int
    level: int

    def dims(self) -> tuple[str, str]:
        if self.level == 0:
            return "latent_height", "latent_width"
        k = 2 ** self.level
        return f"latent_height_div{k}", f"latent_width_div{k}"

    def tensor(self) -> TensorSpec:
        return TensorSpec(self.name, "float32", ("batch", self.channels, *self.dims()))

    def shape(self, batch: int, latent_height: int, latent_width: int) -> tuple[int, ...]:
        k = 2 ** self.level
        return batch, self.channels, math.ceil(latent_height / k), math.ceil(latent_width / k)


def residual_layout(block_out_channels, layers_per_block) -> list[Residual]:
    """The residuals of a diffusers UNet2DConditionModel config (down path, then mid):
    conv_in's output, each down block's resnets, each down-sampler (all blocks but the last)."""
    chans = [int(c) for c in block_out_channels]
    layers = ([int(layers_per_block)] * len(chans) if isinstance(layers_per_block, int)
              else [int(n) for n in layers_per_block])
    out = [(chans[0], 0)]
    for i, c in enumerate(chans):
        out += [(c, i)] * layers[i]
        if i < len(chans) - 1:
            out.append((c, i + 1))
    res = [Residual(DOWN_RESIDUAL.format(j), c, lvl) for j, (c, lvl) in enumerate(out)]
    return res + [Residual(MID_RESIDUAL, chans[-1], len(chans) - 1)]


def residuals_of(spec: ComponentSpec) -> list[Residual]:
    """The residual inputs of a U-Net spec (or outputs of a ControlNet's), in order; [] for a
    U-Net that takes none."""
    out = []
    for t in spec.inputs + spec.outputs:
        if t.name.startswith(DOWN_RESIDUAL.format("")) or t.name == MID_RESIDUAL:
            m = _LEVEL_DIM.match(str(t.shape[2]))
            level = int(math.log2(int(m.group(2)))) if m else 0
            out.append(Residual(t.name, int(t.shape[1]), level))
    return out


def level_of(dim: str) -> tuple[str, int] | None:
    """``latent_height_div4`` -> ("latent_height", 4); None for any other dim."""
    m = _LEVEL_DIM.match(str(dim))
    return (m.group(1), int(m.group(2))) if m else None


def takes_residuals(unet: ComponentSpec) -> bool:
    return MID_RESIDUAL in unet.input_names


def level_ranges(residuals: list[Residual], latent_range: tuple[int, int]) -> dict:
    """Exported ranges of the level dims (ceil of the latent range's ends)."""
    out = {}
    for r in residuals:
        k = 2 ** r.level
        for d in (r.dims() if r.level else ()):
            out[d] = (math.ceil(latent_range[0] / k), math.ceil(latent_range[1] / k))
    return out


def level_dims(latent_height: int, latent_width: int, levels: int = 8) -> dict[str, int]:
    """Every level dim's size for a latent of this size (for code that makes sample feeds
    from a spec's symbolic dims, bundletools/forms.py)."""
    out = {}
    for lvl in range(1, levels):
        k = 2 ** lvl
        out[f"latent_height_div{k}"] = math.ceil(latent_height / k)
        out[f"latent_width_div{k}"] = math.ceil(latent_width / k)
    return out


def with_residuals(unet: ComponentSpec, residuals: list[Residual]) -> ComponentSpec:
    """The U-Net's spec with the residuals as extra inputs, after its own."""
    lat = unet.ranges.get("latent_height", (1, 1 << 16))
    ranges = {**unet.ranges, **level_ranges(residuals, lat)}
    return ComponentSpec(unet.name, unet.inputs + tuple(r.tensor() for r in residuals),
                         unet.outputs, ranges)


def controlnet_spec(name: str, unet: ComponentSpec, residuals: list[Residual],
                    factor: int) -> ComponentSpec:
    """A ControlNet's graph: the U-Net's sample, timestep and text states, the control image
    (``controlnet_cond``, [0, 1] RGB at pixel size) and one scale per residual
    (``conditioning_scale``: the scale, or guess mode's 0.1..1 ramp times it) -> the
    residuals, already scaled. An SDXL U-Net's added conditioning (``ADDED_INPUTS``) is the
    ControlNet's too, after the text states. The sample is the latents alone, the U-Net's
    output channels (an inpainting U-Net's sample has the mask and masked image besides)."""
    by = {t.name: t for t in unet.inputs}
    n = len(residuals)
    s = by["sample"]
    sample = TensorSpec(s.name, s.dtype, (s.shape[0], unet.outputs[0].shape[1], *s.shape[2:]))
    inputs = (sample, TensorSpec("timestep", TIMESTEP_DTYPE, ("batch",)),
              by["encoder_hidden_states"], *(by[a] for a in ADDED_INPUTS if a in by),
              TensorSpec("controlnet_cond", "float32", ("batch", 3, "height", "width")),
              TensorSpec(CONDITIONING_SCALE, "float32", (n,)))
    lo, hi = unet.ranges.get("latent_height", (1, 1 << 16))
    ranges = {k: v for k, v in unet.ranges.items()
              if k in ("batch", "latent_height", "latent_width")}
    ranges.update(level_ranges(residuals, (lo, hi)), height=(lo * factor, hi * factor),
                  width=(lo * factor, hi * factor))
    return ComponentSpec(component_key(name), inputs, tuple(r.tensor() for r in residuals), ranges)
