"""Single-file ControlNets in lllyasviel's original layout (export/controlnet_single_file.py).

The files are made here from the tiny diffusers ControlNets (conftest ``controlnet_models``) by
the inverse of diffusers' converter, written from the layout itself: the encoder half under the
U-Net's original names (tests/parity/test_sdxl_single_file.py's ``unet_to_sgm``) and the
ControlNet's own parts (``input_hint_block.*``, ``zero_convs.N.0.*``, ``middle_block_out.0.*``).
Loading one gives back every tensor exactly, whichever way its architecture is given; a bundle
exported from the files draws the folders' bundle's picture bit for bit; the full-checkpoint
variant (``control_model.*`` beside the SD model) and ``.pth`` pickles load; at SD 1.5's real
depth the names are the real files' and map one for one; what cannot be loaded is refused in one
line with exit 2 and nothing written.
"""

from __future__ import annotations

import json
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import run_cli
from test_sdxl_single_file import _rename, unet_to_sgm

from ldm_edge.runtime.compare import psnr

EXPORT = ("-m", "ldm_edge.export.cli")
PROMPT = "a red cat"
STEPS = 4
# a controlled picture lands far from the plain one (tests/parity/test_controlnet.py measured
# 26-43 dB), or the equality below proves nothing about the ControlNet's weights
MAX_PLAIN_PSNR_DB = 45.0

# ---- diffusers -> original ControlNet names (the inverse of convert_controlnet_checkpoint) ----


def _controlnet_only(net) -> dict:
    """The ControlNet's own parts (cldm.py): the conditioning embedding is input_hint_block's
    convs at 0, 2, ..., the zero convs follow the encoder's blocks, one for the middle block."""
    n = len(net.controlnet_cond_embedding.blocks)
    out = {"controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
           "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * n + 2}.",
           "controlnet_mid_block.": "middle_block_out.0."}
    out.update({f"controlnet_cond_embedding.blocks.{i}.": f"input_hint_block.{2 * i + 2}."
                for i in range(n)})
    out.update({f"controlnet_down_blocks.{i}.": f"zero_convs.{i}.0."
                for i in range(len(net.controlnet_down_blocks))})
    return out


def controlnet_to_original(net) -> dict:
    """A diffusers ControlNetModel's state dict in the original layout. The encoder half is the
    U-Net's (a ControlNet has no up half: the U-Net table's up-block entries match nothing)."""
    encoder = SimpleNamespace(config=net.config, state_dict=net.state_dict,
                              up_blocks=[None] * len(net.config.block_out_channels))
    own = _controlnet_only(net)
    return {_rename(k, own): v.detach().contiguous().clone()
            for k, v in unet_to_sgm(encoder).items()}


def _save(state: dict, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_nets(controlnet_models):
    from diffusers import ControlNetModel

    return {n: ControlNetModel.from_pretrained(p).eval() for n, p in controlnet_models.items()}


@pytest.fixture(scope="module")
def original_files(diffusers_nets, tmp_path_factory):
    """name -> the ControlNet as ``NAME.safetensors`` in the original layout."""
    root = tmp_path_factory.mktemp("controlnet_files")
    return {n: _save(controlnet_to_original(net), root / f"{n}.safetensors")
            for n, net in diffusers_nets.items()}


@pytest.fixture(scope="module")
def unet_config(tiny_models, tmp_path_factory):
    """--config for `ldm-export controlnet`: the model's folder with only unet/config.json."""
    folder = tmp_path_factory.mktemp("unet_config") / "sd1"
    (folder / "unet").mkdir(parents=True)
    shutil.copy(tiny_models["sd1"] / "unet" / "config.json", folder / "unet")
    return folder


def _unet(tiny_models):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_models["sd1"] / "unet")


def _assert_same(loaded, ref) -> None:
    a, b = loaded.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    bad = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]
    assert _arch(loaded.config) == _arch(ref.config)


def _arch(config) -> dict:
    """A config's architecture: JSON values (tuples as lists), diffusers' _bookkeeping left out."""
    return {k: json.loads(json.dumps(v)) for k, v in config.items() if not k.startswith("_")}


# ---- loading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,arch", [("edges", "unet"), ("depth", "unet"),
                                       ("edges", "model folder"), ("edges", "controlnet folder")])
def test_every_tensor_comes_back_exactly(name, arch, original_files, diffusers_nets,
                                         controlnet_models, tiny_models, unet_config, tmp_path):
    """File -> our loader -> the diffusers ControlNet's state dict and config, tensor for
    tensor; its architecture from the model's U-Net (ldm-export onnx) or --config (a model
    folder's unet/config.json, or a ControlNetModel folder's config.json)."""
    from ldm_edge.export.controlnet import load_controlnet
    from ldm_edge.export.model_facts import hash_files

    kw = {"unet": dict(unet=_unet(tiny_models)), "model folder": dict(config=unet_config)}
    if arch == "controlnet folder":
        shutil.copy(controlnet_models[name] / "config.json", tmp_path)
        kw[arch] = dict(config=tmp_path)
    path = original_files[name]
    net = load_controlnet(str(path), **kw[arch])
    _assert_same(net.module, diffusers_nets[name])
    assert (net.name, net.source, net.sha256) == (name, str(path), hash_files([path]))
    assert not net.module.training


