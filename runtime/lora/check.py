"""What a LoRA on an INT8 U-Net cost (``ldm-run --precision int8 --lora F --check-lora-int8``):
the same request drawn again with the FP32 graphs and the same LoRAs, and the 8-bit PSNR
between the two pictures. Asked for, never implied: it takes as long as the run itself."""

from __future__ import annotations

from ..errors import UsageError


def refuse_unless_int8_lora(pipe) -> None:
    """--check-lora-int8 on a run it does not apply to: one line that says what is missing."""
    precision = pipe.options["precision"]
    if precision != "int8":
        raise UsageError(f"--check-lora-int8 measures a LoRA on the INT8 U-Net; this run is "
                         f"{precision}: add --precision int8, or drop --check-lora-int8")
    lora_set = pipe.loras
    if lora_set is None or "unet" not in lora_set.components():
        raise UsageError("--check-lora-int8 measures a LoRA on the INT8 U-Net; no --lora here "
                         "adapts the U-Net: add one, or drop --check-lora-int8")


def int8_lora_check(pipe, request, images, options: dict) -> str:
    """Draw ``request`` again with ``Pipeline(**options)`` (the run's own, with the same
    LoRAs) at FP32 and say how far apart the pictures are (8-bit PSNR)."""
    from ..compare import psnr
    from ..pipeline import Pipeline

    refuse_unless_int8_lora(pipe)
    ref = Pipeline(pipe.manifest, **{**options, "precision": "fp32"})
    try:
        want = ref(request=request).images
    finally:
        ref.close()
    return (f"LoRA on the INT8 U-Net (re-quantised, base activation ranges): 8-bit PSNR "
            f"{psnr(images, want):.1f} dB vs FP32 with the same LoRA, this request")
