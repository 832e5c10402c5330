"""The row type of ``ldm-run``'s option table (runtime/fields.py): one option, and where it
goes. Here, apart from the table, so a task plan (runtime/tasks/) can declare the options that
are its own. Pure python."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wire:
    """An input of the served pipeline: KServe v2 name, datatype and dims (-1: any number).
    FP64 for the floats: the PNG records them as they were given."""

    name: str
    datatype: str
    dims: tuple[int, ...] = (1,)


@dataclass(frozen=True)
class Field:
    """One ``ldm-run`` option."""

    option: str  # its click parameter name (``main``'s keyword)
    flag: str  # as the user types it, for messages
    keyword: str | None  # ``Pipeline.request``'s keyword; None: not part of the request
    wire: Wire | None = None  # the served input; None: a local run's only
    default: object = None  # ldm-run's default (not given)
    file: bool = False  # a path: sent as the file's bytes, its name in ``name_input``
    # each value names a file inside it (``--control NAME:IMAGE[:SCALE]``): the values travel
    # as given, the files' bytes in ``files_input``, one per value, in the values' order
    files_in_values: bool = False

    @property
    def many(self) -> bool:
        """Several values (the prompts): a list on the wire and in the request."""
        return self.wire is not None and self.wire.dims == (-1,)

    @property
    def name_input(self) -> str | None:
        """The input that carries a sent file's name."""
        return f"{self.wire.name}_name" if self.file else None

    @property
    def files_input(self) -> str | None:
        """The input that carries the files the values name (one per value)."""
        return f"{self.wire.name}_image" if self.files_in_values else None


def sent(option, flag, keyword, name, datatype, dims=(1,), default=None, file=False,
         files_in_values=False) -> Field:
    return Field(option, flag, keyword, Wire(name, datatype, dims), default, file,
                 files_in_values)