def _full_checkpoint(net, tiny_models) -> dict:
    """The older full checkpoints: the ControlNet under control_model. beside the SD model."""
    state = {f"control_model.{k}": v for k, v in controlnet_to_original(net).items()}
    state.update({f"model.diffusion_model.{k}": v.contiguous()
                  for k, v in unet_to_sgm(_unet(tiny_models)).items()})
    state["first_stage_model.encoder.conv_in.weight"] = torch.zeros(16, 3, 3, 3)
    return state


@pytest.mark.parametrize("variant", ["control_model. full checkpoint", ".pth pickle",
                                     "FP16 .pth"])
def test_other_kinds_of_file_load(variant, diffusers_nets, tiny_models, tmp_path):
    from ldm_edge.export.controlnet import load_controlnet

    ref = diffusers_nets["edges"]
    state = controlnet_to_original(ref)
    if variant.startswith("control_model."):
        path = _save(_full_checkpoint(ref, tiny_models), tmp_path / "control_sd15_x.safetensors")
    else:
        if variant.startswith("FP16"):
            state = {k: v.half() for k, v in state.items()}
        path = _save(state, tmp_path / "control_v11p_sd15_x.pth")
    net = load_controlnet(f"lines={path}", unet=_unet(tiny_models))
    assert net.name == "lines"
    if variant.startswith("FP16"):  # widened to FP32 (what the export traces), equal to FP16
        ref = SimpleNamespace(state_dict=lambda: {k: v.half().float() for k, v in
                                                  diffusers_nets["edges"].state_dict().items()},
                              config=ref.config)
    _assert_same(net.module, ref)


