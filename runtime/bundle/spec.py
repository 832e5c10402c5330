"""One description per component: names, dtypes, symbolic shapes, shape ranges.

Export reads it to trace and check, the manifest records it, the runtime reads it
back from the manifest (never from this module's defaults) to feed the graphs.
Pure python: imported by both halves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "vae_decoder_tiny",
              "vae_encoder_tiny", "text_encoder_2")
# A tiny VAE (TAESD, diffusers' AutoencoderTiny) works on the same latents as the model's
# VAE, so it has graphs of its own beside the VAE's: each VAE component -> its tiny one.
TINY_VAE = {"vae_decoder": "vae_decoder_tiny", "vae_encoder": "vae_encoder_tiny"}

# The timestep input: float32 of shape [batch]. Float because Euler-family schedulers
# produce fractional timesteps; [batch] because that is what every exporter traces
# without broadcasting tricks. Recorded per bundle; the runtime casts to what the
# manifest says (an imported Optimum bundle declares int64).
TIMESTEP_DTYPE = "float32"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", ...
    shape: tuple  # ints for fixed dims, strings for symbolic ones

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class ComponentSpec:
    """What one exported network looks like from the outside."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # symbolic dim -> [min, max] in the units of that dim (latent or pixel rows, tokens, ...)
    ranges: dict = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no input {name!r}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict:
        """torch.onnx.export's dynamic_axes: every string dim of every tensor."""
        axes = {}
        for t in self.inputs + self.outputs:
            dims = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if dims:
                axes[t.name] = dims
        return axes

    def to_json(self) -> dict:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "ranges": {k: list(v) for k, v in self.ranges.items()},
        }

    @classmethod
    def from_json(cls, name: str, d: dict) -> "ComponentSpec":
        return cls(
            name,
            tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            {k: tuple(v) for k, v in d.get("ranges", {}).items()},
        )


# dimensions only some models have (left out of the manifest when absent)
OPTIONAL_DIMS = ("time_cond_proj_dim", "text_hidden_size_2", "text_embeds_dim", "time_ids_dim")


@dataclass(frozen=True)
class ModelDims:
    """The few numbers of a model that fix its components' interfaces."""

    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    text_hidden_size: int
    text_max_length: int
    use_attention_mask: bool  # BERT-style text encoders take one, CLIP does not
    min_size: int = 32  # pixels
    max_size: int = 1024  # pixels
    max_batch: int = 4  # images per call; the U-Net sees twice that under guidance
    # an LCM-distilled U-Net's guidance embedding width (its `timestep_cond` input), or None
    time_cond_proj_dim: int | None = None
    # SDXL (a U-Net with added text/time conditioning): the second text encoder's width, its
    # pooled projection's (the U-Net's `text_embeds`) and the number of `time_ids` (6: original
    # size, crop, target size; 5 for the refiner: the aesthetic score for the target size).
    # text_hidden_size is then the first encoder's, 0 where there is none (the refiner).
    text_hidden_size_2: int | None = None
    text_embeds_dim: int | None = None
    time_ids_dim: int | None = None

    @property
    def cross_attention_dim(self) -> int:
        """The U-Net's encoder_hidden_states width: both encoders' hidden states joined."""
        return self.text_hidden_size + (self.text_hidden_size_2 or 0)

    def asdict(self) -> dict:
        """As the manifest records it: an optional dimension the model lacks (None) is left
        out, so a bundle without it reads and writes as before it existed."""
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in OPTIONAL_DIMS}


