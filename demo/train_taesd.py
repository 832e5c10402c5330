"""Train the demo TAESD: a tiny autoencoder (diffusers' ``AutoencoderTiny``, TAESD's published
architecture) distilled from the demo model's own VAE, so the demo has a trained tiny VAE to
run with ``--tiny-vae`` and to judge FP16/INT8 forms of it on.

    python -m ldm_edge.demo.train_taesd [--minutes 14] [--steps 1400] [--threads 2]
                                        [--out demo/weights/taesd]

The decoder learns the demo VAE decoder's picture from the latents the U-Net works in (the
VAE's mean latents times its scaling factor: TAESD decodes those as they are, scaling factor
1). The encoder learns those latents from the picture. Both losses are mean squared errors on
the demo dataset's training pictures (dataset.py), the demo VAE frozen. Writes --out in
diffusers layout (config.json + fp16 safetensors) and ``training.json``: the command, the
steps, the wall time, and the held-out fidelity (8-bit PSNR of the tiny decoder's picture
against the full decoder's, and of the full decoder's picture from the tiny encoder's latents,
on held-out pictures).
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train_controlnet.py: a shared 2-core machine

import numpy as np
import torch
import torch.nn.functional as F

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.cpu import cpu_summary

from . import dataset as D
from .train_controlnet import log, save, trainer_args

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "weights" / "taesd"
STEPS = 1400  # ~14 min at 0.6 s a step (batch 16, 2 threads, AMD EPYC)
BATCH = 16
LR = 1e-3
LR_END = 1e-4  # cosine decay to this over --steps
WARMUP = 50
TRAIN_IMAGES = 6000
HELDOUT_IMAGES = 64
SEED = 0


@torch.no_grad()
def teacher_pairs(vae, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pictures in [-1, 1], the U-Net-space latents, the demo VAE decoder's pictures)."""
    scale = vae.config.scaling_factor
    xs, zs, ys = [], [], []
    for i in range(0, len(images), 200):
        x = torch.from_numpy(images[i:i + 200]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = vae.encode(x).latent_dist.mean
        xs.append(x), zs.append(z * scale), ys.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(xs), torch.cat(zs), torch.cat(ys)


def pixels(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def fidelity(tiny, vae, held: tuple) -> dict:
    """8-bit PSNR on held-out pictures: the tiny decoder against the full one, and the full
    decoder on the tiny encoder's latents against it on the full encoder's."""
    x, z, y = held
    dec = psnr(pixels(tiny.decoder(z)), pixels(y))
    enc = psnr(pixels(vae.decode(tiny.encoder(x) / vae.config.scaling_factor).sample), pixels(y))
    return {"decoder_psnr_db": round(float(dec), 2), "encoder_psnr_db": round(float(enc), 2)}


def train(args, vae) -> tuple:
    from diffusers import AutoencoderTiny

    torch.manual_seed(args.seed)
    tiny = AutoencoderTiny()  # TAESD's published config: 64 channels, 4 latent channels
    images, _, _ = D.make_train_set(TRAIN_IMAGES, seed=args.seed + 13)
    x, z, y = teacher_pairs(vae, images)
    held_images = D.heldout_set(HELDOUT_IMAGES, seed=args.seed + 17)[0]
    held = teacher_pairs(vae, held_images)
    opt = torch.optim.Adam(tiny.parameters(), lr=LR)
    rng = np.random.default_rng(args.seed)
    t0, step = time.time(), 0
    while step < args.steps and time.time() - t0 < args.minutes * 60:
        frac = min(1.0, step / max(1, args.steps))
        lr = LR * min(1.0, (step + 1) / WARMUP)
        lr = LR_END + (lr - LR_END) * 0.5 * (1 + np.cos(np.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.choice(len(x), BATCH, replace=False))
        loss_dec = F.mse_loss(tiny.decoder(z[idx]), y[idx])
        loss_enc = F.mse_loss(tiny.encoder(x[idx]), z[idx])
        opt.zero_grad()
        (loss_dec + loss_enc).backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            log(f"step {step}: decoder {loss_dec.item():.5f}, encoder {loss_enc.item():.5f}, "
                f"lr {lr:.2e}")
    wall = time.time() - t0
    tiny.eval()
    return tiny, step, wall, step < args.steps, fidelity(tiny, vae, held)


def main(argv=None) -> None:
    a = trainer_args(__doc__, DEFAULT_OUT, STEPS, 14.0, SEED).parse_args(argv)
    torch.set_num_threads(a.threads)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(a.weights / "vae").eval()
    vae.requires_grad_(False)
    tiny, done, wall, stopped, fid = train(a, vae)
    log(f"held-out fidelity: {fid}")
    import diffusers

    args = list(argv if argv is not None else sys.argv[1:])
    note = {"what": "demo TAESD: AutoencoderTiny distilled from the demo VAE",
            "command": " ".join(["python -m ldm_edge.demo.train_taesd"] + [shlex.quote(x) for x in args]),
            "steps": done, "stopped_by_minutes": stopped, "wall_s": round(wall, 1),
            "threads": a.threads, "seed": a.seed, "lr": [LR, LR_END], "batch": BATCH,
            "train_images": TRAIN_IMAGES, "heldout_images": HELDOUT_IMAGES,
            "heldout_fidelity": fid,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "cpu": cpu_summary()["model"] or platform.machine(), "cpu_count": os.cpu_count()}
    out = save(tiny, a.out, note, what="TAESD")
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.1f} MB) after {done} steps, {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
