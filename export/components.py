"""Each component as a tiny nn.Module exposing exactly the forward that is exported,
plus deterministic sample inputs that follow its :class:`ComponentSpec`."""

from __future__ import annotations

import numpy as np
import torch

from ldm_edge.runtime.bundle.spec import ComponentSpec

from .load import LoadedModel


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder, use_attention_mask: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.use_attention_mask = use_attention_mask

    def forward(self, input_ids, attention_mask=None):
        mask = attention_mask if self.use_attention_mask else None
        return self.text_encoder(input_ids, attention_mask=mask, return_dict=True).last_hidden_state


class PenultimateTextEncoder(torch.nn.Module):
    """SDXL's text encoders: the penultimate layer's hidden state (``hidden_states[-2]``, no
    final layer norm), and from the second (CLIPTextModelWithProjection) also its projected
    pooled output, ``text_embeds``, as StableDiffusionXLPipeline.encode_prompt takes them."""

    def __init__(self, text_encoder, pooled: bool):
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(self, input_ids):
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        if self.pooled:
            return out.hidden_states[-2], out.text_embeds
        return out.hidden_states[-2]


class AddedCondUNet(torch.nn.Module):
    """An SDXL U-Net: the pooled text embeddings and the time ids (sizes and crop, or the
    refiner's aesthetic score) enter through ``added_cond_kwargs``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=False)[0]


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class GuidanceEmbedUNet(torch.nn.Module):
    """An LCM-distilled U-Net: the guidance scale enters as an embedding (``timestep_cond``),
    not as a second, unconditioned batch. diffusers skips the embedding when it is not
    passed, so it must be an input of the graph (checked: onnx_export.check_inputs_read)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         return_dict=False)[0]


class UpscaleUNet(torch.nn.Module):
    """The SD x4 upscaler's U-Net: class-conditioned on the low-resolution image's noise level."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, noise_level):
        return self.unet(sample, timestep, encoder_hidden_states, class_labels=noise_level,
                         return_dict=False)[0]


class UncondUNet(torch.nn.Module):
    """diffusers' UNet2DModel (the LDM paper's unconditional models): no cross-attention."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep, return_dict=False)[0]


class VqDecoder(torch.nn.Module):
    """VQModel: latents already divided by the scaling factor -> nearest codebook entry per
    latent cell (as ``VQModel.decode`` quantizes by default) -> post-quant conv -> decoder.
    The distance is written as |z|^2 - 2 z.e + |e|^2 (a MatMul, ArgMin and Gather in the
    graph) instead of torch.cdist; the export check compares it with ``VQModel.decode``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        # its own submodule, so its graph nodes are named /vq_lookup/...: FP16 keeps them FP32
        self.vq_lookup = CodebookLookUp(vae.quantize.embedding)

    def forward(self, latent):
        quant = self.vq_lookup(latent)
        spatial = quant if self.vae.config.get("norm_type") == "spatial" else None
        return self.vae.decoder(self.vae.post_quant_conv(quant), spatial)


class CodebookLookUp(torch.nn.Module):
    """[b, c, h, w] -> the nearest codebook entry of each cell, [b, c, h, w]."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, latent):
        codes = self.embedding.weight  # [n, c]
        z = latent.permute(0, 2, 3, 1)  # [b, h, w, c]
        dist = (z * z).sum(-1, keepdim=True) - 2.0 * (z @ codes.t()) + (codes * codes).sum(-1)
        return torch.nn.functional.embedding(dist.argmin(-1), codes).permute(0, 3, 1, 2)


class VaeDecoder(torch.nn.Module):
    """latents already divided by the scaling factor -> image in [-1, 1] (unclipped). On a
    VQModel, ``decode`` quantizes first: what the VQ decoder graph is checked against. On an
    AutoencoderTiny (TAESD, ``vae_decoder_tiny``) ``decode`` soft-clamps the latents
    (3 tanh(z / 3)) and maps its [0, 1] picture to [-1, 1]; its scaling factor is 1.0."""

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