def describe(dims: ModelDims) -> dict[str, ComponentSpec]:
    """The component descriptions for a model with these dimensions."""
    f, c = dims.vae_scale_factor, dims.latent_channels
    lat = (dims.min_size // f, dims.max_size // f)
    pix = (dims.min_size, dims.max_size)
    text_in = [TensorSpec("input_ids", "int64", ("batch", dims.text_max_length))]
    if dims.use_attention_mask:
        text_in.append(TensorSpec("attention_mask", "int64", ("batch", dims.text_max_length)))
    batch = (1, dims.max_batch)
    unet_in = [TensorSpec("sample", "float32", ("batch", c, "latent_height", "latent_width")),
               TensorSpec("timestep", TIMESTEP_DTYPE, ("batch",)),
               TensorSpec("encoder_hidden_states", "float32",
                          ("batch", dims.text_max_length, dims.text_hidden_size))]
    if dims.time_cond_proj_dim:  # LCM: the guidance scale's embedding (runtime/conditioning.py)
        unet_in.append(TensorSpec("timestep_cond", "float32", ("batch", dims.time_cond_proj_dim)))
    specs = {
        "text_encoder": ComponentSpec(
            "text_encoder",
            tuple(text_in),
            (TensorSpec("last_hidden_state", "float32",
                        ("batch", dims.text_max_length, dims.text_hidden_size)),),
            {"batch": (1, 2 * dims.max_batch)},
        ),
        "unet": ComponentSpec(
            "unet",
            tuple(unet_in),
            (TensorSpec("model_output", "float32", ("batch", c, "latent_height", "latent_width")),),
            {"batch": (1, 2 * dims.max_batch), "latent_height": lat, "latent_width": lat},
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent", "float32", ("batch", c, "latent_height", "latent_width")),),
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
            {"batch": batch, "latent_height": lat, "latent_width": lat},
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
            # mean and log-variance stacked on channels, as diffusers' DiagonalGaussian reads them
            (TensorSpec("latent_parameters", "float32",
                        ("batch", 2 * c, "latent_height", "latent_width")),),
            {"batch": batch, "height": pix, "width": pix},
        ),
        # TAESD's decoder: latents divided by its own scaling factor (manifest tiny_vae) ->
        # image in [-1, 1] (unclipped), as the VAE decoder
        "vae_decoder_tiny": ComponentSpec(
            "vae_decoder_tiny",
            (TensorSpec("latent", "float32", ("batch", c, "latent_height", "latent_width")),),
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
            {"batch": batch, "latent_height": lat, "latent_width": lat},
        ),
        # TAESD's encoder: the latent itself (no distribution to sample), before scaling
        "vae_encoder_tiny": ComponentSpec(
            "vae_encoder_tiny",
            (TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
            (TensorSpec("latent", "float32", ("batch", c, "latent_height", "latent_width")),),
            {"batch": batch, "height": pix, "width": pix},
        ),
    }
    return added_conditioning(dims, specs) if dims.text_hidden_size_2 else specs


def added_conditioning(dims: ModelDims, specs: dict[str, ComponentSpec]
                       ) -> dict[str, ComponentSpec]:
    """SDXL's interfaces: each text encoder gives its penultimate hidden state (SDXL's pipelines
    take ``hidden_states[-2]``), the second also its projected pooled output (``text_embeds``);
    the U-Net takes both hidden states joined, ``text_embeds`` and ``time_ids``. No first
    encoder where the model has none (the refiner: ``text_hidden_size`` 0)."""
    L = dims.text_max_length
    ids = (TensorSpec("input_ids", "int64", ("batch", L)),)
    hidden = "penultimate_hidden_state"
    out = dict(specs)
    text = specs["text_encoder"]
    out.pop("text_encoder")
    if dims.text_hidden_size:
        out["text_encoder"] = ComponentSpec(
            "text_encoder", ids,
            (TensorSpec(hidden, "float32", ("batch", L, dims.text_hidden_size)),), text.ranges)
    out["text_encoder_2"] = ComponentSpec(
        "text_encoder_2", ids,
        (TensorSpec(hidden, "float32", ("batch", L, dims.text_hidden_size_2)),
         TensorSpec("text_embeds", "float32", ("batch", dims.text_embeds_dim))), text.ranges)
    unet = specs["unet"]
    ehs = TensorSpec("encoder_hidden_states", "float32", ("batch", L, dims.cross_attention_dim))
    inputs = tuple(ehs if t.name == "encoder_hidden_states" else t for t in unet.inputs)
    inputs += (TensorSpec("text_embeds", "float32", ("batch", dims.text_embeds_dim)),
               TensorSpec("time_ids", "float32", ("batch", dims.time_ids_dim)))
    out["unet"] = ComponentSpec("unet", inputs, unet.outputs, unet.ranges)
    return out
