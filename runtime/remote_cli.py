"""``ldm-run --server URL``: the same options, run by a served pipeline, the same PNGs."""

from __future__ import annotations

import time

import click

from .errors import UsageError
from .image import save_png
from .remote import check_local_only, generate, served_inputs


def run_served(server: str, bundle, paths, options: dict, quiet: bool, t_proc: float) -> None:
    check_local_only(options)
    if bundle is not None:
        raise UsageError("--server draws with the bundle the server serves; drop BUNDLE")
    inputs = served_inputs(
        prompts=options["prompts"], negative_prompt=options["negative_prompt"],
        steps=options["steps"], guidance_scale=options["guidance_scale"],
        scheduler=options["scheduler"], seed=options["seed"], height=options["height"],
        width=options["width"], num_images=options["num_images"],
        init_image=options["init_image"], strength=options["strength"])
    result = generate(server, inputs)
    if result.images.shape[0] != len(paths):
        raise UsageError(f"the server returned {result.images.shape[0]} images, "
                         f"{len(paths)} were asked for")
    for i, path in enumerate(paths):
        save_png(result.images[i], path, result.metadata(i))
    for path in paths:
        click.echo(str(path))
    if not quiet:
        click.echo(f"done in {time.perf_counter() - t_proc:.2f} s (served by {server})", err=True)
