"""A model family's conditioning: which encoders turn a request into U-Net inputs that hold for
the whole loop. One class a kind, picked by ``conditioning_for`` from what the bundle has:

* ``PromptConditioning``: one text encoder (CLIP for SD1/SD2, LDM-BERT for the paper's
  text-to-image model) -> ``encoder_hidden_states``, [negatives; prompts] under guidance;
* ``NoConditioning``: a model without a text encoder (unconditional, super-resolution);
* ``GuidanceEmbedding``: an LCM-distilled U-Net: the prompts (no negatives: no guidance batch)
  and the guidance scale's embedding as ``timestep_cond``;
* ``AddedConditioning``: SDXL: two text encoders' penultimate hidden states joined, the second's
  pooled projection as ``text_embeds``, and the micro-conditioning as ``time_ids``.

A family with more (two encoders and pooled embeddings, a guidance embedding) adds a class and
a line in ``conditioning_for``; the denoise loop binds whatever ``feeds`` holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Conditioned:
    """U-Net inputs for the whole loop (batch-leading: the guidance batch), and per prompt the
    number of tokens the tokenizer dropped."""

    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)


class NoConditioning:
    components: tuple[str, ...] = ()

    def encode(self, pipe, req) -> Conditioned:
        return Conditioned({}, [0] * req.num_images)


class PromptConditioning:
    """The prompts (and, under guidance, the negative prompts first) through the text encoder,
    each repeated for its images, as diffusers' pipelines batch them."""

    components = ("text_encoder",)

    def encode(self, pipe, req) -> Conditioned:
        n = req.num_images_per_prompt
        prompts = [q for q in req.prompts for _ in range(n)]
        negs = [q for q in req.negative_prompts for _ in range(n)]
        emb, dropped = pipe.encode_text(negs + prompts if req.guided else prompts)
        if req.guided:
            _warn_truncated(pipe, "negative prompt", dropped[:len(negs):n])
            dropped = dropped[len(negs):]
        _warn_truncated(pipe, "prompt", dropped[::n])
        return Conditioned({"encoder_hidden_states": emb.astype(np.float32)}, dropped[::n])


class GuidanceEmbedding(PromptConditioning):
    """An LCM-distilled U-Net (``time_cond_proj_dim``): the guidance scale w enters the U-Net
    as a sinusoidal embedding of (w - 1) * 1000, one per image, as diffusers'
    LatentConsistencyModelPipeline makes it; the request is never a guidance batch."""

    def __init__(self, dim: int):
        self.dim = dim

    def encode(self, pipe, req) -> Conditioned:
        out = super().encode(pipe, req)
        out.feeds["timestep_cond"] = guidance_embedding(
            np.full(req.num_images, req.guidance_scale - 1.0), self.dim)
        return out


class AddedConditioning:
    """SDXL (StableDiffusionXL*Pipeline.encode_prompt): each prompt through both text encoders
    (the refiner has the second only), their penultimate hidden states joined on the feature
    axis, the second's pooled projection as ``text_embeds``; under guidance the negatives first,
    or zeros where the model says so and no negative prompt was given (``req.zero_negative``);
    ``time_ids`` from the request's micro-conditioning (runtime/added_cond.py)."""

    components = ("text_encoder", "text_encoder_2")

    def __init__(self, manifest):
        from .tokenizer import PromptTokenizer

        self.encoders = [(name, PromptTokenizer.from_manifest(manifest, key))
                         for name, key in (("text_encoder", "tokenizer"),
                                           ("text_encoder_2", "tokenizer_2"))
                         if manifest.has(name)]

    def _embed(self, pipe, prompts: list[str]):
        """(joined hidden states, pooled embeddings, tokens dropped per prompt)."""
        hidden, pooled, dropped = [], None, [0] * len(prompts)
        for name, tokenizer in self.encoders:
            tokens = tokenizer(prompts)
            outs = pipe.call_outputs(name, {"input_ids": tokens.input_ids})
            hidden.append(outs[0])
            pooled = outs[1] if len(outs) > 1 else pooled
            dropped = [max(a, b) for a, b in zip(dropped, tokens.dropped)]
        return np.concatenate(hidden, axis=-1), pooled, dropped

    def encode(self, pipe, req) -> Conditioned:
        from .added_cond import time_ids

        n = req.num_images_per_prompt
        hidden, pooled, dropped = self._embed(pipe, [q for q in req.prompts for _ in range(n)])
        _warn_truncated(pipe, "prompt", dropped[::n], self.encoders[0][1].max_length)
        ids = time_ids(req, negative=False)
        if req.guided:
            if req.zero_negative:
                neg_hidden, neg_pooled = np.zeros_like(hidden), np.zeros_like(pooled)
            else:
                negs = [q for q in req.negative_prompts for _ in range(n)]
                neg_hidden, neg_pooled, neg_dropped = self._embed(pipe, negs)
                _warn_truncated(pipe, "negative prompt", neg_dropped[::n],
                                self.encoders[0][1].max_length)
            hidden = np.concatenate([neg_hidden, hidden])
            pooled = np.concatenate([neg_pooled, pooled])
            ids = np.concatenate([time_ids(req, negative=True), ids])
        return Conditioned({"encoder_hidden_states": hidden.astype(np.float32),
                            "text_embeds": pooled.astype(np.float32),
                            "time_ids": np.repeat(ids, req.num_images, axis=0)},
                           dropped[::n])


# the sinusoid's frequencies run from 1 down to 1 / GUIDANCE_MAX_PERIOD (diffusers' value)
GUIDANCE_MAX_PERIOD = 10000.0
GUIDANCE_SCALE_FACTOR = 1000.0  # w is scaled as a timestep is before its embedding


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """[len(w), dim] float32: sin then cos of (w * 1000) times ``dim // 2`` geometric
    frequencies, a zero column appended when ``dim`` is odd (computed in float32, as torch
    does it in the reference pipeline)."""
    half = dim // 2
    step = np.float32(np.log(np.float32(GUIDANCE_MAX_PERIOD)) / (half - 1))
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    args = (np.asarray(w, np.float32) * np.float32(GUIDANCE_SCALE_FACTOR))[:, None] * freqs[None]
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


def _warn_truncated(pipe, label: str, dropped: list[int], max_length: int | None = None) -> None:
    for i, k in enumerate(dropped):
        if k:
            log.warning("%s %d is longer than the text encoder's %d tokens: %d token%s dropped",
                        label, i + 1, max_length or pipe.tokenizer.max_length, k,
                        "s" if k > 1 else "")


def conditioning_for(manifest):
    """The conditioning of a bundle's model family."""
    if manifest.has("text_encoder_2"):
        return AddedConditioning(manifest)
    if not manifest.has("text_encoder"):
        return NoConditioning()
    cond = {t.name: t for t in manifest.spec("unet").inputs}.get("timestep_cond")
    return GuidanceEmbedding(int(cond.shape[1])) if cond is not None else PromptConditioning()
