"""Train the demo LoRA: teach the demo U-Net a position it never saw (``top center``).

    python -m ldm_edge.demo.train_lora [--steps 600] [--minutes 15] [--rank 4] [--threads 1]
                                       [--out demo/weights/lora]

PEFT LoRA (``unet.add_adapter``) on the U-Net's attention projections (to_q, to_k, to_v,
to_out.0); the autoencoder and the MiniLM text encoder stay frozen and the base weights are
not touched. DDPM epsilon objective on latents of the training mix in lora_data.py (half new
position, half base samples), seeded throughout: the same command on the same machine writes
the same file. Writes ``<out>/top_center.safetensors`` as diffusers'
``StableDiffusionPipeline.save_lora_weights`` does, and ``<out>/top_center.json``: how it was
trained (the command, steps, wall time, versions, the file's sha256).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from ldm_edge.runtime.cpu import cpu_summary

from . import lora_data as L
from . import sample_torch as S

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "weights" / "lora"
LORA_NAME = "top_center"  # <out>/top_center.safetensors and .json
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' own LoRA recipe for SD U-Nets
RANK = 4  # 4 is ample for one new value; the file stays ~0.2 MB (the budget is 1 MB)
STEPS = 600  # default length; the JSON note records what a run did
BATCH = 32  # as the base U-Net was trained
LR = 1e-3  # LoRA factors start at B = 0, so the step size can be higher than the base's 4e-4
WARMUP = 50
TRAIN_IMAGES = 2000  # rendered once and encoded into latents
CAPTION_DROPOUT = 0.1  # as in the base training: keeps the unconditional branch for guidance
SEED = 0
MAX_FILE_BYTES = 1 << 20  # committed weights stay under 1 MB: the repository stays quick to clone


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), 200):
        x = torch.from_numpy(images[i:i + 200]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        means.append(dist.mean), stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                      target_modules=list(TARGET_MODULES))


def train(weights: Path, steps: int, minutes: float, rank: int, seed: int) -> tuple:
    """Returns (unet with the trained adapter, its LoraConfig, steps done, wall seconds)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(weights / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(weights / "unet", torch_dtype=torch.float32)
    meta = json.loads((weights / "ldm_edge_demo.json").read_text())
    text = S.TextEncoder("cpu", weights / "tokenizer" / "tokenizer.json")
    log(f"rendering and encoding {TRAIN_IMAGES} images")
    images, captions, _ = L.make_lora_train_set(TRAIN_IMAGES, seed=seed)
    mean, std = encode_latents(vae, images)
    prompts = sorted(set(captions)) + [""]
    table = text(prompts)  # (U, L, 384): every embedding the run needs, computed once
    pos = {p: i for i, p in enumerate(prompts)}
    cap_idx = torch.tensor([pos[c] for c in captions])
    scale = float(meta["scaling_factor"])
    unet.requires_grad_(False)
    config = lora_config(rank)
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    log(f"LoRA rank {rank} on {', '.join(TARGET_MODULES)}: {sum(p.numel() for p in params)} parameters")
    opt = torch.optim.AdamW(params, LR, weight_decay=0.0)
    sched = DDPMScheduler(**S.SD_BETAS, prediction_type="epsilon")
    gen = torch.Generator().manual_seed(seed)
    unet.train()
    t0 = time.time()
    deadline = t0 + minutes * 60
    step = 0
    while step < steps:
        if time.time() > deadline:
            log(f"stopped by --minutes {minutes} at step {step} of {steps}")
            break
        idx = torch.randint(len(cap_idx), (BATCH,), generator=gen)
        ci = cap_idx[idx].clone()
        ci[torch.rand(BATCH, generator=gen) < CAPTION_DROPOUT] = pos[""]
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (BATCH,), generator=gen)
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=table[ci]).sample
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"step {step}: loss {loss.item():.4f} ({(time.time() - t0) / step:.2f} s/step)")
    unet.eval()
    return unet, config, step, time.time() - t0


def save(unet, config, out: Path, note: dict) -> Path:
    """Write <out>/LORA_NAME.safetensors (diffusers layout) and its JSON note, each atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"{LORA_NAME}.safetensors"
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        meta = config.to_dict()  # target_modules is a set: sorted, so the same run writes the same bytes
        meta["target_modules"] = sorted(meta["target_modules"])
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, weight_name=file.name,
                                                  unet_lora_adapter_metadata=meta)
        size = (Path(tmp) / file.name).stat().st_size
        if size > MAX_FILE_BYTES:
            sys.exit(f"train-lora: error: the LoRA file would be {size} bytes, over the "
                     f"{MAX_FILE_BYTES}-byte budget; lower --rank")
        os.chmod(Path(tmp) / file.name, 0o644)  # a temporary directory's files are private
        os.replace(Path(tmp) / file.name, file)
    note = dict(note, file=file.name, bytes=file.stat().st_size,
                sha256=hashlib.sha256(file.read_bytes()).hexdigest(), tensors=len(layers))
    tmp_note = out / f".{LORA_NAME}.json.tmp"
    tmp_note.write_text(json.dumps(note, indent=2) + "\n")
    os.replace(tmp_note, out / f"{LORA_NAME}.json")
    return file


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=S.DEFAULT_WEIGHTS, help="the demo model")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock cap (the JSON records "
                    "whether it stopped the run early)")
    ap.add_argument("--rank", type=int, default=RANK)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    unet, config, done, wall = train(a.weights, a.steps, a.minutes, a.rank, a.seed)
    import diffusers
    import peft

    args = [x for x in (argv if argv is not None else sys.argv[1:])]
    note = {"what": f"demo LoRA: teaches the demo U-Net the position {L.NEW_POSITION!r}",
            "command": " ".join(["python -m ldm_edge.demo.train_lora"] + [shlex.quote(x) for x in args]),
            "steps": done, "steps_asked": a.steps, "stopped_by_minutes": done < a.steps,
            "wall_s": round(wall, 1), "threads": a.threads, "seed": a.seed, "rank": a.rank,
            "lora_alpha": config.lora_alpha, "target_modules": list(TARGET_MODULES), "lr": LR,
            "batch": BATCH, "train_images": TRAIN_IMAGES, "new_share": L.NEW_SHARE,
            "heldout_new_combinations": len(L.heldout_new_combinations()),
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "peft": peft.__version__},
            "cpu": cpu_summary()["model"] or platform.machine(), "cpu_count": os.cpu_count()}
    file = save(unet, config, a.out, note)
    log(f"wrote {file} ({file.stat().st_size / 1e3:.0f} kB) after {done} steps, {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
