"""What a LoRA on an INT8 U-Net cost: the same request drawn in FP32 with the same LoRAs, and
the 8-bit PSNR between the two pictures (``ldm-run --precision int8 --lora``)."""

from __future__ import annotations


def int8_lora_check(pipe, request, images) -> str | None:
    """For an INT8 U-Net with LoRAs: draw ``request`` again with the FP32 graphs and the same
    LoRAs and say how far apart the pictures are (8-bit PSNR); None when it does not apply."""
    from .compare import psnr
    from .pipeline import Pipeline

    lora_set = pipe._loras
    if lora_set is None or "unet" not in lora_set.components():
        return None
    opts = {k: v for k, v in pipe.options.items() if k != "precision"}
    ref = Pipeline(pipe.manifest, **opts, precision="fp32",
                   loras=[(e.file.path, e.scale) for e in lora_set.entries])
    try:
        want = ref(request=request).images
    finally:
        ref.close()
    return (f"LoRA on the INT8 U-Net (re-quantised, base activation ranges): 8-bit PSNR "
            f"{psnr(images, want):.1f} dB vs FP32 with the same LoRA, this request")
