"""Single-file ControlNets in lllyasviel's original layout (``control_v11p_sd15_canny.pth``,
``control_sd15_canny.pth``, their ``.safetensors`` conversions).

The ControlNet's keys are the U-Net encoder's original names (``time_embed.*``,
``input_blocks.*``, ``middle_block.*``) plus its own ``input_hint_block.*`` (the conditioning
embedding), ``zero_convs.N.0.*`` and ``middle_block_out.0.*``, bare or all under
``control_model.`` (the older full checkpoints also hold the SD model, ``model.diffusion_model.*``,
``first_stage_model.*``, ...: those are not read).

The file holds weights only. An original ControlNet is a copy of its model's U-Net encoder, so
its architecture is the model's U-Net's (diffusers' ``ControlNetModel.from_unet``): at
``ldm-export onnx SOURCE --controlnet FILE`` that U-Net is the one being exported; at
``ldm-export controlnet BUNDLE FILE`` it comes from ``--config DIR``, the diffusers folder of the
bundle's model (its ``unet/config.json``; weights not needed) or a ControlNetModel folder
(its ``config.json``: the whole ControlNet architecture). The conditioning embedding's widths
and input channels are read off the file's ``input_hint_block`` (the original's are 16, 32, 96,
256 on RGB, diffusers' defaults). The key mapping is diffusers' own
(``single_file_utils.convert_controlnet_checkpoint``); the load is strict: every tensor of the
file's ControlNet is used and every parameter filled, or the file is refused in one line.

Pickles are opened with ``weights_only=True`` only (export/single_file.py's reader).
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm_edge.runtime.errors import first_line

from .model_facts import ModelLoadError, hash_files

SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")
PREFIX = "control_model."  # diffusers' LDM_CONTROLNET_KEY: the full checkpoints' ControlNet
# only a ControlNet has a conditioning embedding; its first conv takes the control image
MARK = "input_hint_block.0.weight"
# the original input_hint_block (cldm.py): 8 convs at 0, 2, ..., 14 (SiLUs between); diffusers'
# ControlNetConditioningEmbedding(conditioning_embedding_out_channels=(c0, c1, c2, c3)) is
# conv_in -> c0, then c_i -> c_i and c_i -> c_(i+1) (stride 2), conv_out: so c0..c3 are the
# output widths of the convs at these indices
HINT_WIDTH_CONVS = (0, 4, 8, 12)
CONFIG_HELP = ("give --config DIR: the diffusers folder of the bundle's model (its "
               "unet/config.json is read; weights not needed) or a ControlNetModel folder")


def is_controlnet_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in SUFFIXES


def load_controlnet_file(path: Path, *, unet=None, config: str | Path | None = None):
    """(ControlNetModel in FP32, eval mode; the file's sha256). Its architecture is ``unet``'s
    (a diffusers UNet2DConditionModel) or ``config``'s; ModelLoadError (one line) otherwise."""
    if unet is None and config is None:
        raise ModelLoadError(f"--controlnet {path.name} is a single-file ControlNet: its "
                             f"architecture is the model's U-Net's; {CONFIG_HELP}")
    from .single_file import _read_state

    try:
        state, _ = _read_state(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"--controlnet {e}") from e
    part = _controlnet_part(path, state)
    net = _empty_controlnet(path, part, unet, config)
    weights = _converted(path, part, net)
    _check_fit(path, part, weights, net.state_dict(),
               "the model's U-Net" if unet is not None else f"--config {config}")
    net.load_state_dict(weights, strict=True, assign=True)
    return net.float().eval(), hash_files([path])


def _check_fit(path: Path, part: dict, weights: dict, own: dict, arch: str) -> None:
    """ModelLoadError unless every tensor of the file's ControlNet became a parameter and every
    parameter (and persistent buffer) came from the file, each of its shape."""
    from .sdxl_single_file import _misfit

    used = {id(v) for v in weights.values()}  # the converter renames, never copies
    unused = [k for k, v in part.items() if id(v) not in used]
    misfit = _misfit(own, weights)
    if not (unused or misfit):
        return
    detail = [f"{len(unused)} of its tensors unused, e.g. {unused[0]}"] if unused else []
    if misfit:
        detail.append(f"parameters {misfit}")
    shaped = next((k for k in own if k in weights and weights[k].shape != own[k].shape), None)
    if shaped:
        detail.append(f"{shaped} is {list(weights[shaped].shape)} in the file, "
                      f"{list(own[shaped].shape)} in the model")
    raise ModelLoadError(f"--controlnet {path.name} does not fit the ControlNet architecture of "
                         f"{arch} ({'; '.join(detail)}): a ControlNet for another model?")


def _controlnet_part(path: Path, state: dict) -> dict:
    """The file's ControlNet tensors under their original names (``control_model.`` taken off),
    the same tensor objects as in ``state``; ModelLoadError when it holds no ControlNet."""
    import torch

    if any(k.startswith(PREFIX) for k in state):
        part = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    else:
        part = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if MARK in part:
        return part
    if "controlnet_cond_embedding.conv_in.weight" in part:
        raise ModelLoadError(f"--controlnet {path.name} is a ControlNet in diffusers' layout: "
                             f"give its folder (with config.json) instead")
    first = next(iter(state), "none")
    raise ModelLoadError(f"--controlnet {path.name}: not a ControlNet in the original layout (no "
                         f"{MARK} or {PREFIX}{MARK}; its first key is {first!r})")


def _empty_controlnet(path: Path, part: dict, unet, config):
    """A ControlNetModel of ``unet``'s or ``config``'s architecture, its parameters not yet
    allocated (accelerate's empty weights: the file's tensors are assigned to them)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel, UNet2DConditionModel

    with init_empty_weights():
        if unet is None:
            kind, cfg = _config(Path(config))
            if kind == "ControlNetModel":
                return _build(ControlNetModel, cfg)
            unet = _build(UNet2DConditionModel, cfg)
        try:
            hint = tuple(int(part[f"input_hint_block.{i}.weight"].shape[0])
                         for i in HINT_WIDTH_CONVS)
        except KeyError as e:
            raise ModelLoadError(f"--controlnet {path.name}: its input_hint_block lacks {e}; "
                                 f"not the original's eight convolutions") from e
        return ControlNetModel.from_unet(
            unet, load_weights_from_unet=False, conditioning_embedding_out_channels=hint,
            conditioning_channels=int(part[MARK].shape[1]))


def _config(folder: Path) -> tuple[str, dict]:
    """(class name, config) of ``--config DIR``: DIR/unet/config.json or DIR/config.json."""
    for cfg in (folder / "unet" / "config.json", folder / "config.json"):
        if cfg.is_file():
            try:
                d = json.loads(cfg.read_text())
            except ValueError as e:
                raise ModelLoadError(f"--config {cfg}: not JSON ({first_line(e)})") from e
            kind = d.get("_class_name")
            if kind in ("UNet2DConditionModel", "ControlNetModel"):
                return kind, d
            raise ModelLoadError(f"--config {cfg} has _class_name {kind}; give a "
                                 f"UNet2DConditionModel's or a ControlNetModel's")
    raise ModelLoadError(f"--config {folder}: no unet/config.json or config.json; {CONFIG_HELP}")


def _build(cls, cfg: dict):
    try:
        return cls.from_config(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"--config: cannot build a {cls.__name__} from it "
                             f"({first_line(e)})") from e


def _converted(path: Path, part: dict, net) -> dict:
    """diffusers' names for the file's tensors (diffusers' converter; parameters it could not
    find dropped, so that they count as missing)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    try:
        out = convert_controlnet_checkpoint(part, net.config)
    except (KeyError, IndexError, ValueError, RuntimeError, AttributeError) as e:
        raise ModelLoadError(f"--controlnet {path.name}: diffusers could not convert it "
                             f"({first_line(e)}); a ControlNet for another model?") from e
    return {k: v for k, v in out.items() if v is not None}
