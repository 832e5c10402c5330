"""``ldm-run``'s options in one table: where each one goes.

As stable-diffusion.cpp builds one request struct behind every door, every option of
``ldm-run`` has one row here, and each door reads the table:

* a row with a ``Wire`` is sent by ``ldm-run --server`` as that input of the served
  pipeline (``PIPELINE_INPUTS``, from which the repository writer makes its config.pbtxt),
  read back by the pipeline model (serve/pipeline_model.py) and given to
  ``Pipeline.request`` as ``keyword``, the keyword a local run gives it too;
* a row without one is local only (how this machine computes, or a local array such as
  ``--latents``): with ``--server`` it is refused unless left at its ``default``;
* ``CLIENT_OPTIONS`` are the client's own (where the PNGs go, what it prints).

The rows of a task's own options are declared by its plan (``TaskPlan.fields``). A file (the
init image, the mask) travels as its bytes, its name beside it in
``<wire>_name``: the server writes the bytes to a file of that name, so the PNG records the
same source and a refusal names the client's file. A ControlNet's image is named inside its
value (``NAME:IMAGE[:SCALE]``): the values travel as given, the images' bytes in
``control_image``, one per value. tests/unit/test_fields_option_walk.py
walks the click command: an option in no row and not a client option fails there.

Pure python: imported by the lean runtime and by the Triton Python model.
"""

from __future__ import annotations

from .errors import UsageError
from .field import Field, sent
from .tasks import TASK_FIELDS

FIELDS = (
    # sent to the server, under the name of its input
    sent("prompts", "--prompt", "prompt", "prompt", "BYTES", (-1,), default=()),
    sent("negative_prompt", "--negative-prompt", "negative_prompt", "negative_prompt",
          "BYTES", (-1,)),
    sent("task", "--task", "task", "task", "BYTES"),
    sent("steps", "--steps", "num_inference_steps", "steps", "INT32"),
    sent("guidance_scale", "--guidance-scale", "guidance_scale", "guidance_scale", "FP64"),
    sent("scheduler", "--scheduler", "scheduler", "scheduler", "BYTES"),
    sent("seed", "--seed", "seed", "seed", "UINT64"),
    sent("height", "--height", "height", "height", "INT32"),
    sent("width", "--width", "width", "width", "INT32"),
    sent("num_images", "--num-images", "num_images_per_prompt", "num_images", "INT32",
          default=1),
    sent("init_image", "--init-image", "init_image", "init_image", "BYTES", file=True),
    sent("strength", "--strength", "strength", "strength", "FP64"),
    sent("eta", "--eta", "eta", "eta", "FP64"),
    # SDXL's micro-conditioning (runtime/added_cond.py): pairs of pixels, the refiner's scores
    sent("original_size", "--original-size", "original_size", "original_size", "INT32", (2,)),
    sent("crop_top_left", "--crop-top-left", "crop_top_left", "crop_top_left", "INT32", (2,)),
    sent("target_size", "--target-size", "target_size", "target_size", "INT32", (2,)),
    sent("aesthetic_score", "--aesthetic-score", "aesthetic_score", "aesthetic_score", "FP64"),
    sent("negative_aesthetic_score", "--negative-aesthetic-score", "negative_aesthetic_score",
         "negative_aesthetic_score", "FP64"),
    # ControlNets (runtime/control.py): each NAME:IMAGE[:SCALE] as given, its image's bytes
    # beside it in control_image (the server writes them to files of the client's names)
    sent("control", "--control", "control", "control", "BYTES", (-1,), default=(),
         files_in_values=True),
    sent("control_start", "--control-start", "control_start", "control_start", "FP64"),
    sent("control_end", "--control-end", "control_end", "control_end", "FP64"),
    sent("guess_mode", "--guess-mode", "guess_mode", "guess_mode", "BOOL", default=False),
    sent("control_preprocess", "--control-preprocess", "control_preprocess",
         "control_preprocess", "BYTES"),
    # each task's own (the inpainting mask, the upscaler's noise level): its plan declares them
    *TASK_FIELDS,
    # a local run's only: refused with --server unless left at the default
    Field("latents_path", "--latents", "latents"),  # the array, loaded from the file
    # SDXL's ensemble of experts: a second bundle here, and where the base hands over to it
    Field("refiner", "--refiner", None),
    Field("denoising_end", "--denoising-end", "denoising_end"),
    Field("backend", "--backend", None, default="auto"),
    Field("device", "--device", None, default="auto"),
    Field("precision", "--precision", None, default="fp32"),
    Field("threads", "--threads", None, default=0),
    Field("ort_cache", "--ort-cache", None),
    Field("low_memory", "--low-memory", None, default=False),
    Field("vae_tiling", "--vae-tiling", None, default=False),
    Field("vae_tile_size", "--vae-tile-size", None),
    Field("vae", "--vae", None),  # a Pipeline option (recorded in the PNG), like --precision
    Field("preview", "--preview", None),  # decoded here, during the run
    Field("loras", "--lora", None, default=()),
    Field("no_verify", "--no-verify", None, default=False),
    Field("check_lora_int8", "--check-lora-int8", None, default=False),
)
# the client's own: option -> why it does not travel
CLIENT_OPTIONS = {
    "bundle": "the server draws with the bundle it serves (given with --server: refused)",
    "out": "where the client writes the PNGs",
    "quiet": "the client's own output",
    "debug": "the client's own tracebacks and logging",
    "server": "where the request goes",
    "list_schedulers": "prints the scheduler names and exits before any request",
}

SERVED = tuple(f for f in FIELDS if f.wire is not None)
LOCAL_ONLY = tuple(f for f in FIELDS if f.wire is None)
BY_OPTION = {f.option: f for f in FIELDS}


def pipeline_inputs() -> dict[str, tuple[str, list[int]]]:
    """The served pipeline's inputs: name -> (KServe datatype, dims), a file's name beside it."""
    out = {}
    for f in SERVED:
        out[f.wire.name] = (f.wire.datatype, list(f.wire.dims))
        if f.file:
            out[f.name_input] = ("BYTES", [1])
        if f.files_in_values:
            out[f.files_input] = ("BYTES", [-1])
    return out


def refuse_local_only(options: dict) -> None:
    """With --server: the first local-only option given (not at its default) is refused."""
    for f in LOCAL_ONLY:
        if options.get(f.option, f.default) != f.default:
            raise UsageError(f"{f.flag} is for a local run; the server decides how it "
                             f"computes (drop {f.flag} or --server)")


def request_keywords(options: dict, fields=FIELDS) -> dict:
    """``Pipeline.request``'s keywords from option values by option name (a missing one:
    its default). A row of several values (the prompts) gives a list, or None for none."""
    out = {}
    for f in fields:
        if f.keyword is None:
            continue
        value = options.get(f.option, f.default)
        if f.many and value is not None:
            value = [value] if isinstance(value, str) else list(value) or None
        out[f.keyword] = value
    return out
