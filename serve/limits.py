"""Per-request limits of a served pipeline, so one request cannot take the server down.

They sit on top of the bundle's own (exported size range, --max-batch) and of ldm-run's
(1..1000 steps): a server shares one machine among its clients. Each refusal is one line,
returned to the client as HTTP 400, in the words ldm-run uses for its options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.request import GenerationRequest

# Defaults: a 512² SD1.5 request at 50 steps is the largest "ordinary" one; 4 images per
# request is what the exporter's default --max-batch allows; 2 000 characters is far more
# than a 77-token CLIP prompt reads, and bounds what one request makes the tokenizer do.
DEFAULT_MAX_STEPS = 100
DEFAULT_MAX_PIXELS = 1024 * 1024
DEFAULT_MAX_IMAGES = 4
DEFAULT_MAX_PROMPT_CHARS = 2000
# the init image's file, before it is decoded (the decoder has its own pixel guard)
DEFAULT_MAX_INIT_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ServeLimits:
    max_steps: int = DEFAULT_MAX_STEPS
    max_pixels: int = DEFAULT_MAX_PIXELS  # height x width of one image
    max_images: int = DEFAULT_MAX_IMAGES  # images in one request (prompts x --num-images)
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # each prompt and negative prompt
    max_init_bytes: int = DEFAULT_MAX_INIT_BYTES

    def to_params(self) -> dict:
        return {f"limit_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: dict) -> ServeLimits:
        """From the model config's ``parameters`` (string values)."""
        return cls(**{f.name: int(params[f"limit_{f.name}"]) for f in fields(cls)
                      if f"limit_{f.name}" in params})

    def check_early(self, prompts, negative_prompts, init_image: bytes | None) -> None:
        """What can be refused before the request is resolved (sizes of what was sent)."""
        for label, texts in (("prompt", prompts), ("negative prompt", negative_prompts or [])):
            for q in texts:
                if len(q) > self.max_prompt_chars:
                    raise UsageError(f"{label} of {len(q)} characters is over this server's "
                                     f"limit of {self.max_prompt_chars}")
        if init_image is not None and len(init_image) > self.max_init_bytes:
            raise UsageError(f"--init-image of {len(init_image)} bytes is over this server's "
                             f"limit of {self.max_init_bytes}")

    def check(self, req: GenerationRequest) -> None:
        if req.num_inference_steps > self.max_steps:
            raise UsageError(f"--steps {req.num_inference_steps} is over this server's limit "
                             f"of {self.max_steps}")
        if req.height * req.width > self.max_pixels:
            raise UsageError(f"{req.width}x{req.height} is over this server's limit of "
                             f"{self.max_pixels} pixels per image")
        if req.num_images > self.max_images:
            raise UsageError(f"{req.num_images} images in one request is over this server's "
                             f"limit of {self.max_images}")
