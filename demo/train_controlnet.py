"""Train the demo ControlNet: canny edges steer where (and what) the demo model draws.

    python -m ldm_edge.demo.train_controlnet [--minutes 30] [--steps 20000] [--threads 2]
                                             [--runs demo/runs/controlnet] [--out demo/weights/controlnet]

``diffusers.ControlNetModel.from_unet(demo U-Net)`` (its encoder copied from the U-Net, the
zero convolutions at zero, as the ControlNet paper trains from), with the demo U-Net, its
autoencoder and the MiniLM text encoder frozen. Training pairs come from the demo dataset
(dataset.py, training combinations only): the latents of a rendered picture, its caption, and
its control image = the canny edges of that picture at pixel size, computed by the runtime's own
``--control-preprocess canny`` code (runtime/control_preprocess.py: ``cv2.Canny(pixels, 100,
200)`` on three channels), so a user's ``ldm-run --control demo:photo.png --control-preprocess
canny`` feeds the graph what it was trained on. DDPM epsilon loss through the frozen U-Net,
captions dropped to "" at CAPTION_DROPOUT (the ControlNet paper's 50 %: the edges alone must
carry the layout). Resumable: checkpoints in --runs every CKPT_MINUTES; rerun the same command
to continue. Writes --out in diffusers layout (config.json + fp16 safetensors) and
``training.json`` (command, steps, wall time, versions, the weights' sha256).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that sleep rather than spin while they wait: on this shared 2-core machine a
# spinning thread starves the others (a first run here, spinning and beside an export, made 18
# steps in 4 min at batch 32; with passive waits and batch 16, 0.65 s/step under the same load)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

from ldm_edge.runtime.control_preprocess import Preprocess
from ldm_edge.runtime.cpu import cpu_summary

from . import dataset as D
from . import sample_torch as S

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "weights" / "controlnet"
DEFAULT_RUNS = HERE / "runs" / "controlnet"
# three stride-2 convs: images scaled by 1/8, the demo VAE's factor (ldm-export refuses a
# ControlNet whose conditioning embedding does not match it); narrow, the images are 64x64
COND_CHANNELS = (16, 32, 64, 128)
STEPS = 20000  # upper bound; --minutes ends a run first on this machine
BATCH = 16  # half the base U-Net's: more updates in the few minutes this machine gives
# small model, zero convs start at 0: far above the paper's 1e-5 for SD. A first run here at
# 5e-4, half its timesteps from [500, 1000) and no caption swaps, moved no shape after 1 187
# steps (16 edge maps, with and without: the same positions read)
LR = 1e-3
WARMUP = 50
TRAIN_IMAGES = 6000  # rendered once (edges and latents computed once)
CAPTION_DROPOUT = 0.5  # the ControlNet paper's share of empty prompts
# share of the kept captions whose position is swapped for another one (same colour, shape,
# background): the demo model follows the caption's position on 100 % of prompts, so with
# captions that always agree with the edges the ControlNet never has to outweigh them; here
# the edges are the authority on where the shape is
CAPTION_SWAP = 0.25
SEED = 0
CKPT_MINUTES = 4.0
MAX_DIR_BYTES = 8 << 20  # the committed folder stays a few MB (weights stored in fp16)


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def canny(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 pictures -> their edge maps as the runtime's ``--control-preprocess
    canny`` makes them, (N, H, W, 3) uint8 (0 or 255)."""
    pre = Preprocess("canny")
    return np.stack([pre.apply(im) for im in images])


def control_tensor(edges: np.ndarray) -> torch.Tensor:
    """uint8 edge maps -> float [N, 3, H, W] in [0, 1], as the runtime feeds ``controlnet_cond``."""
    return torch.from_numpy(edges).permute(0, 3, 1, 2).float() / 255.0


def make_controlnet(unet):
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)


