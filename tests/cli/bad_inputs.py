"""The bad-input table: every row is a test (test_bad_input_table.py) and a row of docs/bad-input.md.

Print the table with:  python tests/cli/bad_inputs.py
Each case: (what, how to break things, ldm-run arguments, exit code, message fragment).
Placeholders in arguments: BUNDLE (a fresh copy of a tiny bundle, broken by `breaker`),
UNCOND / INPAINT / SR / UPSCALE (the same, of the tiny unconditional LDM / SD inpainting /
LDM super-resolution / SD x4 upscaler bundle), CONTROL (of the tiny SD1 bundle with two
ControlNets, "edges" and "depth"), TMP (a scratch folder). The error cases run without -q: stderr must be the error line alone,
with no progress bar before it.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np


def _m(fn):
    def breaker(b: Path, tmp: Path):
        m = json.loads((b / "manifest.json").read_text())
        fn(m, b, tmp)
        (b / "manifest.json").write_text(json.dumps(m))
    return breaker


def _unet(m):
    return m["components"]["unet"]["variants"]["fp32"]


def _truncate(b, tmp):
    d = (b / "unet.onnx").read_bytes()
    (b / "unet.onnx").write_bytes(d[: len(d) // 3])


def _scramble(b, tmp):
    d = bytearray((b / "unet.onnx").read_bytes())
    d[64:8064] = np.random.default_rng(0).integers(0, 256, 8000, dtype=np.uint8).tobytes()
    (b / "unet.onnx").write_bytes(bytes(d))


def _symlink_out(b, tmp):
    os.replace(b / "unet.onnx", tmp / "unet.onnx")
    os.symlink(tmp / "unet.onnx", b / "unet.onnx")


def _huge_png(path: Path, w=40000, h=40000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def _files(b, tmp):
    np.save(tmp / "lat_wrong.npy", np.zeros((1, 4, 8, 8), np.float32))
    np.save(tmp / "lat_f64.npy", np.zeros((1, 4, 16, 16), np.float64))
    (tmp / "lat.txt").write_text("not numpy")
    (tmp / "notimage.png").write_text("hello")
    _huge_png(tmp / "huge.png")
    from PIL import Image

    Image.new("RGB", (128, 128), (200, 30, 30)).save(tmp / "init.png")
    Image.new("L", (128, 128), 255).save(tmp / "mask.png")
    Image.new("L", (64, 64), 255).save(tmp / "mask64.png")
    Image.new("RGB", (48, 40), (9, 9, 9)).save(tmp / "low48x40.png")


def _loras(b, tmp):
    """LoRA files for the tiny SD1 bundle (its to_q layers are 32x32), good and bad."""
    from ldm_edge.runtime.lora.safetensors_read import write_safetensors

    rng = np.random.default_rng(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    good = {f"{q}.lora_down.weight": rng.standard_normal((4, 32), dtype=np.float32),
            f"{q}.lora_up.weight": rng.standard_normal((32, 4), dtype=np.float32),
            f"{q}.alpha": np.array(4.0, np.float32)}
    write_safetensors(tmp / "good.safetensors", good)
    write_safetensors(tmp / "nolora.safetensors", {"weight": np.zeros((2, 2), np.float32)})
    write_safetensors(tmp / "other.safetensors", {
        k.replace("down_blocks_0_attentions_0", "input_blocks_1_1"): v for k, v in good.items()})
    write_safetensors(tmp / "rank.safetensors", {**good, f"{q}.lora_up.weight": good[f"{q}.lora_up.weight"][:, :3]})
    write_safetensors(tmp / "big.safetensors", {**good, f"{q}.lora_down.weight": np.zeros((4, 64), np.float32)})
    (tmp / "text.safetensors").write_text("not a safetensors file")


def _tiny_only(m, b, tmp):
    """The bundle as one whose only VAE is TAESD: its decoder recorded as the tiny one."""
    m["components"]["vae_decoder_tiny"] = m["components"].pop("vae_decoder")
    m["components"].pop("vae_encoder")
    m["tiny_vae"] = {"source": "stand-in", "scaling_factor": 1.0}


P = ["-p", "a red cat", "--steps", "2"]
CASES = [
    ("bundle folder missing", None, ["TMP/nope"] + P, 3, "not found"),
    ("folder without manifest.json", lambda b, t: (b / "manifest.json").unlink(), ["BUNDLE"] + P, 3, "no manifest.json"),
    ("manifest.json not JSON", lambda b, t: (b / "manifest.json").write_text("{oops"), ["BUNDLE"] + P, 3, "damaged"),
    ("manifest format from the future", _m(lambda m, b, t: m.update(format_version=7)), ["BUNDLE"] + P, 3, "newer than this ldm-edge"),
    ("manifest names an absolute path", _m(lambda m, b, t: _unet(m).update(file="/etc/hostname")), ["BUNDLE"] + P, 3, "outside the bundle"),
    ("manifest names ../ path", _m(lambda m, b, t: _unet(m)["files"][0].update(path="../unet.onnx")), ["BUNDLE"] + P, 3, "outside the bundle"),
    ("graph file is a symlink out of the bundle", _symlink_out, ["BUNDLE"] + P, 3, "link that leads outside"),
    ("graph file missing", lambda b, t: (b / "unet.onnx").unlink(), ["BUNDLE"] + P, 3, "missing from the bundle"),
    ("truncated ONNX (copy cut short)", _truncate, ["BUNDLE"] + P, 3, "truncated copy"),
    ("corrupt ONNX, same size", _scramble, ["BUNDLE"] + P, 3, "does not match its sha256"),
    ("corrupt ONNX with --no-verify", _scramble, ["BUNDLE", "--no-verify"] + P, 3, "unet.onnx"),
    ("corrupt tokenizer.json", lambda b, t: (b / "tokenizer.json").write_text("{}" + " " * ((b / "tokenizer.json").stat().st_size - 2)), ["BUNDLE"] + P, 3, "tokenizer: tokenizer.json does not match its sha256"),
    ("height not a multiple of 8", None, ["BUNDLE", "--height", "100"] + P, 2, "--height 100 must be a positive multiple of 8"),
    ("width beyond the exported range", None, ["BUNDLE", "--width", "4096"] + P, 2, "outside the bundle's exported range"),
    ("zero steps", None, ["BUNDLE", "-p", "x", "--steps", "0"], 2, "--steps 0 must be between 1 and 1000"),
    ("guidance scale NaN", None, ["BUNDLE", "--guidance-scale", "nan"] + P, 2, "--guidance-scale nan must be between"),
    ("guidance scale negative", None, ["BUNDLE", "--guidance-scale", "-3"] + P, 2, "--guidance-scale -3.0 must be between"),
    ("strength out of range", _files, ["BUNDLE", "--init-image", "TMP/init.png", "--strength", "1.5"] + P, 2, "--strength 1.5 must be in (0, 1]"),
    ("strength without an init image", None, ["BUNDLE", "--strength", "0.5"] + P, 2, "--strength 0.5 needs --init-image"),
    ("negative seed", None, ["BUNDLE", "--seed", "-5"] + P, 2, "--seed -5 must be an integer from 0 to 18446744073709551615"),
    ("unknown scheduler", None, ["BUNDLE", "--scheduler", "dpm++3m"] + P, 2, "unknown scheduler 'dpm++3m'"),
    ("eta for a scheduler without one", None, ["BUNDLE", "--scheduler", "ddim", "--eta", "0.5"] + P, 2, "scheduler 'ddim' takes no eta (it is an option of tcd)"),
    ("eta out of range", None, ["BUNDLE", "--scheduler", "tcd", "--eta", "2"] + P, 2, "tcd: eta=2.0 must be between 0 (deterministic) and 1"),
    ("too many images for the exported batch", None, ["BUNDLE", "--num-images", "5"] + P, 2, "exported for at most 4"),
    ("latents of the wrong shape", _files, ["BUNDLE", "--latents", "TMP/lat_wrong.npy"] + P, 2, "--latents has shape [1, 4, 8, 8], expected [1, 4, 16, 16]"),
    ("latents not float32", _files, ["BUNDLE", "--latents", "TMP/lat_f64.npy"] + P, 2, "--latents must be float32"),
    ("latents file not .npy", _files, ["BUNDLE", "--latents", "TMP/lat.txt"] + P, 2, "is not a .npy array"),
    ("init image not an image", _files, ["BUNDLE", "--init-image", "TMP/notimage.png"] + P, 2, "is not a readable image"),
    ("init image 40000x40000 (decompression bomb)", _files, ["BUNDLE", "--init-image", "TMP/huge.png"] + P, 2, "too large"),
    ("init image missing", None, ["BUNDLE", "--init-image", "TMP/none.png"] + P, 2, "--init-image TMP/none.png not found"),
    ("output not .png", None, ["BUNDLE", "-o", "TMP/x.jpg"] + P, 2, "must end in .png"),
    ("output folder missing", None, ["BUNDLE", "-o", "TMP/no/dir/x.png"] + P, 2, "does not exist"),
    ("output folder is a file", lambda b, t: (t / "afile").write_text("x"), ["BUNDLE", "-o", "TMP/afile/x.png"] + P, 2, "does not exist"),
    ("--precision fp16 without an fp16 variant", None, ["BUNDLE", "--precision", "fp16"] + P, 3, "no fp16 variant"),
    ("--backend tensorrt without TensorRT", None, ["BUNDLE", "--backend", "tensorrt"] + P, 2, "TensorRT"),
    ("VAE tile size not a multiple of 8", None, ["BUNDLE", "--vae-tiling", "--vae-tile-size", "100"] + P, 2, "--vae-tile-size 100 must be a positive multiple of 8"),
    ("VAE tile size below the decoder's exported range", None, ["BUNDLE", "--vae-tiling", "--vae-tile-size", "16"] + P, 2, "--vae-tile-size 16 is outside the VAE decoder's exported range 32..1024 pixels"),
    ("VAE tile size whose edge tiles the decoder cannot take", None, ["BUNDLE", "--vae-tiling", "--vae-tile-size", "40"] + P, 2, "--vae-tile-size 40 leaves a 8-pixel edge tile at 128x128, below the VAE decoder's exported minimum 32; try --vae-tile-size 48"),
    ("--vae-tile-size without --vae-tiling", None, ["BUNDLE", "--vae-tile-size", "64"] + P, 2, "--vae-tile-size needs --vae-tiling"),
    ("--lora file missing", None, ["BUNDLE", "--lora", "TMP/none.safetensors:0.8"] + P, 2, "--lora TMP/none.safetensors not found"),
    ("--lora file not safetensors", _loras, ["BUNDLE", "--lora", "TMP/text.safetensors:0.8"] + P, 2, "is not a LoRA: it is not a safetensors file"),
    ("--lora safetensors without LoRA weights", _loras, ["BUNDLE", "--lora", "TMP/nolora.safetensors"] + P, 2, "is not a LoRA: none of its 1 tensors"),
    ("--lora for another model's layers", _loras, ["BUNDLE", "--lora", "TMP/other.safetensors:1"] + P, 2, "--lora other.safetensors: 1 of its 1 modules match nothing in this bundle (first: lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"),
    ("--lora rank mismatch", _loras, ["BUNDLE", "--lora", "TMP/rank.safetensors:1"] + P, 2, "rank mismatch"),
    ("--lora for a larger model", _loras, ["BUNDLE", "--lora", "TMP/big.safetensors:1"] + P, 2, "B @ A is [32, 64], the weight it adapts is [32, 32]"),
    ("--lora scale NaN", _loras, ["BUNDLE", "--lora", "TMP/good.safetensors:nan"] + P, 2, "the scale nan must be a finite number"),
    ("--lora scale not a number", _loras, ["BUNDLE", "--lora", "TMP/good.safetensors:strong"] + P, 2, "'strong' is not a number; give FILE:SCALE"),
    ("--lora on a bundle exported before LoRA support", _m(lambda m, b, t: (m["components"]["unet"].pop("weights_map"), _loras(b, t))), ["BUNDLE", "--lora", "TMP/good.safetensors:1"] + P, 2, "re-export it once with `ldm-export onnx` to use --lora"),
    ("--check-lora-int8 on an FP32 run", None, ["BUNDLE", "--check-lora-int8"] + P, 2, "--check-lora-int8 measures a LoRA on the INT8 U-Net; this run is fp32: add --precision int8, or drop --check-lora-int8"),
    ("--lora kohya file at 0.8 (accepted)", _loras, ["BUNDLE", "-p", "x", "--steps", "1", "--lora", "TMP/good.safetensors:0.8", "-q"], 0, ""),
    ("--low-memory --vae-tiling (accepted)", None, ["BUNDLE", "-p", "x", "--steps", "1", "--low-memory", "--vae-tiling", "--vae-tile-size", "64", "-q"], 0, ""),
    ("no --prompt for a text-to-image model", None, ["BUNDLE", "--steps", "2"], 2, "give a prompt with -p/--prompt: this bundle's model is text-to-image"),
    ("prompt given to an unconditional model (LDMPipeline)", None, ["UNCOND"] + P, 2, "--prompt given, but this bundle's model is unconditional (it has no text encoder); drop --prompt"),
    ("--task the bundle's model cannot do", None, ["UNCOND", "--task", "text-to-image", "--steps", "2"], 2, "--task text-to-image: this bundle's model does unconditional only"),
    ("inpainting mask of another size than the init image", _files, ["INPAINT", "--init-image", "TMP/init.png", "--mask", "TMP/mask64.png"] + P, 2, "--mask TMP/mask64.png is 64x64, the init image is 128x128; give a mask of the image's size"),
    ("inpainting bundle without --mask", _files, ["INPAINT", "--init-image", "TMP/init.png"] + P, 2, "this bundle's model inpaints: give --mask (white = repaint)"),
    ("--mask with a plain (4-channel) U-Net", _files, ["BUNDLE", "--init-image", "TMP/init.png", "--mask", "TMP/mask.png"] + P, 2, "--mask needs an inpainting model (a 9-channel U-Net, as StableDiffusionInpaintPipeline has); this bundle's U-Net is not one"),
    ("init image size the x4 upscaler cannot take", _files, ["SR", "--init-image", "TMP/low48x40.png", "--steps", "2"], 2, "--init-image low48x40.png is 48x40: this upscaler takes sides that are multiples of 32 (diffusers would crop it to 32x32); resize or crop it"),
    ("--noise-level above the SD x4 upscaler's max_noise_level", _files, ["UPSCALE", "--init-image", "TMP/init.png", "--noise-level", "400"] + P, 2, "--noise-level 400 must be an integer from 0 to 350 (the model's max_noise_level)"),
    ("--noise-level for a model that is not the SD x4 upscaler", None, ["BUNDLE", "--noise-level", "20"] + P, 2, "--noise-level is for the SD x4 upscaler (StableDiffusionUpscalePipeline); this bundle's model is not one"),
    ("upscaler without an init image", None, ["SR", "--steps", "2"], 2, "this bundle's model upscales x4: give --init-image LOW.png"),
    ("unconditional model without a prompt (accepted)", None, ["UNCOND", "--steps", "1", "-q"], 0, ""),
    ("empty prompt (accepted)", None, ["BUNDLE", "-p", "", "--steps", "1", "-q"], 0, ""),
    ("emoji prompt (accepted)", None, ["BUNDLE", "-p", "a 🐱 on a 🚲", "--steps", "1", "-q"], 0, ""),
    ("right-to-left prompt (accepted)", None, ["BUNDLE", "-p", "قطة حمراء على دراجة", "--steps", "1", "-q"], 0, ""),
    ("very long prompt (accepted, truncated with a warning)", None, ["BUNDLE", "-p", "cat " * 200, "--steps", "1", "-q"], 0, "prompt 1 is longer than the text encoder's 77 tokens: 125 tokens dropped"),
    ("no BUNDLE (and no --server)", None, P, 2, "give BUNDLE (a folder written by ldm-export onnx), or --server URL"),
    ("--vae tiny on a bundle without a tiny VAE", None, ["BUNDLE", "--vae", "tiny"] + P, 2, "--vae tiny: this bundle has no tiny VAE; export it with `ldm-export onnx SOURCE --tiny-vae DIR` (DIR: a TAESD folder)"),
    ("--vae full on a bundle whose only VAE is TAESD", _m(_tiny_only), ["BUNDLE", "--vae", "full"] + P, 2, "--vae full: this bundle's only VAE is the tiny one (TAESD); drop --vae full"),
    ("--preview without a tiny VAE", None, ["BUNDLE", "--preview", "1"] + P, 2, "--preview decodes with the tiny VAE (TAESD), which this bundle has not; export it with `ldm-export onnx SOURCE --tiny-vae DIR` or drop --preview"),
    # SDXL's micro-conditioning (tests/parity/test_sdxl.py holds the SDXL bundles' own refusals)
    ("--original-size on a bundle that is not SDXL", None, ["BUNDLE", "--original-size", "512", "512"] + P, 2, "--original-size is SDXL's micro-conditioning; this bundle's U-Net takes no time ids (drop --original-size)"),
    ("--aesthetic-score on a bundle that is not SDXL", None, ["BUNDLE", "--aesthetic-score", "6"] + P, 2, "--aesthetic-score is SDXL's micro-conditioning"),
    ("--denoising-end without --refiner", None, ["BUNDLE", "--denoising-end", "0.8"] + P, 2, "--denoising-end is where the base hands its latents to a refiner; give --refiner DIR (or drop --denoising-end)"),
    ("--refiner folder missing", None, ["BUNDLE", "--refiner", "TMP/nope"] + P, 3, "not found"),
    ("--denoising-end out of range", None, ["BUNDLE", "--refiner", "BUNDLE", "--denoising-end", "1.2"] + P, 2, "--denoising-end 1.2 must be a fraction of the schedule, between 0 and 1"),
    # ControlNet (CONTROL: the tiny SD1 bundle with ControlNets edges and depth)
    ("--control on a bundle without ControlNets", _files, ["BUNDLE", "--control", "edges:TMP/init.png"] + P, 2, "--control: this bundle has no ControlNet; export one with `ldm-export onnx SOURCE --controlnet DIR`"),
    ("--control with a name the bundle has not", _files, ["CONTROL", "--control", "canny:TMP/init.png"] + P, 2, "--control canny: this bundle has no ControlNet of that name (it has: edges, depth)"),
    ("--control image not an image", _files, ["CONTROL", "--control", "edges:TMP/notimage.png"] + P, 2, "--control image TMP/notimage.png is not a readable image"),
    ("--control image missing", None, ["CONTROL", "--control", "edges:TMP/none.png"] + P, 2, "--control image TMP/none.png not found"),
    ("--control without an image", None, ["CONTROL", "--control", "edges"] + P, 2, "--control 'edges': give NAME:IMAGE[:SCALE]"),
    ("--control-start after --control-end", _files, ["CONTROL", "--control", "edges:TMP/init.png", "--control-start", "0.8", "--control-end", "0.2"] + P, 2, "--control-start 0.8 and --control-end 0.2: need 0 <= start < end <= 1"),
    ("--guess-mode without --control", None, ["BUNDLE", "--guess-mode"] + P, 2, "--guess-mode needs --control NAME:IMAGE"),
    ("--control-preprocess of an unknown kind", _files, ["CONTROL", "--control", "edges:TMP/init.png", "--control-preprocess", "depth"] + P, 2, "--control-preprocess 'depth': use canny or canny:LOW:HIGH"),
]


def markdown() -> str:
    rows = ["| # | input | exit | what the user sees (stderr) |", "|---|---|---|---|"]
    for i, (what, _, _, code, needle) in enumerate(CASES, 1):
        msg = f"`...{needle}...`" if needle else "(image written)"
        rows.append(f"| {i} | {what} | {code} | {msg} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
