"""Tiled VAE decoding in numpy: the decoder runs on overlapping latent tiles, blended into one
picture, so a decode larger than memory allows for one call still fits.

The arithmetic is diffusers' ``AutoencoderKL.tiled_decode`` (and its ``blend_v``/``blend_h``),
step for step, so the same tile size and overlap give the same picture:

    tiling = VaeTiling(tile_size=512, overlap=0.25, scale=8)   # pixels, as enable_tiling()
    image = tiling.decode(z, decoder)                           # decoder: latent -> [-1, 1]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UsageError

# diffusers' AutoencoderKL.tile_overlap_factor after enable_tiling()
DEFAULT_OVERLAP = 0.25


@dataclass(frozen=True)
class VaeTiling:
    """``tile_size``: a tile's side in pixels (diffusers' ``tile_sample_min_size``);
    ``overlap``: the fraction of a tile shared with its neighbour (``tile_overlap_factor``);
    ``scale``: pixels per latent (the VAE's scale factor)."""

    tile_size: int
    overlap: float = DEFAULT_OVERLAP
    scale: int = 8

    @property
    def latent_tile(self) -> int:  # diffusers' tile_latent_min_size
        return self.tile_size // self.scale

    @property
    def stride(self) -> int:  # diffusers' overlap_size: latent step between tile starts
        return int(self.latent_tile * (1 - self.overlap))

    @property
    def blend_extent(self) -> int:  # pixels blended with the tile above / on the left
        return int(self.tile_size * self.overlap)

    @property
    def row_limit(self) -> int:  # pixels of each tile kept
        return self.tile_size - self.blend_extent

    def check(self) -> VaeTiling:
        if not 0.0 <= self.overlap < 1.0 or self.stride < 1:
            raise UsageError(f"VAE tile overlap {self.overlap} must be in [0, 1) and leave a "
                             f"step of at least one latent between {self.tile_size}-pixel tiles")
        return self

    def applies(self, latent_h: int, latent_w: int) -> bool:
        """diffusers tiles only a latent larger than one tile."""
        return latent_h > self.latent_tile or latent_w > self.latent_tile

    def tile_sides(self, n: int) -> list[int]:
        """Latent side of each tile along an axis of ``n`` latents (the last ones can be small)."""
        return [min(self.latent_tile, n - s) for s in range(0, n, self.stride)]

    def count(self, latent_h: int, latent_w: int) -> int:
        if not self.applies(latent_h, latent_w):
            return 1
        return len(self.tile_sides(latent_h)) * len(self.tile_sides(latent_w))

    def decode(self, z: np.ndarray, decoder) -> np.ndarray:
        """``decoder(latent tile) -> image tile`` run on each tile; the tiles blended as
        diffusers does. z: [N, C, h, w] float32 -> [N, 3, h*scale, w*scale]."""
        if not self.applies(*z.shape[2:]):
            return decoder(z)
        t, step = self.latent_tile, self.stride
        rows = [[decoder(np.ascontiguousarray(z[:, :, i:i + t, j:j + t]))
                 for j in range(0, z.shape[3], step)] for i in range(0, z.shape[2], step)]
        # in place, in diffusers' order: a tile is blended with its already blended
        # neighbours above and on the left, then cut to row_limit
        out_rows = []
        for i, row in enumerate(rows):
            kept = []
            for j, tile in enumerate(row):
                if i > 0:
                    _blend_v(rows[i - 1][j], tile, self.blend_extent)
                if j > 0:
                    _blend_h(row[j - 1], tile, self.blend_extent)
                kept.append(tile[:, :, :self.row_limit, :self.row_limit])
            out_rows.append(np.concatenate(kept, axis=3))
        return np.concatenate(out_rows, axis=2)

    def to_dict(self, latent_h: int, latent_w: int) -> dict:
        """What the PNG records: the settings and how many tiles this picture took."""
        return {"tile_size": self.tile_size, "overlap": self.overlap,
                "tiles": self.count(latent_h, latent_w)}


def _blend_v(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """b's top rows fade in from a's bottom rows (diffusers' blend_v, in place)."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = (a[:, :, -extent + y, :] * np.float32(1 - y / extent)
                         + b[:, :, y, :] * np.float32(y / extent))


def _blend_h(a: np.ndarray, b: np.ndarray, extent: int) -> None:
    """b's left columns fade in from a's right columns (diffusers' blend_h, in place)."""
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = (a[:, :, :, -extent + x] * np.float32(1 - x / extent)
                         + b[:, :, :, x] * np.float32(x / extent))


def fitting_tile_sizes(latent_h: int, latent_w: int, overlap: float, scale: int,
                       lo: int, hi: int) -> list[int]:
    """Tile sizes in pixels whose every tile of an h x w latent lies in the decoder's latent
    range lo..hi (for the error message that names one)."""
    out = []
    for t in range(lo, hi + 1):
        tiling = VaeTiling(t * scale, overlap, scale)
        if tiling.stride < 1:
            continue
        sides = tiling.tile_sides(latent_h) + tiling.tile_sides(latent_w)
        if not tiling.applies(latent_h, latent_w) or min(sides) >= lo:
            out.append(t * scale)
    return out
