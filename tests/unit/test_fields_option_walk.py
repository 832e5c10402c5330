"""Every ``ldm-run`` option, walked from the click command itself: with ``--server`` it is
sent to the server (setting it changes what goes on the wire), refused with one line that
names it (a local-only option), or it is one of the field table's client options. An
option in none of these (a new one nobody routed) fails here."""

from __future__ import annotations

import click
import numpy as np
from click.testing import CliRunner
from PIL import Image

from ldm_edge.runtime.cli import run as cli
from ldm_edge.runtime.cli import served as remote_cli
from ldm_edge.runtime.errors import UsageError
from ldm_edge.runtime.fields import CLIENT_OPTIONS

SERVER = "http://127.0.0.1:9"  # never reached: generate is replaced


def _non_default(param: click.Parameter, png: str) -> list[str]:
    """Arguments that set ``param`` to something other than its default."""
    flag = param.opts[0]
    if getattr(param, "is_flag", False):
        return [flag]  # flags default to off (--ort-cache/--no-ort-cache: to unset)
    if isinstance(param.type, click.Choice):
        return [flag, next(c for c in param.type.choices if c != param.default)]
    if isinstance(param.type, click.Tuple):  # a pair (SDXL's sizes)
        return [flag] + ["3"] * param.nargs
    if isinstance(param.type, click.types.IntParamType):
        return [flag, "3"]
    if isinstance(param.type, click.types.FloatParamType):
        return [flag, "0.5"]
    if (param.metavar or "").startswith("NAME:IMAGE"):  # --control NAME:IMAGE[:SCALE]
        return [flag, f"edges:{png}"]
    return [flag, png]  # text or a path: an existing file serves both


def _served(args: list[str], monkeypatch) -> tuple[dict | None, str]:
    """(the inputs ldm-run --server sends, its stderr) for ``args``."""
    sent = []

    def fake_generate(server, inputs, timeout=None):
        sent.append({k: [v if isinstance(v, bytes) else str(v) for v in np.asarray(
            v, dtype=object).reshape(-1)] for k, v in inputs.items()})
        raise UsageError("sent")
    monkeypatch.setattr(remote_cli, "generate", fake_generate)
    r = CliRunner().invoke(cli.main, ["--server", SERVER, *args])
    return (sent[0] if sent else None), r.output


def test_every_option_is_sent_refused_or_a_client_option(monkeypatch, tmp_path):
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    baseline, _ = _served([], monkeypatch)
    assert baseline is not None
    dropped, unrouted = [], []
    for param in cli.main.params:
        if param.name in CLIENT_OPTIONS:
            continue
        args = _non_default(param, str(png))
        sent, out = _served(args, monkeypatch)
        if sent is None:
            if "is for a local run" not in out or not any(o in out for o in param.opts):
                unrouted.append(f"{param.name}: {out.strip()}")
        elif sent == baseline:
            dropped.append(param.name)
    assert not dropped, f"ldm-run --server silently drops: {', '.join(dropped)}"
    assert not unrouted, f"neither sent nor refused as local-only: {unrouted}"


def test_the_client_options_are_ldm_run_options():
    assert set(CLIENT_OPTIONS) <= {p.name for p in cli.main.params}
