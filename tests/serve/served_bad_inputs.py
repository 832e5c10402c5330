"""The served rows of the bad-input table (docs/bad-input.md): every row is a test (test_serving.py,
against a real server) and a row there. Print the table with:
python tests/serve/served_bad_inputs.py

Each case: (what, how it is sent, arguments, what comes back, message fragment, local).
``ldm-run``: `ldm-run --server URL` + arguments, exit code 2, stderr ``ldm-run: error: ...``;
with ``local`` the line is exactly the one a local `ldm-run BUNDLE` + arguments prints.
``http``: a raw KServe v2 JSON request (a list of inputs) answered 400 with ``{"error": ...}``
(a wrong type is refused by Triton itself, in its words, before the model sees it).
The server's limits in those tests: --max-steps 500 --max-pixels 65536, others default.
Placeholders: NOTIMAGE (a text file named .png), INIT / MASK (a 64x64 picture / mask), LOW (a
32x32 picture), EDGES_INIT (``edges:`` and INIT's path, a --control value), SERVER (a port
nothing listens on). The rows are sent to a server of the tiny
SD1 bundle, or, first argument INPAINT / UPSCALE / SR, of the tiny SD inpainting / SD x4
upscaler / LDM super-resolution bundle (test_served_tasks.py).
"""

from __future__ import annotations

P = ["-p", "a red cat", "--steps", "2"]
PROMPT = {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a red cat"]}
# a row's first argument -> the bundle its server serves (other rows: the tiny SD1 bundle's)
TASK_SERVERS = {"INPAINT": "inpaint", "UPSCALE": "upscale", "SR": "ldm-sr"}

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
    ("--task the bundle's model cannot do", "ldm-run", ["--task", "inpaint"] + P, 2, "--task inpaint: this bundle's model does text-to-image only", True),
    ("--mask with a plain (4-channel) U-Net", "ldm-run", ["--init-image", "INIT", "--mask", "MASK"] + P, 2, "--mask needs an inpainting model", True),
    ("--noise-level for a model that is not the SD x4 upscaler", "ldm-run", ["--noise-level", "20"] + P, 2, "--noise-level is for the SD x4 upscaler", True),
    ("inpainting mask not an image", "ldm-run", ["INPAINT", "--init-image", "INIT", "--mask", "NOTIMAGE"] + P, 2, "is not a readable image", True),
    ("inpainting mask of another size than the init image", "ldm-run", ["INPAINT", "--init-image", "INIT", "--mask", "LOW"] + P, 2, "is 32x32, the init image is 64x64; give a mask of the image's size", True),
    ("--noise-level above the SD x4 upscaler's max_noise_level", "ldm-run", ["UPSCALE", "--init-image", "LOW", "--noise-level", "400"] + P, 2, "--noise-level 400 must be an integer from 0 to 350", True),
    ("super-resolution without an init image", "ldm-run", ["SR", "--steps", "2"], 2, "this bundle's model upscales x4: give --init-image", True),
    ("--control on a served bundle without ControlNets", "ldm-run", ["--control", "EDGES_INIT"] + P, 2, "--control: this bundle has no ControlNet; export one with `ldm-export onnx SOURCE --controlnet DIR`", True),
    ("request without a prompt", "http", [], 400, "give a prompt with -p/--prompt: this bundle's model is text-to-image", False),
    ("steps sent as FP32 (wrong type)", "http", [PROMPT, {"name": "steps", "shape": [1], "datatype": "FP32", "data": [2.5]}], 400, "inference input 'steps' data-type is 'FP32', but model 'ldm_pipeline' expects 'INT32'", False),
    ("steps sent as text (wrong type)", "http", [PROMPT, {"name": "steps", "shape": [1], "datatype": "BYTES", "data": ["2"]}], 400, "inference input 'steps' data-type is 'BYTES', but model 'ldm_pipeline' expects 'INT32'", False),
    ("mask sent as numbers (wrong type)", "http", [PROMPT, {"name": "mask", "shape": [1], "datatype": "INT32", "data": [1]}], 400, "inference input 'mask' data-type is 'INT32', but model 'ldm_pipeline' expects 'BYTES'", False),
]


def server_of(case: tuple) -> str:
    """The bundle (tiny_bundles / ldm_bundles key) whose server a row is sent to."""
    args = case[2]
    return TASK_SERVERS.get(args[0], "sd1") if args and isinstance(args[0], str) else "sd1"


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
