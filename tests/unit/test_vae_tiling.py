"""VAE tiling arithmetic (numpy only): tile sides, counts, the check and the blend."""

from __future__ import annotations

import numpy as np
import pytest

from ldm_edge.runtime import validate
from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.vae_tiling import VaeTiling, fitting_tile_sizes


def test_diffusers_defaults_for_sd15():
    """SD1.5 with enable_tiling(): 512-pixel tiles, a tile every 48 latents, 128-pixel
    blends, 384 pixels kept per tile."""
    t = VaeTiling(512)
    assert (t.latent_tile, t.stride, t.blend_extent, t.row_limit) == (64, 48, 128, 384)
    assert t.tile_sides(128) == [64, 64, 32]
    assert t.count(128, 96) == 3 * 2 and t.count(64, 64) == 1


def test_one_tile_is_the_plain_decode():
    z = np.ones((1, 4, 8, 8), np.float32)
    assert VaeTiling(64).decode(z, lambda x: x * 2) is not None
    assert np.array_equal(VaeTiling(64).decode(z, lambda x: x * 2), z * 2)


def test_constant_tiles_blend_to_the_same_constant():
    """Blending equal tiles changes nothing; the output covers the whole picture."""
    z = np.zeros((1, 4, 20, 13), np.float32)
    out = VaeTiling(64).decode(z, lambda x: np.full((1, 3, x.shape[2] * 8, x.shape[3] * 8),
                                                    0.5, np.float32))
    assert out.shape == (1, 3, 160, 104) and np.all(out == 0.5)


def test_fitting_sizes_and_checks():
    # 128 latents, decoder range 16..64: 512 fits (sides 64, 64, 32), 136 leaves 9 < 16
    sizes = fitting_tile_sizes(128, 128, 0.25, 8, 16, 64)
    assert 512 in sizes and 136 not in sizes
    with pytest.raises(UsageError, match="positive multiple of 8"):
        validate.vae_tile_size(100, 8, 32, 1024)
    with pytest.raises(UsageError, match="outside the VAE decoder's exported range 32..1024"):
        validate.vae_tile_size(2048, 8, 32, 1024)
    with pytest.raises(UsageError, match="overlap"):
        VaeTiling(64, overlap=1.0).check()
