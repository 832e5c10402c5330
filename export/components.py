"""Each component as a tiny nn.Module exposing exactly the forward that is exported,
plus deterministic sample inputs that follow its :class:`ComponentSpec`."""

from __future__ import annotations

import numpy as np
import torch

from ldm_edge.runtime.spec import ComponentSpec

from .load import LoadedModel


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder, use_attention_mask: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.use_attention_mask = use_attention_mask

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask if self.use_attention_mask else None
        return self.text_encoder(input_ids, attention_mask=mask, return_dict=True).last_hidden_state


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    """latents already divided by the scaling factor -> image in [-1, 1] (unclipped)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """image in [-1, 1] -> mean and log-variance of the latent distribution (2C channels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image, return_dict=True).latent_dist.parameters


def wrap(model: LoadedModel, name: str) -> torch.nn.Module:
    if name == "text_encoder":
        return TextEncoder(model.text_encoder, model.use_attention_mask).eval()
    if name == "unet":
        return UNet(model.unet).eval()
    if name == "vae_decoder":
        return VaeDecoder(model.vae).eval()
    if name == "vae_encoder":
        return VaeEncoder(model.vae).eval()
    raise KeyError(name)


def sample_inputs(spec: ComponentSpec, model: LoadedModel, batch: int, height: int, width: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``spec`` at ``batch`` images of ``height`` x ``width`` pixels."""
    rng = np.random.default_rng(seed)
    f = model.vae_scale_factor
    c = model.latent_channels
    h, w = height // f, width // f
    L = model.tokenizer_max_length
    if spec.name == "text_encoder":
        vocab = int(model.text_encoder.config.vocab_size)
        ids = rng.integers(0, vocab, size=(batch, L), dtype=np.int64)
        feeds = {"input_ids": ids}
        if "attention_mask" in spec.input_names:
            lengths = rng.integers(2, L + 1, size=batch)
            feeds["attention_mask"] = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int64)
        return feeds
    if spec.name == "unet":
        return {
            "sample": rng.standard_normal((batch, c, h, w), dtype=np.float32),
            "timestep": rng.uniform(0, 999, size=(batch,)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal(
                (batch, L, model.text_hidden_size), dtype=np.float32),
        }
    if spec.name == "vae_decoder":
        return {"latent": rng.standard_normal((batch, c, h, w), dtype=np.float32)}
    if spec.name == "vae_encoder":
        return {"image": rng.uniform(-1, 1, size=(batch, 3, height, width)).astype(np.float32)}
    raise KeyError(spec.name)


@torch.no_grad()
def run_torch(module: torch.nn.Module, spec: ComponentSpec, feeds: dict) -> np.ndarray:
    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
    return module(*args).float().numpy()
