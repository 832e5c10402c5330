"""Fixtures shared by the cli tier."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def bundle(tiny_bundles, tmp_path):
    """A private copy of the tiny SD1 bundle, for commands that add to it."""
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundles["sd1"], b)
    return b