class TinyVaeEncoder(torch.nn.Module):
    """AutoencoderTiny (TAESD): image in [-1, 1] -> the latent itself, before scaling (no
    distribution: diffusers' ``retrieve_latents`` takes ``encode(...).latents`` as it is)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image, return_dict=False)[0]


def wrap(model: LoadedModel, name: str) -> torch.nn.Module:
    if name == "unet" and model.unet_residuals:  # ControlNet residuals as inputs
        from .controlnet_modules import ResidualUNet

        return ResidualUNet(model.unet, added=model.second_encoder is not None).eval()
    if model.second_encoder is not None and name in ("text_encoder", "text_encoder_2", "unet"):
        return _added_cond_wrap(model, name)
    if name == "text_encoder":
        return TextEncoder(model.text_encoder, model.use_attention_mask).eval()
    if name == "unet":
        if model.upscaler is not None:
            return UpscaleUNet(model.unet).eval()
        if model.time_cond_proj_dim:
            return GuidanceEmbedUNet(model.unet).eval()
        return (UNet(model.unet) if model.text_encoder is not None
                else UncondUNet(model.unet)).eval()
    if name == "vae_decoder":
        return (VqDecoder(model.vae) if _is_vq(model.vae) else VaeDecoder(model.vae)).eval()
    if name == "vae_encoder":
        return VaeEncoder(model.vae).eval()
    if name == "vae_decoder_tiny":
        return VaeDecoder(model.tiny_vae).eval()
    if name == "vae_encoder_tiny":
        return TinyVaeEncoder(model.tiny_vae).eval()
    raise KeyError(name)


def _added_cond_wrap(model: LoadedModel, name: str) -> torch.nn.Module:
    if name == "unet":
        return AddedCondUNet(model.unet).eval()
    if name == "text_encoder_2":
        return PenultimateTextEncoder(model.second_encoder.text_encoder, pooled=True).eval()
    return PenultimateTextEncoder(model.text_encoder, pooled=False).eval()


def reference(model: LoadedModel, name: str) -> torch.nn.Module:
    """The PyTorch module an exported graph is checked against: the wrapper itself, except
    for a VQ decoder, which is checked against diffusers' VQModel.decode."""
    if name == "vae_decoder" and _is_vq(model.vae):
        return VaeDecoder(model.vae).eval()  # diffusers' own VQModel.decode
    return wrap(model, name)


def _is_vq(vae) -> bool:
    return hasattr(vae, "quantize") and hasattr(vae.quantize, "embedding")


def sample_inputs(spec: ComponentSpec, model: LoadedModel, batch: int, height: int, width: int,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``spec`` at ``batch`` images of ``height`` x ``width`` pixels."""
    rng = np.random.default_rng(seed)
    f = model.vae_scale_factor
    c = model.latent_channels
    h, w = height // f, width // f
    L = model.tokenizer_max_length
    if spec.name in ("text_encoder", "text_encoder_2"):
        te = model.text_encoder if spec.name == "text_encoder" else model.second_encoder.text_encoder
        L = int(spec.input("input_ids").shape[1])
        vocab = int(te.config.vocab_size)
        ids = rng.integers(0, vocab, size=(batch, L), dtype=np.int64)
        feeds = {"input_ids": ids}
        if "attention_mask" in spec.input_names:
            lengths = rng.integers(2, L + 1, size=batch)
            feeds["attention_mask"] = (np.arange(L)[None, :] < lengths[:, None]).astype(np.int64)
        return feeds
    if spec.name == "unet":
        feeds = {
            "sample": rng.standard_normal((batch, model.unet_in_channels, h, w), dtype=np.float32),
            "timestep": rng.uniform(0, 999, size=(batch,)).astype(np.float32),
        }
        if "noise_level" in spec.input_names:
            feeds["noise_level"] = rng.integers(0, 351, size=(batch,), dtype=np.int64)
        if "encoder_hidden_states" in spec.input_names:
            feeds["encoder_hidden_states"] = rng.standard_normal(
                (batch, L, model.cross_attention_dim), dtype=np.float32)
        if "timestep_cond" in spec.input_names:  # sin/cos of the guidance embedding: [-1, 1]
            feeds["timestep_cond"] = rng.uniform(
                -1, 1, size=(batch, model.time_cond_proj_dim)).astype(np.float32)
        if "time_ids" in spec.input_names:  # SDXL: pooled text embeddings; sizes in pixels
            feeds["text_embeds"] = rng.standard_normal(
                (batch, model.second_encoder.projection_dim), dtype=np.float32)
            feeds["time_ids"] = rng.integers(0, 1024, size=(batch, model.time_ids_dim)
                                             ).astype(np.float32)
        if model.unet_residuals:  # ControlNet residuals (export/controlnet.py)
            from .controlnet_modules import residual_feeds

            feeds.update(residual_feeds(spec, batch, h, w, rng))
        return feeds
    if spec.name in ("vae_decoder", "vae_decoder_tiny"):
        return {"latent": rng.standard_normal((batch, c, h, w), dtype=np.float32)}
    if spec.name in ("vae_encoder", "vae_encoder_tiny"):
        return {"image": rng.uniform(-1, 1, size=(batch, 3, height, width)).astype(np.float32)}
    raise KeyError(spec.name)


@torch.no_grad()
def run_torch_all(module: torch.nn.Module, spec: ComponentSpec, feeds: dict) -> list[np.ndarray]:
    """Every output of the module, in the order of ``spec.outputs``."""
    args = [torch.from_numpy(feeds[n]) for n in spec.input_names]
    out = module(*args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in outs]
