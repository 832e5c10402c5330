"""Models for the benchmark: the demo model and the SD1.5 architecture with seeded random
weights (real config: 320/640/1280/1280 channels, cross-attention 768, CLIP ViT-L/14 text
encoder, the SD VAE), built here and cached under out/bench/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SD15_SEED = 0
# text towers at their real sizes: (hidden, intermediate, heads, layers, activation, projection)
CLIP_L14 = (768, 3072, 12, 12, "quick_gelu", 768)  # CLIP ViT-L/14 (SD 1.x)
OPENCLIP_H14 = (1024, 4096, 16, 23, "gelu", 512)  # OpenCLIP ViT-H/14, penultimate layer (SD 2.x)


def clip_text_model(tok, arch=CLIP_L14):
    """A random CLIPTextModel of ``arch`` with the ids of tokenizer ``tok``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden, inter, heads, layers, act, proj = arch
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
        num_hidden_layers=layers, max_position_embeddings=77, hidden_act=act,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, projection_dim=proj))


def sd15_pipeline():
    import torch
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from ldm_edge.export.tiny import tiny_clip_tokenizer

    torch.manual_seed(SD15_SEED)
    tok = tiny_clip_tokenizer()
    te = clip_text_model(tok, CLIP_L14)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD1.x otherwise
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def unet_gflop(unet, size: int, hidden: int, seq: int) -> float:
    """FLOPs of one batch-2 (guidance) U-Net call at ``size`` pixels, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, unet.config.in_channels, size // 8, size // 8)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500.0, 500.0]), torch.randn(2, seq, hidden))
    return fc.get_total_flops() / 1e9


def _export(src: Path, bundle: Path, min_size: int, max_size: int, default: int, max_batch: int = 1):
    from ldm_edge.export.bundle import ExportOptions, export_bundle
    from ldm_edge.export.load import load_model

    model = load_model(src)
    model.defaults.update(height=default, width=default)
    export_bundle(model, bundle, ExportOptions(min_size=min_size, max_size=max_size,
                                               max_batch=max_batch, force=True,
                                               components=("text_encoder", "unet", "vae_decoder")))
    return model


def prepare(name: str, out: Path) -> dict | None:
    if name == "demo":
        return _prepare_demo(out)
    if name == "tiny":
        return _prepare_tiny(out)
    if name.startswith("sd15-"):
        return _prepare_sd15(int(name.split("-")[1]), out)
    raise SystemExit(f"unknown benchmark model {name!r}")


def _latents(path: Path, shape) -> Path:
    if not path.is_file():
        np.save(path, np.random.default_rng(1).standard_normal(shape, dtype=np.float32))
    return path


def _prepare_demo(out: Path) -> dict | None:
    from ldm_edge.demo.diffusers_pipe import demo_pipeline
    from ldm_edge.export.load import default_source

    src = default_source()
    if src is None:
        return None
    import shutil

    from ldm_edge.export.load import _weight_files, hash_files

    folder, bundle = out / "demo-diffusers", out / "demo-bundle"
    info_path = out / "demo-info.json"
    if (bundle / "manifest.json").is_file():
        made_from = json.loads((bundle / "manifest.json").read_text())["model"]["sha256"]
        if made_from != hash_files(_weight_files(src)):  # the weights changed: rebuild both
            shutil.rmtree(bundle)
            shutil.rmtree(folder, ignore_errors=True)
    if not (folder / "model_index.json").is_file():
        demo_pipeline(src).save_pretrained(folder)
    if not (bundle / "manifest.json").is_file() or not info_path.is_file():
        model = _export(src, bundle, 32, 128, 64, max_batch=4)
        info_path.write_text(json.dumps({"unet_gflop": unet_gflop(model.unet, 64, 384, 16)}))
    return {"name": "demo", "dir": folder, "bundle": bundle, "size": 64,
            "latents": _latents(out / "demo-latents.npy", (1, 4, 8, 8)),
            **json.loads(info_path.read_text())}


def _prepare_sd15(size: int, out: Path) -> dict:
    folder, bundle = out / "sd15-random", out / "sd15-bundle"
    if not (folder / "model_index.json").is_file():
        print("building the SD1.5-architecture model (random weights, seed 0)", flush=True)
        sd15_pipeline().save_pretrained(folder, safe_serialization=True)
    info_path = out / "sd15-info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not (bundle / "manifest.json").is_file():
        print("exporting it (U-Net ~3.4 GB: a few minutes)", flush=True)
        _export(folder, bundle, 256, 512, 256)
    add_weights_maps(folder, bundle)  # a bundle exported before LoRA support has none
    if str(size) not in info:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        info[str(size)] = unet_gflop(unet, size, 768, 77)
        info_path.write_text(json.dumps(info))
    return {"name": f"sd15-{size}", "dir": folder, "bundle": bundle, "size": size,
            "latents": _latents(out / f"sd15-latents-{size}.npy", (1, 4, size // 8, size // 8)),
            "unet_gflop": info.get(str(size))}


def add_weights_maps(folder: Path, bundle: Path, components=("unet", "text_encoder")) -> None:
    """Give an existing bundle the weights maps it lacks (made before LoRA support): built
    from the diffusers folder it was exported from and checked against its graphs and forms
    as ``ldm-export`` does (export/weights_map.py), recorded with ``edit_manifest``. Minutes
    instead of the half hour re-exporting SD1.5 takes."""
    from ldm_edge.runtime.bundle.schema import read_manifest_json

    manifest = read_manifest_json(bundle)
    todo = [c for c in components if c in manifest.components
            and manifest.components[c].weights_map is None]
    if not todo:
        return
    from ldm_edge.bundletools.files import file_record
    from ldm_edge.export.weights_map import build_weights_map, verify_weights_map
    from ldm_edge.runtime.fsutil import atomic_write_bytes
    from ldm_edge.runtime.bundle.schema import edit_manifest
    from ldm_edge.runtime.lora.weights_map import map_file_name

    records = {}
    for name in todo:
        print(f"{bundle}: adding the {name}'s weights map", flush=True)
        module = _torch_module(folder, name)
        variant = manifest.components[name].variants["fp32"]
        graph = bundle / variant.file
        wmap = build_weights_map(module, name, graph)
        verify_weights_map(wmap, module, graph, [bundle / f.file for f in variant.forms.values()])
        path = bundle / map_file_name(name)
        atomic_write_bytes(path, json.dumps(wmap.to_json(), indent=1).encode())
        records[name] = file_record(path, bundle)
        del module

    def change(m):
        for name, rec in records.items():
            m.components[name].weights_map = rec
    edit_manifest(bundle, change)


def _torch_module(folder: Path, name: str):
    if name == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    cls = (index.get("text_encoder") or ["transformers", "CLIPTextModel"])[1]
    return getattr(transformers, cls).from_pretrained(folder / "text_encoder").eval()


def _prepare_tiny(out: Path) -> dict:
    """A ~1 M-parameter SD1-style model: a smoke test of the benchmark itself."""
    from ldm_edge.export.tiny import save_tiny

    folder, bundle = out / "tiny-sd1", out / "tiny-bundle"
    if not (folder / "model_index.json").is_file():
        save_tiny(folder, "sd1")
    if not (bundle / "manifest.json").is_file():
        _export(folder, bundle, 64, 256, 128)
    return {"name": "tiny", "dir": folder, "bundle": bundle, "size": 128,
            "latents": _latents(out / "tiny-latents.npy", (1, 4, 16, 16)), "unet_gflop": None}
