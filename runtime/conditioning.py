"""A model family's conditioning: which encoders turn a request into U-Net inputs that hold for
the whole loop. One class a kind, picked by ``conditioning_for`` from what the bundle has:

* ``PromptConditioning``: one text encoder (CLIP for SD1/SD2, LDM-BERT for the paper's
  text-to-image model) -> ``encoder_hidden_states``, [negatives; prompts] under guidance;
* ``NoConditioning``: a model without a text encoder (unconditional, super-resolution).

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


def _warn_truncated(pipe, label: str, dropped: list[int]) -> None:
    for i, k in enumerate(dropped):
        if k:
            log.warning("%s %d is longer than the text encoder's %d tokens: %d token%s dropped",
                        label, i + 1, pipe.tokenizer.max_length, k, "s" if k > 1 else "")


def conditioning_for(manifest):
    """The conditioning of a bundle's model family."""
    return PromptConditioning() if manifest.has("text_encoder") else NoConditioning()
