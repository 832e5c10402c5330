"""SDXL single-file checkpoints in Stability's original (SGM) layout, base and refiner.

The checkpoints are made here from tiny diffusers SDXL folders (export/tiny_sdxl.py) by
converting every state dict back to the original layout (the inverse of diffusers'
single_file_utils converters, written from the layout itself: ``model.diffusion_model.*``,
``first_stage_model.*``, ``conditioner.embedders.*``). Loading one with ``--config`` (the
folder with its weights removed) must give back every tensor exactly; the bundles exported
from the files draw the folders' diffusers pictures (base text-to-image, refiner
image-to-image); at SDXL's real depth the names and shapes map one for one (meta device);
what cannot be loaded is refused in one line with exit 2 and nothing written.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import need_export_extra, run_cli, to_uint8

from ldm_edge.runtime.compare import psnr

EXPORT = ("-m", "ldm_edge.export.cli")
# 8-bit picture bar: only single-level rounding flips from ~1e-6 FP32 differences between
# onnxruntime and PyTorch (as tests/parity/test_sdxl.py)
MIN_PSNR_DB = 50.0
PROMPT = "a red cat"
STEPS = 4
KINDS = ("base", "refiner")
SGM_TE1 = "conditioner.embedders.0.transformer."
SGM_TE2 = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}

# ---- diffusers -> SGM names (the inverse of diffusers.loaders.single_file_utils) ----------

UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.",
            "time_embedding.linear_2.": "time_embed.2.", "conv_in.": "input_blocks.0.0.",
            "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
            "add_embedding.linear_1.": "label_emb.0.0.",
            "add_embedding.linear_2.": "label_emb.0.2."}
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
            "to_out.0.": "proj_out."}
OPENCLIP = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
            "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj."}


def _rename(key: str, prefixes: dict) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _unet_prefixes(unet) -> dict:
    """diffusers block prefix -> SGM block prefix, for any depth and layers_per_block."""
    n, per = len(unet.config.block_out_channels), int(unet.config.layers_per_block)
    out = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
           "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(per):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * (per + 1) + j}.1."
        out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * (per + 1)}.0.op."
        has_attn = hasattr(unet.up_blocks[i], "attentions")
        for j in range(per + 1):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * (per + 1) + j}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * (per + 1) + j}.1."
        up = f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}."  # after its attention
        out[f"up_blocks.{i}.upsamplers.0."] = up
    return out


def unet_to_sgm(unet) -> dict:
    blocks, state = _unet_prefixes(unet), {}
    for key, v in unet.state_dict().items():
        new = _rename(key, UNET_TOP)
        if new == key:
            new = _rename(key, blocks)
            if ".resnets." in key:  # down_blocks.I.resnets.J.NAME.TAIL
                name, tail = key.split(".resnets.")[1].split(".", 2)[1:]
                new = new[: -len(f"{name}.{tail}")] + f"{UNET_RESNET[name]}.{tail}"
        state[new] = v
    return state


def vae_to_sgm(vae) -> dict:
    n = len(vae.config.block_out_channels)
    prefixes = {f"{p}.conv_norm_out.": f"{p}.norm_out." for p in ("encoder", "decoder")}
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for k in range(2):
            prefixes[f"{part}.mid_block.resnets.{k}."] = f"{part}.mid.block_{k + 1}."
    for i in range(n):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{n - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    state = {}
    for key, v in vae.state_dict().items():
        new = _rename(key, prefixes).replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            head, _, tail = new.partition(".mid.attn_1.")
            new = f"{head}.mid.attn_1.{_rename(tail, VAE_ATTN)}"
            v = v.reshape(*v.shape, 1, 1) if v.ndim == 2 else v  # SGM: 1x1 convolutions
        state[new] = v
    return state


def openclip_to_sgm(te2) -> dict:
    """CLIPTextModelWithProjection -> open_clip's text tower (q, k, v joined as in_proj)."""
    sd = {("" if k.startswith(("text_model.", "text_projection")) else "text_model.") + k: v
          for k, v in te2.state_dict().items()}
    out = {"token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
           "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    for p in ("weight", "bias"):
        out[f"ln_final.{p}"] = sd.pop(f"text_model.final_layer_norm.{p}")
    layers = {k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")}
    for n in sorted(layers, key=int):
        pre = f"text_model.encoder.layers.{n}."
        for p in ("weight", "bias"):
            out[f"transformer.resblocks.{n}.attn.in_proj_{p}"] = torch.cat(
                [sd.pop(f"{pre}self_attn.{q}_proj.{p}") for q in "qkv"])
        for k in [k for k in sd if k.startswith(pre)]:
            out[f"transformer.resblocks.{n}.{_rename(k[len(pre):], OPENCLIP)}"] = sd.pop(k)
    assert not sd, f"unconverted: {sorted(sd)[:5]}"
    return out


def sgm_checkpoint(pipe, kind: str) -> dict:
    state = {f"model.diffusion_model.{k}": v for k, v in unet_to_sgm(pipe.unet).items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_sgm(pipe.vae).items()})
    state.update({SGM_TE2[kind] + k: v for k, v in openclip_to_sgm(pipe.text_encoder_2).items()})
    if pipe.text_encoder is not None:  # in transformers' layout, with its text_model. level
        for k, v in pipe.text_encoder.state_dict().items():
            state[SGM_TE1 + ("" if k.startswith("text_model.") else "text_model.") + k] = v
        n = pipe.text_encoder.config.max_position_embeddings  # older files hold this buffer
        state[SGM_TE1 + "text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sgm_files(tmp_path_factory):
    """kind -> (diffusers folder, SGM .safetensors, --config folder without weights)."""
    need_export_extra()
    from safetensors.torch import save_file

    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl, tiny_sdxl_pipeline

    root, out = tmp_path_factory.mktemp("sdxl_sgm"), {}
    for kind in KINDS:
        folder = save_tiny_sdxl(root / kind, kind)
        config = root / f"{kind}-config"
        shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        ckpt = root / f"sd_xl_{kind}_tiny.safetensors"
        save_file(sgm_checkpoint(tiny_sdxl_pipeline(kind), kind), str(ckpt))
        out[kind] = (folder, ckpt, config)
    return out


def _networks(model) -> dict:
    nets = {"unet": model.unet, "vae": model.vae,
            "text_encoder_2": model.second_encoder.text_encoder}
    if model.text_encoder is not None:
        nets["text_encoder"] = model.text_encoder
    return nets


# ---- loading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_tensor_comes_back_exactly(kind, sgm_files):
    """The strongest check: the file's networks are the folder's, tensor for tensor, and the
    pipeline facts (tokenizers, scheduler, SDXL settings, defaults) are the folder's too."""
    from ldm_edge.export.load import load_model

    folder, ckpt, config = sgm_files[kind]
    ours, ref = load_model(ckpt, config=str(config)), load_model(folder)
    mine, theirs = _networks(ours), _networks(ref)
    assert mine.keys() == theirs.keys()
    for name, net in theirs.items():
        a, b = mine[name].state_dict(), net.state_dict()
        assert a.keys() == b.keys(), name
        bad = [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
        assert not bad, f"{name}: {bad[:5]}"
    for fact in ("family", "tokenizer_json", "tokenizer_max_length", "pad_token_id", "pad_token",
                 "scheduler_config", "defaults", "task", "cross_attention_dim", "time_ids_dim"):
        assert getattr(ours, fact) == getattr(ref, fact), fact
    s1, s2 = ours.second_encoder, ref.second_encoder
    assert (s1.tokenizer, s1.force_zeros_for_empty_prompt, s1.requires_aesthetics_score) == \
        (s2.tokenizer, s2.force_zeros_for_empty_prompt, s2.requires_aesthetics_score)
    assert ours.source == ckpt.name
    assert ours.family == ("sdxl" if kind == "base" else "sdxl-refiner")


def test_fp16_file_loads_as_fp32(sgm_files, tmp_path):
    """Most published SDXL files are FP16: the networks come out FP32 (what the export traces),
    equal to the FP16 values."""
    from safetensors.torch import load_file, save_file

    from ldm_edge.export.load import load_model

    _, ckpt, config = sgm_files["refiner"]
    half = tmp_path / "half.safetensors"
    state = load_file(str(ckpt))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, str(half))
    model = load_model(half, config=str(config))
    w = model.unet.conv_in.weight
    ref = load_model(ckpt, config=str(config)).unet.conv_in.weight
    assert w.dtype == torch.float32 and torch.equal(w, ref.half().float())


# ---- export and picture ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_bundle(sgm_files, tmp_path_factory):
    _, ckpt, config = sgm_files["base"]
    out = tmp_path_factory.mktemp("sdxl_sgm_bundle") / "b"
    r = run_cli(*EXPORT, "onnx", str(ckpt), "--config", str(config), "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "family sdxl," in r.stderr
    return out


def test_bundle_from_the_file_draws_the_folders_picture(sgm_files, base_bundle):
    """Same latents: the runtime on the single file's bundle vs diffusers'
    StableDiffusionXLPipeline on the diffusers folder the file was made from."""
    import diffusers

    from ldm_edge.runtime.pipeline import Pipeline

    folder = sgm_files["base"][0]
    manifest = json.loads((base_bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == "sdxl"
    assert manifest["model"]["source"] == sgm_files["base"][1].name
    lat = np.random.default_rng(0).standard_normal((1, 4, 16, 12), dtype=np.float32)
    kw = dict(negative_prompt="a blue dog", num_inference_steps=STEPS, guidance_scale=6.0,
              height=128, width=96)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ref = to_uint8(pipe(PROMPT, latents=torch.from_numpy(lat), output_type="np",
                        generator=torch.Generator().manual_seed(0), **kw).images)
    ours = Pipeline(base_bundle)(PROMPT, latents=lat, scheduler="euler", seed=0, **kw)
    print(f"single-file SDXL bundle vs diffusers folder: {psnr(ours.images, ref):.1f} dB")
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


@pytest.fixture(scope="module")
def refiner_bundle(sgm_files, tmp_path_factory):
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    _, ckpt, config = sgm_files["refiner"]
    out = tmp_path_factory.mktemp("sdxl_sgm_refiner") / "b"
    export_bundle(load_model(ckpt, config=str(config)), out, ExportOptions())
    return out


def test_refiner_from_the_file_refines_as_the_folder_does(sgm_files, refiner_bundle):
    """The refiner's bundle as an image-to-image step (aesthetic scores given) vs diffusers'
    StableDiffusionXLImg2ImgPipeline on the folder, same noise."""
    import diffusers
    from helpers import TorchNoise
    from PIL import Image

    from ldm_edge.runtime.pipeline import Pipeline

    init = np.random.default_rng(6).uniform(0, 255, (1, 128, 128, 3)).astype(np.uint8)
    kw = {"strength": 0.3, "num_inference_steps": 10, "guidance_scale": 6.0,
          "aesthetic_score": 9.0, "negative_aesthetic_score": 1.0}
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(sgm_files["refiner"][0])
    pipe.set_progress_bar_config(disable=True)
    ref = to_uint8(pipe(PROMPT, image=Image.fromarray(init[0]), output_type="np",
                        generator=torch.Generator().manual_seed(11), **kw).images)
    ours = Pipeline(refiner_bundle)(PROMPT, init_image=init, scheduler="euler",
                                    generator=TorchNoise(11), **kw)
    print(f"single-file SDXL refiner bundle vs diffusers folder: {psnr(ours.images, ref):.1f} dB")
    assert psnr(ours.images, ref) >= MIN_PSNR_DB, psnr(ours.images, ref)


# ---- refusals --------------------------------------------------------------------------------

def _without(ckpt, tmp_path, prefix: str):
    from safetensors.torch import load_file, save_file

    p = tmp_path / f"no-{prefix.strip('.').replace('.', '-')}.safetensors"
    save_file({k: v for k, v in load_file(str(ckpt)).items() if not k.startswith(prefix)}, str(p))
    return p


@pytest.mark.parametrize("case,match", [
    ("no config", ("original-layout SDXL base checkpoint; offline its configs and tokenizers "
                   "must come from --config DIR")),
    ("no VAE", "without weights for the VAE (first_stage_model.*); use a complete checkpoint"),
])
def test_cli_refusals_are_one_line_exit_2_nothing_written(case, match, sgm_files, tmp_path):
    _, ckpt, config = sgm_files["base"]
    args = [str(ckpt)]
    if case == "no VAE":
        args = [str(_without(ckpt, tmp_path, "first_stage_model.")), "--config", str(config)]
    out = tmp_path / "bundle"
    r = run_cli(*EXPORT, "onnx", *args, "-o", str(out))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert match in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()


def _unet_wider(config, tmp_path):
    """A --config of another architecture: one more resnet per U-Net block."""
    other = tmp_path / "other-config"
    shutil.copytree(config, other)
    cfg = json.loads((other / "unet" / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (other / "unet" / "config.json").write_text(json.dumps(cfg))
    return other


@pytest.mark.parametrize("case,match", [
    ("refiner with a base config", "is an SDXL refiner checkpoint (one OpenCLIP encoder) but"),
    ("only the U-Net", ("without weights for the VAE (first_stage_model.*) or the text encoder "
                        "1 (CLIP ViT-L) (conditioner.embedders.0.transformer.*) or the text")),
    ("another architecture", "weights do not fit --config"),
    ("not an SDXL config", "is not a diffusers SDXL folder"),
])
def test_load_refusals_name_the_cause(case, match, sgm_files, tmp_path):
    from ldm_edge.export.load import ModelLoadError, load_model
    from ldm_edge.export.tiny import save_tiny

    ckpt, config = sgm_files["base"][1], sgm_files["base"][2]
    if case == "refiner with a base config":
        ckpt = sgm_files["refiner"][1]
    elif case == "only the U-Net":
        ckpt = _without(_without(ckpt, tmp_path, "first_stage_model."), tmp_path, "conditioner.")
    elif case == "another architecture":
        config = _unet_wider(config, tmp_path)
    elif case == "not an SDXL config":
        config = save_tiny(tmp_path / "sd1")
    with pytest.raises(ModelLoadError) as e:
        load_model(ckpt, config=str(config))
    assert match in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---- the real architecture, names and shapes only ---------------------------------------------

# SDXL base 1.0's published configs (unet/, vae/, text_encoder*/config.json), the parts that
# shape the networks; the tiny models above have one resnet per block, the real one two
REAL_UNET = {"sample_size": 128, "layers_per_block": 2, "block_out_channels": (320, 640, 1280),
             "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
             "cross_attention_dim": 2048, "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
REAL_VAE = {"layers_per_block": 2, "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4}
# width, layers, heads: CLIP ViT-L, OpenCLIP ViT-bigG
REAL_CLIP = {"text_encoder": (768, 12, 12), "text_encoder_2": (1280, 32, 20)}
# names held by sd_xl_base_1.0.safetensors: the inverse above must write the real layout
REAL_NAMES = ("model.diffusion_model.output_blocks.2.2.conv.weight",
              "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight",
              "model.diffusion_model.label_emb.0.2.bias",
              "first_stage_model.decoder.up.3.block.2.conv1.weight",
              "first_stage_model.encoder.mid.attn_1.proj_out.weight",
              "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
              "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
              "conditioner.embedders.1.model.text_projection",
              "conditioner.embedders.1.model.ln_final.weight")


def _real_base_on_meta():
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(cls, name):
        width, layers, heads = REAL_CLIP[name]
        return cls(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width,
                                  num_hidden_layers=layers, num_attention_heads=heads,
                                  projection_dim=width, vocab_size=49408))

    with torch.device("meta"):
        return SimpleNamespace(unet=UNet2DConditionModel(**REAL_UNET),
                               vae=AutoencoderKL(**REAL_VAE),
                               text_encoder=clip(CLIPTextModel, "text_encoder"),
                               text_encoder_2=clip(CLIPTextModelWithProjection, "text_encoder_2"))


def test_real_sdxl_architecture_maps_name_for_name_and_shape_for_shape():
    """At SDXL base's real depth (two resnets per block, ten transformer layers, 32 OpenCLIP
    layers), on the meta device (no memory): the original layout written from it holds the real
    file's names, and the loader's conversion gives back every tensor's name and shape."""
    from ldm_edge.export.sdxl_single_file import _converted, _misfit

    pipe = _real_base_on_meta()
    state = sgm_checkpoint(pipe, "base")
    missing = [n for n in REAL_NAMES if n not in state]
    assert not missing, missing
    assert tuple(state["conditioner.embedders.1.model.text_projection"].shape) == (1280, 1280)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    nets = vars(pipe)
    for name, weights in _converted(state, nets, refiner=False).items():
        own = nets[name].state_dict()
        weights = {k: v for k, v in weights.items() if k in own or not k.endswith("position_ids")}
        assert _misfit(own, weights) == "", name
