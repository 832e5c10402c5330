"""Train the bundled demo latent diffusion model (two stages, resumable).

    python -m ldm_edge.demo.train [--stage ae|unet|all] [--minutes M] [--threads T]
                                  [--out demo/runs] [--export demo/weights]

Stage 1 (ae): AutoencoderKL, f=8 (64x64x3 -> 8x8x4), shape-weighted L1 + small KL + PatchGAN
hinge loss after a warm-up. Stage 2 (unet): UNet2DConditionModel on frozen MiniLM token
embeddings, DDPM epsilon objective, caption dropout, EMA. Each run checkpoints into --out
every few minutes and resumes from there; exports go to --export in diffusers layout.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from . import dataset as D
from . import evaluate as E
from . import sample_torch as S

HERE = Path(__file__).resolve().parent
AE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 64, 128),
                 layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)
# Two levels (8x8, 4x4) with cross-attention at both: the CPU budget here allows no more.
UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                   block_out_channels=(64, 128), norm_num_groups=32, cross_attention_dim=384,
                   attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2,
                   up_block_types=("CrossAttnUpBlock2D",) * 2)
AE_STEPS = 2800  # stage-1 target (batch AE_BATCH); the LR follows a cosine to this step
AE_BATCH = 16
AE_LR = 4e-4
AE_LR_FLOOR = 0.05  # final learning rate as a share of AE_LR
AE_TRAIN_N = 6000  # images rendered for stage 1
SHAPE_WEIGHT = 8.0  # extra L1 weight on the shape's pixels (plain L1 lost small shapes' colour)
KL_WEIGHT = 1e-6  # on the per-sample KL sum, next to a per-pixel mean L1
GAN_START = 1500  # adversarial term switched on after this many AE steps
GAN_WEIGHT = 0.05  # generator hinge-loss weight
UNET_STEPS = 30000  # stage-2 target (batch UNET_BATCH)
UNET_BATCH = 32
UNET_LR = 4e-4
UNET_WARMUP = 300
UNET_TRAIN_N = 8000  # images encoded once into latents for stage 2
CAPTION_DROPOUT = 0.1  # share of captions replaced by "" (the unconditional prompt)
EMA_DECAY = 0.999
UNET_FP16 = True  # store the UNet in fp16 so demo/weights stays under 25 MB
CKPT_MINUTES = 4.0  # checkpoint interval
EXPORT_MINUTES = 10.0  # stage-2 export + quick fidelity check interval
GUIDANCE_GRID = (3.0, 5.0, 7.0)
TUNE_PROMPTS = 100  # held-out prompts per guidance value when tuning
EVAL_N = 300  # images for reconstruction figures


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def to_tensor(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_dir(model, dest: Path) -> None:
    """save_pretrained into a temp dir, then move each file into place atomically."""
    tmp = dest.parent / (".tmp_" + dest.name)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    dest.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, dest / f.name)
    shutil.rmtree(tmp, ignore_errors=True)


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN-style conv discriminator: one real/fake logit per overlapping patch."""

    def __init__(self, ch: int = 32):
        super().__init__()
        act = lambda: torch.nn.LeakyReLU(0.2)  # noqa: E731
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, ch, 4, 2, 1), act(),
            torch.nn.Conv2d(ch, 2 * ch, 4, 2, 1), torch.nn.GroupNorm(8, 2 * ch), act(),
            torch.nn.Conv2d(2 * ch, 4 * ch, 4, 1, 1), torch.nn.GroupNorm(8, 4 * ch), act(),
            torch.nn.Conv2d(4 * ch, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x)


