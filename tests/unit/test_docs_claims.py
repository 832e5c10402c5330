"""What README.md and docs/*.md tell a reader to type, and where they send them, exists.

* Every ``ldm-export``, ``ldm-run`` and ``ldm-serve`` command quoted in a shell code block or
  an inline code span uses only subcommands, flags and choice values that the click commands
  themselves declare (read from the objects pyproject's [project.scripts] names, not from a
  copy): a renamed or dropped flag fails here with the file, the line and the flag.
* Every relative link (and image) leads to a file that is there; an anchor (``#...``) into a
  Markdown file must name one of its headings, slugged as GitHub does.

Lean tier: the three CLI modules import without torch, diffusers, transformers or onnx
(``tests/unit/test_lean_imports.py`` holds ``ldm_edge.runtime.cli.run`` and ``ldm_edge.export.cli``
to it; ``ldm_edge.serve.cli`` is imported by the latter).
"""

from __future__ import annotations

import functools
import re
import shlex
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

from ldm_edge.export.cli import main as export_main
from ldm_edge.runtime.cli.run import main as run_main
from ldm_edge.serve.cli import serve_main

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {"ldm-export": export_main, "ldm-run": run_main, "ldm-serve": serve_main}
# fenced blocks read as shell; any other language (python, json, ...) is not a command line
SHELL_FENCES = {"", "sh", "bash", "shell", "console", "text"}
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)  # within one text block: may wrap
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SEPARATORS = {"|", "||", "&&", ";", "&"}
# words that stand in front of a command on the same line: `env X=1 ldm-run ...`, `$ ldm-run`
PREFIXES = {"$", "env", "time", "exec", "sudo"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Snippet:
    """A command line (continuations joined), a code span or a paragraph, and where it starts."""

    path: Path
    line: int
    text: str

    def where(self, offset: int = 0) -> str:
        shown = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{shown}:{self.line + offset}"


def _drop_comment(line: str) -> str:
    """A shell line without its ``# comment`` (a ``#`` inside quotes stays)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def read_page(path: Path) -> tuple[list[Snippet], list[Snippet], list[str]]:
    """(shell command lines of fenced blocks, text blocks outside them, headings).

    A text block is a paragraph (a code span or a link may wrap onto its next line) or one table
    row. In a fenced block a command goes on over a line ending in a backslash, and over
    indented lines under it (usage lines wrapped for width); fences of another language
    (python, json) hold no commands."""
    commands: list[Snippet] = []
    blocks: list[Snippet] = []
    headings: list[str] = []
    fence, shell, command, start, para, para_start = None, False, None, 0, [], 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines() + [""], 1):
        opened = FENCE.match(line)
        row = line.lstrip().startswith("|")
        if fence is None:
            if para and (not line.strip() or opened or row):
                blocks.append(Snippet(path, para_start, "\n".join(para)))
                para = []
            if opened:
                fence, command = opened.group(1), None
                shell = opened.group(2).lower() in SHELL_FENCES
            elif row:
                blocks.append(Snippet(path, number, line))
            elif re.match(r"^#{1,6}\s", line):
                headings.append(re.sub(r"^#{1,6}\s+|\s+#*\s*$", "", line))
            elif line.strip():
                para_start = para_start if para else number
                para.append(line)
            continue
        closed = line.strip().startswith(fence) and not line.strip().strip(fence[0])
        goes_on = command is not None and (command.endswith("\\") or line[:1].isspace())
        text = _drop_comment(line).rstrip()
        if command is not None and (closed or not goes_on or not text.strip()):
            commands.append(Snippet(path, start, command))
            command = None
        if closed:
            fence = None
        elif shell and text.strip():
            if command is None:
                command, start = text, number
            else:
                command = command.rstrip("\\") + " " + text.strip()
    return commands, blocks, headings


def code_snippets(path: Path) -> list[Snippet]:
    """Every place a command may be quoted: fenced shell lines and inline code spans."""
    commands, blocks, _ = read_page(path)
    spans = [Snippet(path, b.line + b.text.count("\n", 0, m.start()),
                     m.group(2).replace("\n", " "))
             for b in blocks for m in INLINE_CODE.finditer(b.text)]
    return commands + spans


def command_lines(snippet: Snippet) -> list[tuple[str, list[str]]]:
    """(command, its arguments) for every ldm-* command the snippet runs."""
    try:
        tokens = shlex.split(snippet.text, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain words will do
        tokens = snippet.text.split()
    found, segment = [], []
    for token in tokens + [";"]:
        if token not in SEPARATORS:
            segment.append(token)
            continue
        words = [w for w in segment if w not in PREFIXES and not re.match(r"^\w+=", w)]
        if words and Path(words[0]).name in COMMANDS:
            found.append((Path(words[0]).name, words[1:]))
        segment = []
    return found


def _placeholder(value: str) -> bool:
    """BUNDLE, P, ..., FILE:SCALE: words the reader replaces."""
    return "..." in value or value.upper() == value and any(c.isalpha() for c in value)


def _clean(token: str) -> str:
    """A usage line's brackets and a sentence's trailing comma are not part of the token."""
    return token.lstrip("[(").rstrip("]),;")


def _options(command: click.Command, ctx: click.Context) -> dict[str, click.Parameter]:
    return {name: p for p in command.get_params(ctx) if isinstance(p, click.Option)
            for name in (*p.opts, *p.secondary_opts)}


def _is_option(token: str) -> bool:
    return re.match(r"^--?[A-Za-z]", token) is not None


def problems(name: str, args: list[str]) -> list[str]:
    """What in ``name args`` the click commands do not know: subcommands, flags, choices."""
    command: click.Command = COMMANDS[name]
    ctx = click.Context(command, info_name=name)
    shown, found, i = name, [], 0
    while i < len(args):
        token = _clean(args[i])
        i += 1
        if not token or token == "...":
            continue
        if not _is_option(token):
            if isinstance(command, click.Group):  # the first word after a group's options
                sub = command.get_command(ctx, token)
                if sub is None:
                    return found + [f"`{shown}` has no subcommand {token!r} "
                                    f"(it has: {', '.join(command.list_commands(ctx))})"]
                command, shown = sub, f"{shown} {token}"
                ctx = click.Context(command, info_name=token, parent=ctx)
            continue
        flag, _, inline = token.partition("=")
        param = _options(command, ctx).get(flag)
        if param is None:
            found.append(f"`{shown}` has no flag {flag}")
            continue
        if param.is_flag or param.count or inline:
            value = inline
        elif i < len(args) and not _is_option(_clean(args[i])):
            value, i = _clean(args[i]), i + 1
        else:
            value = ""
        if value and isinstance(param.type, click.Choice):
            for choice in value.split("|"):
                if not _placeholder(choice) and choice not in param.type.choices:
                    found.append(f"`{shown} {flag}` has no choice {choice!r} "
                                 f"(it takes: {'|'.join(param.type.choices)})")
    return found


def command_problems(path: Path) -> list[str]:
    return [f"{snippet.where()}: {problem}   [{name} {' '.join(args)}]"
            for snippet in code_snippets(path)
            for name, args in command_lines(snippet)
            for problem in problems(name, args)]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation out, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated one gets -1, -2, ... as on GitHub."""
    count: dict[str, int] = {}
    out = set()
    for heading in read_page(path)[2]:
        slug = github_slug(heading)
        out.add(f"{slug}-{count[slug]}" if slug in count else slug)
        count[slug] = count.get(slug, 0) + 1
    return out


def link_problems(path: Path) -> list[str]:
    found = []
    for block in read_page(path)[1]:
        text = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), block.text)
        for m in LINK.finditer(text):
            target, where = m.group(1), block.where(text.count("\n", 0, m.start()))
            if re.match(r"^[a-zA-Z][\w+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                found.append(f"{where}: link to {target} leads nowhere ({file} is not there)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                found.append(f"{where}: link to {target}: {dest.name} has no heading #{anchor}")
    return found


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", doc_files(), ids=_id)
def test_quoted_commands_use_flags_that_exist(path):
    found = command_problems(path)
    assert not found, "stale commands (fix the docs, or the CLI):\n" + "\n".join(found)


@pytest.mark.parametrize("path", doc_files(), ids=_id)
def test_relative_links_resolve(path):
    found = link_problems(path)
    assert not found, "broken links:\n" + "\n".join(found)


def test_the_docs_quote_commands_at_all():
    # a parser that silently finds nothing would pass everything: the README quotes each tool
    quoted = {name for snippet in code_snippets(ROOT / "README.md")
              for name, _ in command_lines(snippet)}
    assert quoted == set(COMMANDS)


def test_a_stale_flag_is_named_with_its_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Intro, `ldm-run B --no-such-flag`, then `ldm-run B\n--precision int4` wrapped.\n\n"
        "```\nldm-export int8 B \\\n    --method best [--min-psnr X]\nldm-export onxx B -o C\n"
        "ldm-serve B --precision P --port 1   # comment --ignored\n"
        "ldm-serve B [--host H]\n           [--no-host]\n```\n\n"
        "| table | `ldm-run -q` |\n\n"
        "[gone](nowhere.md) [self](#intro) [a wrapped\nlink](gone.md#x) `[not](a-link.md)`\n\n"
        "# Intro\n")
    found = command_problems(page)
    expected = [f"{page}:1: `ldm-run` has no flag --no-such-flag",
                f"{page}:1: `ldm-run --precision` has no choice 'int4'",
                f"{page}:5: `ldm-export int8 --method` has no choice 'best'",
                f"{page}:7: `ldm-export` has no subcommand 'onxx'",
                f"{page}:8: `ldm-serve` has no flag --port",
                f"{page}:9: `ldm-serve` has no flag --no-host"]
    for want in expected:
        assert any(f.startswith(want) for f in found), (want, found)
    assert len(found) == len(expected), found  # X, P, the comment and the table row are fine
    links = link_problems(page)
    assert [line.split(": link")[0] for line in links] == [f"{page}:15", f"{page}:15"], links
    assert "nowhere.md" in links[0] and "gone.md#x" in links[1]


# the README is the front door: what it is, set-up, the support table, a short tour and links;
# a page that fits about five screens is read whole, the rest belongs in docs/ by topic
MAX_README_LINES = 250


def test_the_readme_stays_a_front_door():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines (at most {MAX_README_LINES}); move "
                                   f"tables and how-tos to a page under docs/")


SOURCE_PATH = re.compile(r"\b(?:runtime|bundletools|calibration|export|serve|benchmarks|demo|tests)"
                         r"/[\w/]+\.py\b")


def test_source_files_named_in_the_docs_exist():
    """A page that names runtime/x.py names a file that is there (modules move)."""
    missing = [f"{p.relative_to(ROOT)}:{n}: {m}"
               for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
               for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
               for m in SOURCE_PATH.findall(line) if not (ROOT / m).exists()]
    assert not missing, "source files named in the docs that do not exist:\n" + "\n".join(missing)
