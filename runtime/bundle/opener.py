"""Open a bundle: the one way in, for our bundles and for Hugging Face Optimum folders.

Both come back as the same :class:`Manifest` (a typed ``BundleManifest`` bound to its
folder); an Optimum folder's is built by runtime/bundle/optimum.py from the folder's own files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BundleError
from .manifest import Manifest
from .optimum import is_optimum_folder, manifest_from_optimum
from .schema import MANIFEST_NAME, read_manifest_json


def open_bundle(path: str | os.PathLike, verify: bool = True) -> Manifest:
    """The manifest of the bundle at ``path``, its files checked (``verify``: their sha256
    too). A folder without manifest.json laid out as Optimum writes one is read as it is."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle {str(root)!r} not found: pass the folder that "
                          f"`ldm-export onnx` wrote")
    if not (root / MANIFEST_NAME).is_file():
        if is_optimum_folder(root):  # run a Hugging Face Optimum export as it is
            m = Manifest(root, manifest_from_optimum(root, hashes=verify))
            m.validate(verify=False)  # its hashes were just taken from these very files
            return m
        raise BundleError(f"{str(root)!r} has no {MANIFEST_NAME}: not a bundle, or an "
                          f"export that did not finish; rerun `ldm-export onnx`")
    try:
        m = Manifest(root, read_manifest_json(root))
        m.validate(verify=verify)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        # a structural surprise the explicit checks did not name
        raise BundleError(f"manifest.json is malformed ({type(e).__name__}: {e}); "
                          f"re-export the bundle")
    return m
