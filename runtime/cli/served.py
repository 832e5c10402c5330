"""``ldm-run --server URL``: the same options, run by a served pipeline, the same pictures
(byte for byte where the local run pre-packs as the server does: docs/serving.md)."""

from __future__ import annotations

import time

import click

from ..errors import UsageError
from ..fields import refuse_local_only
from ..image import save_png
from ..remote import generate, served_inputs


def run_served(options: dict, paths, t_proc: float) -> None:
    """``options``: ldm-run's values by option name; each goes where runtime/fields.py says."""
    refuse_local_only(options)
    if options["bundle"] is not None:
        raise UsageError("--server draws with the bundle the server serves; drop BUNDLE")
    server = options["server"]
    result = generate(server, served_inputs(options))
    if result.images.shape[0] != len(paths):
        raise UsageError(f"the server returned {result.images.shape[0]} images, "
                         f"{len(paths)} were asked for")
    for i, path in enumerate(paths):
        save_png(result.images[i], path, result.metadata(i))
    for path in paths:
        click.echo(str(path))
    if not options["quiet"]:
        click.echo(f"done in {time.perf_counter() - t_proc:.2f} s (served by {server})", err=True)
