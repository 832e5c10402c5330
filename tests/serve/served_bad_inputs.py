"""The served rows of the README's bad-input table: every row is a test (test_serving.py,
against a real server) and a README row. Print the README table with:
python tests/serve/served_bad_inputs.py

Each case: (what, how it is sent, arguments, what comes back, message fragment, local).
``ldm-run``: `ldm-run --server URL` + arguments, exit code 2, stderr ``ldm-run: error: ...``;
with ``local`` the line is exactly the one a local `ldm-run BUNDLE` + arguments prints.
``http``: a raw KServe v2 JSON request (a list of inputs) answered 400 with ``{"error": ...}``
(a wrong type is refused by Triton itself, in its words, before the model sees it).
The server's limits in those tests: --max-steps 500 --max-pixels 65536, others default.
Placeholders: NOTIMAGE (a text file named .png), SERVER (a port nothing listens on).
"""

from __future__ import annotations

P = ["-p", "a red cat", "--steps", "2"]
PROMPT = {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red cat"]}

SERVED_CASES = [
    ("zero steps", "ldm-run", ["-p", "x", "--steps", "0"], 2, "--steps 0 must be between 1 and 1000", True),
    ("height not a multiple of 8", "ldm-run", ["--height", "65"] + P, 2, "--height 65 must be a positive multiple of 8", True),
    ("unknown scheduler", "ldm-run", ["--scheduler", "dpm++3m"] + P, 2, "unknown scheduler 'dpm++3m'", True),
    ("guidance scale negative", "ldm-run", ["--guidance-scale", "-3"] + P, 2, "--guidance-scale -3.0 must be between", True),
    ("strength without an init image", "ldm-run", ["--strength", "0.5"] + P, 2, "--strength 0.5 needs --init-image", True),
    ("init image not an image", "ldm-run", ["--init-image", "NOTIMAGE"] + P, 2, "is not a readable image", True),
    ("too many images for the exported batch", "ldm-run", ["--num-images", "5"] + P, 2, "exported for at most 4", True),
    ("negative seed (refused before sending)", "ldm-run", ["--seed", "-5"] + P, 2, "--seed -5 must be an integer from 0 to 18446744073709551615", True),
    ("steps over the server's --max-steps", "ldm-run", ["-p", "x", "--steps", "501"], 2, "--steps 501 is over this server's limit of 500", False),
    ("image over the server's --max-pixels", "ldm-run", ["--height", "512", "--width", "512"] + P, 2, "512x512 is over this server's limit of 65536 pixels per image", False),
    ("prompt over the server's --max-prompt-chars", "ldm-run", ["-p", "x" * 2001, "--steps", "2"], 2, "prompt of 2001 characters is over this server's limit of 2000", False),
    ("a local-only option with --server", "ldm-run", ["--latents", "x.npy"] + P, 2, "--latents is for a local run; the server decides how it computes", False),
    ("BUNDLE and --server", "ldm-run", ["BUNDLE"] + P, 2, "--server draws with the bundle the server serves; drop BUNDLE", False),
    ("no server at the address", "ldm-run", ["--server", "SERVER"] + P, 2, "cannot reach the server at", False),
    ("request without a prompt", "http", [], 400, "give at least one prompt", False),
    ("steps sent as FP32 (wrong type)", "http", [PROMPT, {"name": "steps", "shape": [1], "datatype": "FP32", "data": [2.5]}], 400, "inference input 'steps' data-type is 'FP32', but model 'ldm_pipeline' expects 'INT32'", False),
    ("steps sent as text (wrong type)", "http", [PROMPT, {"name": "steps", "shape": [1], "datatype": "BYTES", "data": ["2"]}], 400, "inference input 'steps' data-type is 'BYTES', but model 'ldm_pipeline' expects 'INT32'", False),
]


def markdown() -> str:
    rows = ["| # | served request | `ldm-run --server` exit / HTTP status | what the client sees |",
            "|---|---|---|---|"]
    for i, (what, how, _, code, needle, local) in enumerate(SERVED_CASES, 1):
        same = " (as local `ldm-run`)" if local else ""
        where = "HTTP" if how == "http" else "exit"
        rows.append(f"| S{i} | {what} | {where} {code} | `...{needle}...`{same} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
