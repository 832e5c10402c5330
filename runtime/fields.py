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

A file (the init image, the mask) travels as its bytes, its name beside it in
``<wire>_name``: the server writes the bytes to a file of that name, so the PNG records the
same source and a refusal names the client's file. tests/unit/test_fields_option_walk.py
walks the click command: an option in no row and not a client option fails there.

Pure python: imported by the lean runtime and by the Triton Python model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Wire:
    """An input of the served pipeline: KServe v2 name, datatype and dims (-1: any number).
    FP64 for the floats: the PNG records them as they were given."""

    name: str
    datatype: str
    dims: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Field:
    """One ``ldm-run`` option."""

    option: str  # its click parameter name (``main``'s keyword)
    flag: str  # as the user types it, for messages
    keyword: str | None  # ``Pipeline.request``'s keyword; None: not part of the request
    wire: Wire | None = None  # the served input; None: a local run's only
    default: object = None  # ldm-run's default (not given)
    file: bool = False  # a path: sent as the file's bytes, its name in ``name_input``

    @property
    def many(self) -> bool:
        """Several values (the prompts): a list on the wire and in the request."""
        return self.wire is not None and self.wire.dims == (-1,)

    @property
    def name_input(self) -> str | None:
        """The input that carries a sent file's name."""
        return f"{self.wire.name}_name" if self.file else None


def _sent(option, flag, keyword, name, datatype, dims=(1,), default=None, file=False) -> Field:
    return Field(option, flag, keyword, Wire(name, datatype, dims), default, file)


FIELDS = (
    # sent to the server, under the name of its input
    _sent("prompts", "--prompt", "prompt", "prompt", "BYTES", (-1,), default=()),
    _sent("negative_prompt", "--negative-prompt", "negative_prompt", "negative_prompt",
          "BYTES", (-1,)),
    _sent("task", "--task", "task", "task", "BYTES"),
    _sent("steps", "--steps", "num_inference_steps", "steps", "INT32"),
    _sent("guidance_scale", "--guidance-scale", "guidance_scale", "guidance_scale", "FP64"),
    _sent("scheduler", "--scheduler", "scheduler", "scheduler", "BYTES"),
    _sent("seed", "--seed", "seed", "seed", "UINT64"),
    _sent("height", "--height", "height", "height", "INT32"),
    _sent("width", "--width", "width", "width", "INT32"),
    _sent("num_images", "--num-images", "num_images_per_prompt", "num_images", "INT32",
          default=1),
    _sent("init_image", "--init-image", "init_image", "init_image", "BYTES", file=True),
    _sent("strength", "--strength", "strength", "strength", "FP64"),
    _sent("mask", "--mask", "mask", "mask", "BYTES", file=True),
    _sent("noise_level", "--noise-level", "noise_level", "noise_level", "INT32"),
    # a local run's only: refused with --server unless left at the default
    Field("latents_path", "--latents", "latents"),  # the array, loaded from the file
    Field("backend", "--backend", None, default="auto"),
    Field("device", "--device", None, default="auto"),
    Field("precision", "--precision", None, default="fp32"),
    Field("threads", "--threads", None, default=0),
    Field("ort_cache", "--ort-cache", None),
    Field("low_memory", "--low-memory", None, default=False),
    Field("vae_tiling", "--vae-tiling", None, default=False),
    Field("vae_tile_size", "--vae-tile-size", None),
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
