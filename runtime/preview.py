"""``ldm-run --preview N``: every N steps the loop's latents, decoded with the tiny VAE
(TAESD), written over one preview PNG beside the output, so a long run shows its picture
forming. The latents as the scheduler leaves them (what diffusers' step callbacks get), not
a denoised estimate: early previews show the noise still in them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UsageError
from .image import save_png


def preview_path(out) -> Path:
    """Where the preview of output ``out`` goes: ``OUT.png`` -> ``OUT.preview.png``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.preview{out.suffix}")


class Preview:
    """A step hook (``Pipeline.add_step_hook``): after every ``every``-th step, the images
    decoded with the tiny decoder, side by side, written atomically to ``path`` (each write
    replaces the last). Refused in one line when the bundle has no tiny decoder."""

    def __init__(self, pipe, path, every: int):
        if every < 1:
            raise UsageError(f"--preview {every} must be a positive number of steps")
        if not pipe.manifest.has("vae_decoder_tiny"):
            raise UsageError("--preview decodes with the tiny VAE (TAESD), which this bundle "
                             "has not; export it with `ldm-export onnx SOURCE --tiny-vae DIR` "
                             "or drop --preview")
        self.pipe, self.path, self.every = pipe, Path(path), int(every)
        self.written = 0

    def __call__(self, done: int, total: int, latents: np.ndarray) -> None:
        if done % self.every:
            return
        images = self.pipe.decode(latents, vae="tiny")
        save_png(np.concatenate(list(images), axis=1), self.path,
                 {"preview_step": done, "steps": total})
        self.written += 1
