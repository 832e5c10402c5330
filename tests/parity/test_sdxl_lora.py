"""SDXL LoRA without re-export: the runtime's merged weights (U-Net, both text encoders) draw
what diffusers' StableDiffusionXLPipeline draws with the same LoRA loaded and fused
(``load_lora_weights`` + ``fuse_lora(lora_scale=s)``), from the same latents, on a tiny random
SDXL (export/tiny_sdxl.py).

The LoRAs are made here with PEFT (random non-zero B, alpha != r, a different alpha per
component), saved with ``StableDiffusionXLPipeline.save_lora_weights`` (keys ``unet.``,
``text_encoder.``, ``text_encoder_2.``; alphas in the header's adapter metadata); the kohya
file is written here from the same weights under kohya's names (``lora_unet_``, ``lora_te1_``,
``lora_te2_``, an ``.alpha`` tensor per module; U-Net modules by diffusers' names).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import to_uint8

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.lora.files import LoraError
from ldm_edge.runtime.lora.safetensors_read import read_safetensors, write_safetensors
from ldm_edge.runtime.pipeline import Pipeline

pytest.importorskip("peft", reason="needs peft (pip install .[demo]) to make the LoRAs")

# Both sides run the same FP32 math (W + s·(α/r)·B·A) in another summation order: only
# single-level rounding flips are allowed, as tests/parity/test_sdxl.py and test_lora.py.
MIN_PSNR_DB = 50.0
# The negative control: each LoRA (or each part of one) must move the picture far below the
# bar, or a passing comparison would not show that it was applied. Measured on the tiny SDXL
# (parity itself 89 dB to identical): the whole LoRA 18.0 dB from the base picture, the
# U-Net's part 20.2, text_encoder_2's 22.7, text_encoder's 28.4 (its alpha is set high: the
# first encoder is 32 of the context's 96 channels; at alpha 2 and a 48-wide second encoder
# its part moved the picture only to 43 dB).
MAX_BASE_PSNR_DB = 40.0
STEPS, GUIDANCE, SCHEDULER, SIZE = 4, 6.0, "euler", 128
PROMPT = "a red cat"
RANK = 4
ALPHAS = {"unet": 8.0, "text_encoder": 16.0, "text_encoder_2": 6.0}  # != r: alpha is read
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "conv", "time_emb_proj",
                "add_embedding.linear_1"]  # conv: the down- and upsamplers
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PARTS = ("unet", "text_encoder", "text_encoder_2")


def _latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8),
                                                    dtype=np.float32)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """{kind: (model folder, bundle)} for the tiny SDXL base and refiner."""
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model
    from ldm_edge.export.tiny_sdxl import save_tiny_sdxl

    root = tmp_path_factory.mktemp("sdxl_lora")
    out = {}
    for kind in ("base", "refiner"):
        folder = save_tiny_sdxl(root / kind, kind)
        export_bundle(load_model(folder), root / f"{kind}-bundle", ExportOptions())
        out[kind] = (folder, root / f"{kind}-bundle")
    return out


def make_sdxl_lora(folder, out, seed: int):
    """A PEFT LoRA of every part of the tiny SDXL at ``folder``, random A and B, saved by
    diffusers' StableDiffusionXLPipeline.save_lora_weights; returns the file."""
    import diffusers
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    layers = {}
    for part in PARTS:
        cfg = LoraConfig(r=RANK, lora_alpha=ALPHAS[part], init_lora_weights=False,
                         target_modules=UNET_TARGETS if part == "unet" else TE_TARGETS)
        # transformers 5's add_adapter wants peft >= 0.22; PEFT's own injection does the same
        inject_adapter_in_model(cfg, getattr(pipe, part))
        with torch.no_grad():  # B is zero at init in most recipes: make it count
            for name, p in getattr(pipe, part).named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.3)
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(getattr(pipe, part))
        layers[f"{part}_lora_adapter_metadata"] = cfg.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(out, weight_name="lora.safetensors",
                                                          **layers)
    return out / "lora.safetensors"