@torch.no_grad()
def training_data(vae, text, seed: int) -> dict:
    images, captions, _ = D.make_train_set(TRAIN_IMAGES, seed=seed + 7)
    means, stds = [], []
    for i in range(0, len(images), 200):
        x = torch.from_numpy(images[i:i + 200]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        means.append(dist.mean), stds.append(dist.std)
    prompts = sorted(set(captions)) + [""]
    pos = {p: i for i, p in enumerate(prompts)}
    return {"mean": torch.cat(means), "std": torch.cat(stds), "table": text(prompts),
            "captions": prompts, "captions_per_sample": captions,
            "cap_idx": torch.tensor([pos[c] for c in captions]), "empty": pos[""],
            "control": control_tensor(canny(images))}


@torch.no_grad()
def swapped_captions(data: dict, text, seed: int) -> dict:
    """For each training sample, its caption with the position replaced by another one:
    ``idx`` (into the caption table extended by ``table``)."""
    from .evaluate import parse_prompt

    rng = np.random.default_rng(seed + 11)
    out = []
    for c in data["captions_per_sample"]:
        pos = parse_prompt(c)["position"]
        others = [p for p in D.POSITIONS if p != pos]
        out.append(c.replace(pos, others[int(rng.integers(len(others)))]))
    unique = sorted(set(out))
    at = {p: len(data["table"]) + i for i, p in enumerate(unique)}
    return {"table": text(unique), "idx": torch.tensor([at[c] for c in out])}


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(args) -> tuple:
    """Returns (controlnet, steps done, wall seconds over all runs, stopped by --minutes)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(args.seed)
    weights = Path(args.weights)
    vae = AutoencoderKL.from_pretrained(weights / "vae", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(weights / "unet", torch_dtype=torch.float32).eval()
    unet.requires_grad_(False), vae.requires_grad_(False)
    scale = float(json.loads((weights / "ldm_edge_demo.json").read_text())["scaling_factor"])
    net = make_controlnet(unet).train()
    opt = torch.optim.AdamW(net.parameters(), LR, weight_decay=0.0)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    ckpt = runs / "ckpt.pt"
    step, wall = 0, 0.0
    if ckpt.exists():
        ck = torch.load(ckpt, weights_only=False)
        net.load_state_dict(ck["net"]), opt.load_state_dict(ck["opt"])
        step, wall = ck["step"], ck["wall"]
        log(f"resumed at step {step} ({wall / 60:.1f} min so far)")
    log(f"ControlNet {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M params; rendering, "
        f"edge-detecting and encoding {TRAIN_IMAGES} images")
    cache = runs / f"data-{TRAIN_IMAGES}-{args.seed}.pt"  # rendered, edge-detected, encoded once
    if cache.exists():
        data = torch.load(cache, weights_only=False)
    else:
        data = training_data(vae, S.TextEncoder("cpu", weights / "tokenizer" / "tokenizer.json"), args.seed)
        atomic_save(data, cache)
    swaps = swapped_captions(data, S.TextEncoder("cpu", weights / "tokenizer" / "tokenizer.json"), args.seed)
    table = torch.cat([data["table"], swaps["table"]])
    sched = DDPMScheduler(**S.SD_BETAS, prediction_type="epsilon")
    gen = torch.Generator().manual_seed(args.seed * 1000 + step)  # a resumed run draws on
    t0 = last_ck = time.time()
    deadline = t0 + args.minutes * 60
    losses: list[float] = []

    def checkpoint() -> None:
        atomic_save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
                     "wall": wall + time.time() - t0}, ckpt)
        log(f"checkpoint at step {step}")

    while step < args.steps and time.time() < deadline:
        idx = torch.randint(len(data["cap_idx"]), (BATCH,), generator=gen)
        ci = data["cap_idx"][idx].clone()
        swap = torch.rand(BATCH, generator=gen) < CAPTION_SWAP
        ci[swap] = swaps["idx"][idx[swap]]
        ci[torch.rand(BATCH, generator=gen) < CAPTION_DROPOUT] = data["empty"]
        z = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=gen)) * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (BATCH,), generator=gen)
        noisy, text = sched.add_noise(z, noise, t), table[ci]
        down, mid = net(noisy, t, encoder_hidden_states=text, controlnet_cond=data["control"][idx],
                        return_dict=False)
        pred = unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % 25 == 0:
            log(f"step {step}: loss {np.mean(losses[-25:]):.4f} "
                f"({(time.time() - t0) / max(len(losses), 1):.2f} s/step this run)")
        if time.time() - last_ck > CKPT_MINUTES * 60:
            checkpoint()
            last_ck = time.time()
    stopped = step < args.steps
    if stopped:
        log(f"stopped by --minutes {args.minutes} at step {step}")
    checkpoint()
    return net.eval(), step, wall + time.time() - t0, stopped


def save(net, out: Path, note: dict, what: str = "ControlNet") -> Path:
    """save_pretrained (fp16 safetensors) into a temporary folder, then each file into ``out``."""
    tmp = out.parent / (".tmp_" + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    net.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    size = sum(f.stat().st_size for f in tmp.iterdir())
    if size > MAX_DIR_BYTES:
        shutil.rmtree(tmp)
        sys.exit(f"error: the {what} would be {size} bytes, over the {MAX_DIR_BYTES}-byte budget")
    weights = tmp / "diffusion_pytorch_model.safetensors"
    note = dict(note, bytes=weights.stat().st_size,
                sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    (tmp / "training.json").write_text(json.dumps(note, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.chmod(f, 0o644)
        os.replace(f, out / f.name)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def trainer_args(doc: str, out: Path, steps: int, minutes: float,
                 seed: int) -> argparse.ArgumentParser:
    """The options every demo trainer beside the model takes: the model, where to write, and
    the budget."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=S.DEFAULT_WEIGHTS, help="the demo model")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--minutes", type=float, default=minutes, help="wall-clock budget of this run")
    ap.add_argument("--seed", type=int, default=seed)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv=None) -> None:
    ap = trainer_args(__doc__, DEFAULT_OUT, STEPS, 30.0, SEED)
    ap.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="checkpoints (resumed from)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    net, done, wall, stopped = train(a)
    import diffusers

    args = list(argv if argv is not None else sys.argv[1:])
    note = {"what": "demo ControlNet: canny edges of a picture -> the demo model draws its layout",
            "command": " ".join(["python -m ldm_edge.demo.train_controlnet"] + [shlex.quote(x) for x in args]),
            "steps": done, "stopped_by_minutes": stopped, "wall_s": round(wall, 1),
            "threads": a.threads, "seed": a.seed, "lr": LR, "batch": BATCH,
            "train_images": TRAIN_IMAGES, "caption_dropout": CAPTION_DROPOUT,
            "caption_swap": CAPTION_SWAP,
            "conditioning_embedding_out_channels": list(COND_CHANNELS),
            "control": "canny edges (runtime/control_preprocess.py, 100/200) at 64x64",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "cpu": cpu_summary()["model"] or platform.machine(), "cpu_count": os.cpu_count()}
    out = save(net, a.out, note)
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {out} ({size / 1e6:.1f} MB) after {done} steps, {wall / 60:.1f} min in all")


if __name__ == "__main__":
    main()
