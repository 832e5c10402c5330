"""What both console scripts do with an error: one line on stderr and an exit code,
never a traceback (unless --debug)."""

from __future__ import annotations

import sys
from typing import Callable

import click

from ..errors import LdmEdgeError


def fail(prog: str, msg: str, code: int = 1):
    click.echo(f"{prog}: error: {msg}", err=True)
    sys.exit(code)


def invoke_reporting(prog: str, invoke: Callable, ctx, *, debug: Callable[[], bool],
                     interrupted: str = "interrupted"):
    """Run click's ``invoke(ctx)``, turning every error into one line and an exit code."""
    try:
        return invoke(ctx)
    except LdmEdgeError as e:
        fail(prog, str(e), e.exit_code)
    except KeyboardInterrupt:
        fail(prog, interrupted, 130)
    except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
        raise
    except MemoryError:
        fail(prog, "out of memory; use a smaller size or fewer images", 1)
    except Exception as e:  # last resort: still one line
        if debug():
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        fail(prog, f"unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback)", 1)
