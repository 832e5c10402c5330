"""End-to-end quality of a precision variant: the same prompts and seeds through the
FP32 and the variant pipelines, compared as 8-bit images. ``bundle`` may be a folder or a
``Manifest`` not yet written to disk, so a new variant is measured before it is recorded."""

from __future__ import annotations

from ldm_edge.runtime.compare import psnr
from ldm_edge.runtime.pipeline import Pipeline


def end_to_end_psnr(bundle, precision: str, prompts: list[str], steps: int = 10,
                    seed: int = 0) -> dict:
    ref = Pipeline(bundle, precision="fp32")
    var = Pipeline(bundle, precision=precision)
    values = []
    for i, prompt in enumerate(prompts):
        a = ref(prompt, num_inference_steps=steps, seed=seed + i).images
        b = var(prompt, num_inference_steps=steps, seed=seed + i).images
        values.append(psnr(b, a))
    return {"psnr_db": min(values), "per_prompt_db": values, "prompts": prompts,
            "steps": steps, "seed": seed, "reference": "fp32 bundle, same seeds"}