_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                 "text_encoder_2": "lora_te2_"}


def to_sgm(module: str, per: int = 1) -> str:
    """diffusers' U-Net module name -> the original SDXL U-Net's, for the tiny SDXL (``per``
    layers per block, up block 2 without attention), written out independently of
    runtime/lora/sgm.py; diffusers' own loader reads these names back in the test below."""
    top = {"time_embedding.linear_1": "time_embed.0", "add_embedding.linear_1": "label_emb.0.0"}
    if module in top:
        return top[module]
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    if module.startswith("mid_block."):
        _, inner, k, rest = module.split(".", 3)
        i = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{inner}.{k}"]
        return f"middle_block.{i}." + (resnet[rest] if inner == "resnets" else rest)
    kind, b, inner, k, rest = module.split(".", 4)
    if inner == "downsamplers":  # the last of a down block's input blocks: "op"
        return f"input_blocks.{1 + int(b) * (per + 1) + per}.0.op"
    if inner == "upsamplers":  # third in a block with attention (up blocks 0 and 1 here)
        return f"output_blocks.{int(b) * (per + 1) + per}.2.conv"
    first = 1 + int(b) * (per + 1) if kind == "down_blocks" else int(b) * (per + 1)
    j = 0 if inner == "resnets" else 1
    name = "input_blocks" if kind == "down_blocks" else "output_blocks"
    return f"{name}.{first + int(k)}.{j}." + (resnet[rest] if inner == "resnets" else rest)


