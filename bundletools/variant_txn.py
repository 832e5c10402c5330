"""Adding variants to a bundle as one transaction: write the files, measure them through a
trial manifest that names them, then commit the manifest, or delete what was written.

    with VariantTransaction(bundle) as txn:
        txn.forget("int8", ["unet"])          # its files are about to be replaced
        files = txn.save(graph, bundle / "unet.int8.onnx")
        txn.put("unet", "int8", VariantRecord(file=..., files=[file_record(p, bundle) ...]))
        quality = measure(txn.manifest())     # the trial: the manifest on disk + the puts
        txn.commit(quality={"int8": quality}) # one atomic manifest write

Until ``commit`` the manifest on disk does not name the new files, so a bundle is never seen
with a variant that was not measured. Leaving the block without a commit (an exception, a
refusal) deletes every file ``save`` wrote and leaves the manifest as it was (less what
``forget`` dropped). FP16 (calibration/fp16.py), INT8 (calibration/int8.py) and the fused
forms (forms.py) all add their variants this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ldm_edge.runtime.bundle.manifest import Manifest
from ldm_edge.runtime.bundle.schema import (BundleManifest, QualityRecord, VariantRecord,
                                            edit_manifest, read_manifest_json)

from .save import save_graph


class VariantTransaction:
    """New variant files of the bundle at ``bundle`` and the manifest edit that records them:
    committed together, or the files deleted (see the module docstring)."""

    def __init__(self, bundle):
        self.root = Path(bundle)
        self.files: list[Path] = []  # written and not yet committed
        self.committed = False
        self._trial: BundleManifest | None = None
        self._puts: list[tuple[str, str, VariantRecord]] = []

    def __enter__(self) -> "VariantTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.committed:
            self.discard(self.files)
        return False  # an exception goes on up

    def forget(self, precision: str, components: list[str] | None = None) -> None:
        """Drop ``precision`` (its variants in ``components``, default all, and its quality
        record) from the manifest on disk, if it has one, before its files are replaced:
        a failure from here on leaves a bundle without it rather than one whose hashes do
        not match."""
        def stale(m: BundleManifest) -> list:
            names = m.components if components is None else components
            return [m.components[n] for n in names
                    if n in m.components and precision in m.components[n].variants]

        def drop(m: BundleManifest) -> None:
            for rec in stale(m):
                rec.variants.pop(precision, None)
            m.quality.pop(precision, None)

        if stale(read_manifest_json(self.root)):
            edit_manifest(self.root, drop)
            self._trial = None  # read again, without it

    def save(self, proto, dest: Path) -> list[Path]:
        """Write graph ``proto`` to ``dest`` (bundletools/save.py); its files are this
        transaction's until the commit."""
        written = save_graph(proto, Path(dest))
        self.files += written
        return written

    def discard(self, paths: list[Path]) -> None:
        """Delete ``paths`` (some of the files written), e.g. a candidate that failed its check."""
        for p in list(paths):
            p.unlink(missing_ok=True)
            if p in self.files:
                self.files.remove(p)

    @property
    def trial(self) -> BundleManifest:
        """The manifest on disk as read once, with this transaction's ``put`` variants."""
        if self._trial is None:
            self._trial = read_manifest_json(self.root)
            self._apply(self._trial)
        return self._trial

    def put(self, component: str, precision: str, variant: VariantRecord) -> None:
        """Record ``variant`` in the trial manifest now, and in the bundle's at the commit."""
        self._puts.append((component, precision, variant))
        self.trial.components[component].variants[precision] = variant

    def manifest(self) -> Manifest:
        """The trial manifest bound to the bundle folder: what a Pipeline measures."""
        return Manifest(self.root, self.trial)

    def commit(self, quality: dict[str, QualityRecord] | None = None,
               edit: Callable[[BundleManifest], None] | None = None) -> BundleManifest:
        """Write the manifest once, atomically: the puts, ``quality`` (precision -> record) and
        ``edit`` applied to the manifest on disk. Returns the manifest written."""
        def change(m: BundleManifest) -> None:
            self._apply(m)
            m.quality.update(quality or {})
            if edit is not None:
                edit(m)

        written = edit_manifest(self.root, change)
        self.committed = True
        self.files = []
        return written

    def _apply(self, m: BundleManifest) -> None:
        for component, precision, variant in self._puts:
            m.components[component].variants[precision] = variant
