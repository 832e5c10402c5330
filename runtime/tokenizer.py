"""Prompt tokenizer from the bundle's ``tokenizer.json`` (CLIP BPE or BERT WordPiece).

Padding and truncation follow the manifest, not whatever the file carries, so the ids
are exactly what the text encoder was exported for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError


@dataclass
class Tokens:
    input_ids: np.ndarray       # int64 [n, max_length]
    attention_mask: np.ndarray  # int64 [n, max_length]
    dropped: list[int]          # tokens cut from each prompt by truncation


class PromptTokenizer:
    def __init__(self, path: str | Path, max_length: int, pad_id: int, pad_token: str):
        from tokenizers import Tokenizer

        try:
            self._full = Tokenizer.from_file(str(path))
        except Exception as e:
            raise BundleError(f"tokenizer {Path(path).name} cannot be read ({e}); re-export the bundle")
        self._full.no_padding()
        self._full.no_truncation()
        self._fixed = Tokenizer.from_str(self._full.to_str())
        self._fixed.enable_truncation(max_length=max_length)
        self._fixed.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
        self.max_length = max_length

    @classmethod
    def from_manifest(cls, manifest, key: str = "tokenizer") -> "PromptTokenizer":
        """The tokenizer of record ``key`` ("tokenizer", or SDXL's "tokenizer_2")."""
        t = getattr(manifest.schema, key)
        return cls(manifest.tokenizer_file(key), t.max_length, t.pad_id, t.pad_token)

    def __call__(self, prompts: list[str]) -> Tokens:
        full = self._full.encode_batch(list(prompts))
        fixed = self._fixed.encode_batch(list(prompts))
        dropped = [max(0, len(f.ids) - self.max_length) for f in full]
        ids = np.array([e.ids for e in fixed], dtype=np.int64)
        mask = np.array([e.attention_mask for e in fixed], dtype=np.int64)
        return Tokens(ids, mask, dropped)
