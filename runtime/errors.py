"""Errors a user can act on. CLIs print them as one line and exit non-zero."""


class LdmEdgeError(Exception):
    """Base class: the message says what is wrong and what to do."""

    exit_code = 1


class BundleError(LdmEdgeError):
    """The bundle is missing, damaged or does not fit this machine."""

    exit_code = 3


class UsageError(LdmEdgeError):
    """Arguments that cannot work (size, steps, shapes...)."""

    exit_code = 2


class ExportError(LdmEdgeError):
    """Making or rewriting a bundle failed (export, precision variants, import); nothing
    was written, or the bundle was left as it was."""

    exit_code = 1


class NumericsError(LdmEdgeError):
    """A component produced NaN or Inf."""

    exit_code = 4


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut to ``limit`` characters, or the
    exception's type name when the message is empty (for one-line error reports)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
