"""Every row of the bad-input table (docs/bad-input.md), as a user meets it: ldm-run in a subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bad_inputs import CASES, markdown
from helpers import run_cli

TABLE_PAGE = Path(__file__).parents[2] / "docs" / "bad-input.md"


@pytest.mark.parametrize("what,breaker,args,code,needle", CASES, ids=[c[0] for c in CASES])
def test_case(what, breaker, args, code, needle, request, tmp_path):
    bundle = tmp_path / "bundle"
    other = {"UNCOND": "ldm-uncond", "INPAINT": "inpaint", "SR": "ldm-sr",
             "UPSCALE": "upscale"}.get(args[0])
    if args[0] == "CONTROL":  # the tiny SD1 model with ControlNets "edges" and "depth"
        shutil.copytree(request.getfixturevalue("controlnet_bundle"), bundle)
        args = ["BUNDLE"] + args[1:]
    elif other:  # the LDM paper's unconditional layout, SD inpainting
        shutil.copytree(request.getfixturevalue("ldm_bundles")[other], bundle)
        args = ["BUNDLE"] + args[1:]
    else:
        shutil.copytree(request.getfixturevalue("tiny_bundles")["sd1"], bundle)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    if breaker:
        breaker(bundle, scratch)
    sub = [a.replace("BUNDLE", str(bundle)).replace("TMP", str(scratch)) for a in args]
    if "-o" not in sub:
        sub += ["-o", str(scratch / "out.png")]
    r = run_cli("-m", "ldm_edge.runtime", *sub)
    assert r.returncode == code, r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    if code:
        lines = r.stderr.splitlines()  # strict: no progress bar, no blank line, no \r redraw
        assert len(lines) == 1 and r.stderr == lines[0] + "\n", repr(r.stderr)
        assert lines[0].startswith("ldm-run: error: ")
        assert needle.replace("TMP", str(scratch)) in lines[0], lines[0]
        assert not (scratch / "out.png").exists()
    else:
        assert (scratch / "out.png").is_file()
        assert needle in r.stderr


def test_docs_have_the_table():
    assert markdown() in TABLE_PAGE.read_text(), "regenerate: python tests/cli/bad_inputs.py"