def to_kohya(peft_file, out, sgm: bool = False):
    """The same weights under kohya's key names, alpha as a tensor per module; the text
    encoders under transformers 4's ``text_model_`` names, as real files have them; the
    U-Net's by diffusers' names, or (``sgm``) the original U-Net's, as kohya writes SDXL's."""
    tensors, meta = read_safetensors(peft_file)
    cfg = json.loads(meta["lora_adapter_metadata"])
    kohya = {}
    for key, v in tensors.items():
        comp, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        if comp != "unet" and not module.startswith("text_model."):
            module = "text_model." + module
        if comp == "unet" and sgm:
            module = to_sgm(module)
        stem = _KOHYA_PREFIX[comp] + module.replace(".", "_")
        kohya[f"{stem}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = v
        kohya[f"{stem}.alpha"] = np.array(cfg[f"{comp}.lora_alpha"], np.float32)
    write_safetensors(out, kohya)
    return out


def only(lora_file, parts, out):
    """The file with only the keys of ``parts`` (and its metadata)."""
    tensors, meta = read_safetensors(lora_file)
    write_safetensors(out, {k: v for k, v in tensors.items() if k.split(".")[0] in parts}, meta)
    return out


def diffusers_reference(folder, loras) -> np.ndarray:
    """diffusers with each (file, scale) loaded and fused in turn."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, scale) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        pipe.fuse_lora(lora_scale=scale, adapter_names=[f"l{i}"])
        pipe.unload_lora_weights()  # the fused weights stay
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
               width=SIZE, output_type="np", latents=torch.from_numpy(_latents())).images
    return to_uint8(out)


def draw(pipe) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
                width=SIZE, scheduler=SCHEDULER, latents=_latents(), seed=0).images


def ours(bundle, loras=None) -> np.ndarray:
    return draw(Pipeline(bundle, loras=loras))


@pytest.fixture(scope="module")
def lora(sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_lora_files")
    peft = make_sdxl_lora(sdxl["base"][0], root / "peft", seed=1)
    return {"peft": peft, "kohya": to_kohya(peft, root / "kohya.safetensors"),
            "kohya_sgm": to_kohya(peft, root / "kohya_sgm.safetensors", sgm=True)}


@pytest.fixture(scope="module")
def base_picture(sdxl):
    return ours(sdxl["base"][1])


def test_peft_lora_matches_diffusers(sdxl, lora, base_picture):
    folder, bundle = sdxl["base"]
    ref = diffusers_reference(folder, [(lora["peft"], 0.8)])
    got = ours(bundle, [(lora["peft"], 0.8)])
    print(f"SDXL PEFT LoRA vs diffusers: {psnr(got, ref):.1f} dB; base picture vs it: "
          f"{psnr(base_picture, ref):.1f} dB")
    assert psnr(got, ref) >= MIN_PSNR_DB, psnr(got, ref)
    assert psnr(base_picture, ref) < MAX_BASE_PSNR_DB


@pytest.mark.parametrize("part", PARTS)
def test_each_part_alone_matches_diffusers(part, sdxl, lora, base_picture, tmp_path):
    """Each part of the file alone: the U-Net's, and each text encoder's (the first one's last
    layer, which SDXL does not use, is matched and left out: its weights map's ``unused``)."""
    folder, bundle = sdxl["base"]
    f = only(lora["peft"], {part}, tmp_path / f"{part}.safetensors")
    ref = diffusers_reference(folder, [(f, 1.0)])
    got = ours(bundle, [(f, 1.0)])
    print(f"{part} alone vs diffusers: {psnr(got, ref):.1f} dB; base picture vs it: "
          f"{psnr(base_picture, ref):.1f} dB")
    assert psnr(got, ref) >= MIN_PSNR_DB, psnr(got, ref)
    assert psnr(base_picture, ref) < MAX_BASE_PSNR_DB


@pytest.mark.parametrize("layout", ["kohya", "kohya_sgm"])
def test_kohya_file_matches_diffusers(layout, sdxl, lora):
    """kohya files, U-Net by diffusers' names and by the original U-Net's: ours vs diffusers
    with the PEFT file (the same weights); the SGM-named file also vs diffusers reading it
    itself, so the test's own renaming (to_sgm) is checked by diffusers' loader."""
    folder, bundle = sdxl["base"]
    ref = diffusers_reference(folder, [(lora["peft"], 0.6)])
    got = ours(bundle, [(lora[layout], 0.6)])
    print(f"SDXL {layout} LoRA vs diffusers (PEFT file): {psnr(got, ref):.1f} dB")
    assert psnr(got, ref) >= MIN_PSNR_DB, psnr(got, ref)
    if layout == "kohya_sgm":
        own = diffusers_reference(folder, [(lora[layout], 0.6)])
        print(f"SDXL kohya_sgm LoRA vs diffusers reading it: {psnr(got, own):.1f} dB")
        assert psnr(got, own) >= MIN_PSNR_DB, psnr(got, own)


def test_switching_reopens_the_second_encoder(sdxl, lora, base_picture, tmp_path):
    """A LoRA on text_encoder_2 alone, then none: the encoder is reopened with its base
    weights (the base picture bit for bit), then with the LoRA again."""
    bundle = sdxl["base"][1]
    te2 = only(lora["peft"], {"text_encoder_2"}, tmp_path / "te2.safetensors")
    pipe = Pipeline(bundle, loras=[(te2, 1.0)])
    first = draw(pipe)
    assert pipe.loras.components() == {"text_encoder_2"}
    pipe.set_loras([])
    assert np.array_equal(draw(pipe), base_picture)
    pipe.set_loras([(te2, 1.0)])
    assert np.array_equal(draw(pipe), first)
    assert not np.array_equal(first, base_picture)


def test_refiner_refuses_a_first_encoder_lora(sdxl, lora):
    """The refiner has only text_encoder_2: a file adapting text_encoder is refused in one
    line, before anything is opened."""
    with pytest.raises(LoraError, match=r"adapt text_encoder, which this bundle does not have "
                                        r"\(an SDXL refiner has only text_encoder_2\)") as e:
        Pipeline(sdxl["refiner"][1], loras=[(lora["peft"], 1.0)])
    assert "\n" not in str(e.value)
    with pytest.raises(LoraError, match="text_encoder, which this bundle does not have"):
        Pipeline(sdxl["refiner"][1], loras=[(lora["kohya"], 1.0)])