def test_real_sd15_architecture_maps_name_for_name_and_shape_for_shape():
    """At SD 1.5's real depth (meta device: no memory): the layout written from it holds the
    names lllyasviel's files hold, and the loader converts it onto a ControlNet of the U-Net with
    every tensor used and every parameter filled."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ldm_edge.export.controlnet_single_file import _check_fit, _converted, _empty_controlnet

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults: SD 1.x's
        ref = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    part = controlnet_to_original(ref)
    real = ("input_hint_block.14.weight", "zero_convs.11.0.bias", "middle_block_out.0.weight",
            "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "time_embed.2.bias",
            "middle_block.1.proj_out.weight", "input_blocks.11.0.out_layers.3.weight")
    assert not [k for k in real if k not in part]
    assert tuple(part["input_hint_block.0.weight"].shape) == (16, 3, 3, 3)
    assert not any(k.startswith(("output_blocks.", "out.")) for k in part)
    net = _empty_controlnet(None, part, unet, None)
    _check_fit(None, part, _converted(None, part, net), net.state_dict(), "the U-Net")


@pytest.mark.parametrize("case,match", [
    ("a tensor left over", "(1 of its tensors unused, e.g. extra.weight): a ControlNet for"),
    ("a tensor missing", "parameters 1 missing, 0 unexpected, 0 of another shape, e.g. "
                         "controlnet_down_blocks.3.weight"),
    ("diffusers' layout", "is a ControlNet in diffusers' layout: give its folder"),
    ("--config of a VAE", "vae/config.json has _class_name AutoencoderKL; give a "
                          "UNet2DConditionModel's or a ControlNetModel's"),
])
def test_load_refusals_name_the_cause(case, match, diffusers_nets, tiny_models, tmp_path):
    """Every tensor of the file used, every parameter filled, or one line naming which."""
    from ldm_edge.export.controlnet import load_controlnet
    from ldm_edge.export.model_facts import ModelLoadError

    ref = diffusers_nets["edges"]
    state, kw = controlnet_to_original(ref), dict(unet=_unet(tiny_models))
    if case == "a tensor left over":
        state["extra.weight"] = torch.zeros(2)
    elif case == "a tensor missing":
        del state["zero_convs.3.0.weight"]
    elif case == "diffusers' layout":
        state = ref.state_dict()
    else:
        kw = dict(config=tiny_models["sd1"] / "vae")
    with pytest.raises(ModelLoadError) as e:
        load_controlnet(str(_save(state, tmp_path / "x.safetensors")), **kw)
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- export and picture ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def file_bundle(original_files, tiny_models, unet_config, tmp_path_factory):
    """The tiny SD1 model exported with --controlnet edges.safetensors (named by its stem), then
    depth.safetensors added by `ldm-export controlnet --config`."""
    out = tmp_path_factory.mktemp("controlnet_file_bundle") / "bundle"
    r = run_cli(*EXPORT, "onnx", str(tiny_models["sd1"]), "-o", str(out),
                "--controlnet", str(original_files["edges"]))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(*EXPORT, "controlnet", str(out), str(original_files["depth"]),
                "--config", str(unet_config))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_bundle_from_the_files_draws_the_folders_bundles_picture(file_bundle, controlnet_bundle,
                                                                 original_files, control_png):
    """Same latents, each ControlNet alone and both at once: bit for bit the picture of the
    bundle exported from the diffusers folders (same weights, same graphs, same runtime)."""
    from ldm_edge.export.model_facts import hash_files
    from ldm_edge.runtime.pipeline import Pipeline

    m = json.loads((file_bundle / "manifest.json").read_text())
    assert list(m["controlnets"]) == ["edges", "depth"]
    for name, path in original_files.items():
        assert m["controlnets"][name]["source"] == str(path)
        assert m["controlnets"][name]["sha256"] == hash_files([path])
    lat = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    kw = dict(num_inference_steps=STEPS, latents=lat, seed=0)
    plain = Pipeline(file_bundle)(PROMPT, **kw).images
    for control in (["edges"], ["depth"], ["edges", "depth"]):
        req = [f"{n}:{control_png}:0.9" for n in control]
        ours, theirs = (Pipeline(b)(request=Pipeline(b).request(prompt=PROMPT, control=req, **kw))
                        for b in (file_bundle, controlnet_bundle))
        assert np.array_equal(ours.images, theirs.images), (control, psnr(ours.images,
                                                                          theirs.images))
        assert psnr(ours.images, plain) < MAX_PLAIN_PSNR_DB, control


# ---- refusals --------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _wide(tmp_path):
    """An original-layout ControlNet of a wider model: 48 channels at the first level, where
    the tiny SD1 U-Net has 32."""
    from diffusers import ControlNetModel

    net = ControlNetModel(in_channels=4, block_out_channels=(48, 64, 64), layers_per_block=1,
                          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                            "DownBlock2D"),
                          cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
                          conditioning_embedding_out_channels=(8, 8, 16, 16))
    return _save(controlnet_to_original(net), tmp_path / "wide.safetensors")


def _sd_unet_file(tiny_models, tmp_path):
    state = {f"model.diffusion_model.{k}": v.contiguous()
             for k, v in unet_to_sgm(_unet(tiny_models)).items()}
    return _save(state, tmp_path / "sd15-unet.safetensors")


REFUSALS = {
    "no config": "--controlnet edges.safetensors is a single-file ControlNet: its architecture "
                 "is the model's U-Net's; give --config DIR: the diffusers folder of the bundle's "
                 "model (its unet/config.json is read; weights not needed) or a ControlNetModel "
                 "folder",
    "another architecture": "--controlnet wide.safetensors does not fit the ControlNet "
                            "architecture of the model's U-Net (parameters 0 missing, 0 "
                            "unexpected, ",
    "pickle that runs code": "--controlnet evil.pth: the pickle wants to run code",
    "an SD U-Net, not a ControlNet": "--controlnet sd15-unet.safetensors: not a ControlNet in "
                                     "the original layout (no input_hint_block.0.weight or "
                                     "control_model.input_hint_block.0.weight; its first key "
                                     "is 'model.diffusion_model.",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_cli_refusals_are_one_line_exit_2_nothing_written(case, original_files, controlnet_bundle,
                                                         tiny_models, tmp_path):
    marker = tmp_path / "ran"
    if case == "no config":  # `ldm-export controlnet`: no U-Net at hand
        bundle = tmp_path / "bundle"
        shutil.copytree(controlnet_bundle, bundle)
        before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
        r = run_cli(*EXPORT, "controlnet", str(bundle), str(original_files["edges"]))
        assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
        out = tmp_path / "nothing"
    else:
        if case == "another architecture":
            path = _wide(tmp_path)
        elif case == "pickle that runs code":
            path = tmp_path / "evil.pth"
            path.write_bytes(pickle.dumps({"time_embed.0.weight": _RunsCode(marker)}, protocol=2))
        else:
            path = _sd_unet_file(tiny_models, tmp_path)
        out = tmp_path / "out"
        r = run_cli(*EXPORT, "onnx", str(tiny_models["sd1"]), "-o", str(out),
                    "--controlnet", str(path))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert REFUSALS[case] in lines[-1] and lines[-1].startswith("ldm-export: error: "), lines[-1]
    assert "Traceback" not in r.stderr and not out.exists() and not marker.exists()
    if case == "another architecture":  # names where it does not fit
        assert "conv_in.weight is [48, 4, 3, 3] in the file, [32, 4, 3, 3] in the model" \
            in lines[-1], lines[-1]