def shape_weight(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 weight: 1 on the background, 1 + SHAPE_WEIGHT on the shape (corner = background)."""
    mask = ((x - x[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.1).float()
    return 1.0 + SHAPE_WEIGHT * mask


def read_metrics(out: Path) -> dict:
    f = out / "metrics.json"
    return json.loads(f.read_text()) if f.exists() else {}


def write_metrics(out: Path, update: dict) -> dict:
    m = read_metrics(out)
    m.update(update)
    atomic_write_text(out / "metrics.json", json.dumps(m, indent=2))
    return m


@torch.no_grad()
def eval_ae(vae, device) -> dict:
    """Reconstruction PSNR and evaluator readability on train + held-out ground truth."""
    vae.eval()
    tr, tr_caps, _ = D.make_train_set(EVAL_N, seed=123)
    ho, ho_caps, _ = D.heldout_set(EVAL_N // 2, seed=7)
    images, caps = np.concatenate([tr, ho]), tr_caps + ho_caps
    recs, zs = [], []
    for i in range(0, len(images), 50):
        x = to_tensor(images[i:i + 50], device)
        dist = vae.encode(x).latent_dist
        zs.append(dist.sample())
        recs.append(to_uint8(vae.decode(dist.mode()).sample))
    rec = np.concatenate(recs)
    mse = ((rec.astype(np.float64) - images) ** 2).mean(axis=(1, 2, 3))
    psnr = float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))
    result = E.score(rec, caps)
    vae.train()
    return {"psnr": psnr, "readable": result["all"], "score": result,
            "latent_std": float(torch.cat(zs)[:EVAL_N].std())}  # train-distribution images only


def train_ae(args, device, deadline: float) -> None:
    from diffusers import AutoencoderKL

    out = Path(args.out)
    ckpt_file = out / "ae_ckpt.pt"
    vae = AutoencoderKL(**AE_CONFIG).to(device)
    disc = PatchDiscriminator().to(device)
    opt = torch.optim.Adam(vae.parameters(), AE_LR, betas=(0.5, 0.9))
    dopt = torch.optim.Adam(disc.parameters(), AE_LR / 2, betas=(0.5, 0.9))
    step, wall = 0, 0.0
    if ckpt_file.exists():
        ck = torch.load(ckpt_file, map_location=device, weights_only=False)
        vae.load_state_dict(ck["vae"]), disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"]), dopt.load_state_dict(ck["dopt"])
        step, wall = ck["step"], ck["wall"]
        log(f"ae: resumed at step {step} ({wall / 60:.1f} min so far)")
    if step >= args.ae_steps:
        log("ae: already at target steps")
        return
    log(f"ae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, rendering {AE_TRAIN_N} images")
    images, _, _ = D.make_train_set(AE_TRAIN_N, seed=0)
    gen = torch.Generator().manual_seed(1000 + step)
    t0, last_ck, run_start = time.time(), time.time(), time.time()

    def checkpoint(final: bool) -> None:
        wall_now = wall + time.time() - t0
        atomic_save({"vae": vae.state_dict(), "disc": disc.state_dict(), "opt": opt.state_dict(),
                     "dopt": dopt.state_dict(), "step": step, "wall": wall_now}, ckpt_file)
        ev = eval_ae(vae, device)
        vae.register_to_config(scaling_factor=1.0 / ev["latent_std"])
        save_model_dir(vae, out / "vae")
        m = write_metrics(out, {"ae_steps": step, "ae_wall_s": round(wall_now, 1), "ae_batch": AE_BATCH,
                                "ae_psnr_db": round(ev["psnr"], 2), "ae_readable": round(ev["readable"], 4),
                                "ae_s_per_step": round(wall_now / max(step, 1), 3),
                                "ae_threads": args.threads, "scaling_factor": 1.0 / ev["latent_std"]})
        log(f"ae: ckpt step {step}: PSNR {ev['psnr']:.2f} dB, readable {100 * ev['readable']:.1f}% "
            f"({E.format_score(ev['score'])}), latent std {ev['latent_std']:.3f}")
        if args.export:
            export(args, m)

    vae.train()
    while step < args.ae_steps and time.time() < deadline:
        idx = torch.randint(len(images), (AE_BATCH,), generator=gen).numpy()
        x = to_tensor(images[idx], device)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.sample()).sample
        w = shape_weight(x)
        rec = (w * (y - x).abs()).mean() / w.mean()
        loss = rec + KL_WEIGHT * post.kl().mean()
        gan_on = step >= GAN_START
        if gan_on:
            loss = loss - GAN_WEIGHT * disc(y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:
            d_loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(y.detach())).mean()
            dopt.zero_grad(set_to_none=True)
            d_loss.backward()
            dopt.step()
        step += 1
        cosine = 0.5 * (1 + np.cos(np.pi * min(step / args.ae_steps, 1.0)))
        for g in opt.param_groups:  # cosine decay to AE_LR_FLOOR * AE_LR at the target step
            g["lr"] = AE_LR * (AE_LR_FLOOR + (1 - AE_LR_FLOOR) * cosine)
        if step % 50 == 0:
            rate = (time.time() - run_start) / 50
            run_start = time.time()
            log(f"ae step {step}: rec {rec.item():.4f} kl {post.kl().mean().item():.1f} "
                f"{'gan on ' if gan_on else ''}{rate:.2f} s/step")
        if time.time() - last_ck > CKPT_MINUTES * 60:
            checkpoint(False)
            last_ck = time.time()
    checkpoint(True)


def load_latents(args, vae, device) -> dict:
    """Encode UNET_TRAIN_N training images once (posterior mean + std), cached in --out."""
    out = Path(args.out)
    cache = out / "latents.pt"
    ae_step = read_metrics(out).get("ae_steps")
    if cache.exists():
        data = torch.load(cache, weights_only=False)
        if data.get("ae_steps") == ae_step:
            return data
    log(f"unet: encoding {UNET_TRAIN_N} images into latents")
    images, captions, _ = D.make_train_set(UNET_TRAIN_N, seed=1)
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 200):
            dist = vae.encode(to_tensor(images[i:i + 200], device)).latent_dist
            means.append(dist.mean.cpu()), stds.append(dist.std.cpu())
    data = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions, "ae_steps": ae_step}
    atomic_save(data, cache)
    return data


def tune_guidance(unet, vae, text, n: int) -> dict:
    res = {}
    for g in GUIDANCE_GRID:
        r = S.heldout_fidelity(unet, vae, text, n, g)
        res[g] = r
        log(f"unet: guidance {g}: {E.format_score(r)}")
    return res


def train_unet(args, device, deadline: float) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    out = Path(args.out)
    vae = AutoencoderKL.from_pretrained(out / "vae").eval().to(device)
    scale = vae.config.scaling_factor
    data = load_latents(args, vae, device)
    text = S.TextEncoder(device)
    prompts = sorted(set(data["captions"])) + [""]
    table = text(prompts).to(device)  # (U, L, 384): every embedding the stage needs, computed once
    pos = {p: i for i, p in enumerate(prompts)}
    cap_idx = torch.tensor([pos[c] for c in data["captions"]])
    empty = pos[""]
    mean, std = data["mean"].to(device), data["std"].to(device)
    unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), UNET_LR, weight_decay=0.01)
    sched = DDPMScheduler(**S.SD_BETAS, prediction_type="epsilon")
    ckpt_file = out / "unet_ckpt.pt"
    step, wall = 0, 0.0
    if ckpt_file.exists():
        ck = torch.load(ckpt_file, map_location=device, weights_only=False)
        unet.load_state_dict(ck["unet"]), ema.load_state_dict(ck["ema"]), opt.load_state_dict(ck["opt"])
        step, wall = ck["step"], ck["wall"]
        log(f"unet: resumed at step {step} ({wall / 60:.1f} min so far)")
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, scaling factor {scale:.4f}")
    gen = torch.Generator().manual_seed(2000 + step)
    t0, last_ck, last_ex, run_start = time.time(), time.time(), time.time(), time.time()

    def checkpoint(final: bool, export_now: bool) -> None:
        wall_now = wall + time.time() - t0
        atomic_save({"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                     "step": step, "wall": wall_now}, ckpt_file)
        update = {"unet_steps": step, "unet_wall_s": round(wall_now, 1), "unet_batch": UNET_BATCH,
                  "unet_s_per_step": round(wall_now / max(step, 1), 3), "unet_threads": args.threads}
        if final:
            res = tune_guidance(ema, vae, text, TUNE_PROMPTS)
            best = max(res, key=lambda g: (res[g]["all"], -g))
            update.update({"guidance_scale": best, "heldout_fidelity": round(res[best]["all"], 4),
                           "fidelity_by_guidance": {str(g): round(r["all"], 4) for g, r in res.items()},
                           "fidelity_prompts": TUNE_PROMPTS})
        elif export_now:
            g = read_metrics(out).get("guidance_scale", 5.0)
            r = S.heldout_fidelity(ema, vae, text, 50, g)
            log(f"unet: step {step} quick check at guidance {g}: {E.format_score(r)}")
            update.update({"heldout_fidelity": round(r["all"], 4), "guidance_scale": g, "fidelity_prompts": 50})
        m = write_metrics(out, update)
        save_model_dir(copy.deepcopy(ema).half() if UNET_FP16 else ema, out / "unet")
        log(f"unet: ckpt step {step} ({wall_now / 60:.1f} min)")
        if args.export and (final or export_now):
            export(args, m)

    unet.train()
    while step < args.unet_steps and time.time() < deadline:
        idx = torch.randint(len(cap_idx), (UNET_BATCH,), generator=gen)
        ci = cap_idx[idx].clone()
        ci[torch.rand(UNET_BATCH, generator=gen) < CAPTION_DROPOUT] = empty
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen).to(device)) * scale
        noise = torch.randn(z.shape, generator=gen).to(device)
        t = torch.randint(0, sched.config.num_train_timesteps, (UNET_BATCH,), generator=gen).to(device)
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=table[ci.to(device)]).sample
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = UNET_LR * min(1.0, (step + 1) / UNET_WARMUP)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 100 == 0:
            rate = (time.time() - run_start) / 100
            run_start = time.time()
            log(f"unet step {step}: loss {loss.item():.4f} {rate:.3f} s/step")
        if time.time() - last_ck > CKPT_MINUTES * 60:
            export_now = time.time() - last_ex > EXPORT_MINUTES * 60
            checkpoint(False, export_now)
            last_ck = time.time()
            last_ex = time.time() if export_now else last_ex
    checkpoint(True, True)


def export(args, metrics: dict) -> None:
    """Write --export in diffusers layout from the --out stage results."""
    out, dest = Path(args.out), Path(args.export)
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ("vae", "unet"):
        if (out / sub / "config.json").exists():
            (dest / sub).mkdir(parents=True, exist_ok=True)
            for f in (out / sub).iterdir():
                tmp = dest / sub / (f.name + ".tmp")
                shutil.copyfile(f, tmp)
                os.replace(tmp, dest / sub / f.name)
    S.ddim_scheduler().save_pretrained(dest / ".tmp_scheduler")
    (dest / "scheduler").mkdir(exist_ok=True)
    os.replace(dest / ".tmp_scheduler" / "scheduler_config.json", dest / "scheduler" / "scheduler_config.json")
    shutil.rmtree(dest / ".tmp_scheduler", ignore_errors=True)
    atomic_write_text(dest / "tokenizer" / "tokenizer.json", json.dumps(S.tokenizer_json(), ensure_ascii=False))
    meta = {"family": "demo", "text_encoder": S.TEXT_ENCODER_PACKAGE, "tokenizer_max_length": S.TOKEN_LENGTH,
            "use_attention_mask": True, "guidance_scale": metrics.get("guidance_scale", 5.0),
            "num_inference_steps": 25, "height": 64, "width": 64}
    meta.update({k: v for k, v in metrics.items() if k not in meta})
    atomic_write_text(dest / "ldm_edge_demo.json", json.dumps(meta, indent=2))
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log(f"exported to {dest} ({size / 1e6:.1f} MB)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("ae", "unet", "all"), default="all")
    ap.add_argument("--minutes", type=float, default=120.0, help="wall-clock budget of this run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE / "runs"))
    ap.add_argument("--export", default=str(HERE / "weights"), help="'' to skip exporting")
    ap.add_argument("--ae-steps", type=int, default=AE_STEPS)
    ap.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.minutes * 60
    log(f"device {device}, threads {args.threads}, budget {args.minutes} min")
    torch.manual_seed(0)
    if args.stage in ("ae", "all"):
        train_ae(args, device, deadline)
    if args.stage in ("unet", "all") and time.time() < deadline:
        train_unet(args, device, deadline)
    log(f"wall time {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
