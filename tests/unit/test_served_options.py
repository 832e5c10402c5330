"""``ldm-run --server`` gives ``Pipeline.request`` on the server the keywords a local
``ldm-run`` gives it, option for option, without a server: the client's real request body
(remote.encode_request) is read back as Triton hands it to the Python model, and the real
pipeline model (serve/pipeline_model.py) resolves it with a stand-in pipeline."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ldm_edge.runtime import pipeline, remote
from ldm_edge.runtime.cli import run as cli
from ldm_edge.runtime.cli import served as remote_cli
from ldm_edge.runtime.control import parse_control_arg
from ldm_edge.runtime.errors import UsageError
from ldm_edge.serve import pipeline_model
from ldm_edge.serve.limits import ServeLimits

FILES = ("init_image", "mask")


class _Stop(UsageError):
    """Raised by the stand-in once it has the keywords: nothing is drawn."""


class StandIn:
    """Records what ``request`` is given (a file as its name and bytes, read while it
    exists), then stops the run."""

    seen: list = []

    def __init__(self, *args, **kwargs):
        pass

    def request(self, **keywords):
        for k in FILES:
            if keywords.get(k) is not None:
                keywords[k] = _file(keywords[k])
        if keywords.get("control"):
            keywords["control"] = [(name, _file(image), scale) for name, image, scale
                                   in map(parse_control_arg, keywords["control"])]
        StandIn.seen.append(keywords)
        raise _Stop("stand-in stops here")


def _file(path) -> tuple:
    p = Path(path)
    return (p.name, p.read_bytes()) if p.exists() else ("missing", p)


def triton_tensors(body: bytes, header_length: int) -> dict:
    """What Triton hands the Python model for this binary request: name -> numpy array."""
    header, offset, out = json.loads(body[:header_length]), header_length, {}
    for t in header["inputs"]:
        size = t["parameters"]["binary_data_size"]
        blob, offset = body[offset:offset + size], offset + size
        if t["datatype"] == "BYTES":
            items, i = [], 0
            while i < len(blob):
                (n,), i = struct.unpack_from("<I", blob, i), i + 4
                items.append(blob[i:i + n])
                i += n
            out[t["name"]] = np.array(items, dtype=object).reshape(t["shape"])
        else:
            out[t["name"]] = np.frombuffer(blob, remote.NUMPY_OF[t["datatype"]]).reshape(t["shape"])
    return out


class FakePbUtils:
    class _Tensor:
        def __init__(self, a):
            self.a = a

        def as_numpy(self):
            return self.a

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def get_input_tensor_by_name(self, _request, name):
        return self._Tensor(self.tensors[name]) if name in self.tensors else None


def served_model_sees(inputs: dict):
    """Run the pipeline model's request handling on ``inputs`` as sent over the wire."""
    body, n = remote.encode_request(inputs)
    model = pipeline_model.TritonPythonModel()
    model.limits, model.pipe = ServeLimits(), StandIn()
    model._generate(object(), FakePbUtils(triton_tensors(body, n)))


def keywords(args: list[str], monkeypatch, served: bool) -> dict:
    StandIn.seen = []
    monkeypatch.setattr(pipeline, "Pipeline", StandIn)
    monkeypatch.setattr(remote_cli, "generate", lambda server, inputs: served_model_sees(inputs))
    where = ["--server", "http://127.0.0.1:9"] if served else ["BUNDLE"]
    r = CliRunner().invoke(cli.main, [*where, *args])
    assert "stand-in stops here" in r.output, r.output
    return StandIn.seen[-1]


@pytest.fixture
def files(tmp_path) -> dict:
    (tmp_path / "photo.png").write_bytes(b"the client's photo")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "photo.png").write_bytes(b"the client's mask, of the same name")
    (tmp_path / "edges.png").write_bytes(b"the client's edge map")
    return {"INIT": str(tmp_path / "photo.png"), "MASK": str(tmp_path / "sub" / "photo.png"),
            "EDGES:0.5": f"edges:{tmp_path / 'edges.png'}:0.5",
            "DEPTH": f"depth:{tmp_path / 'sub' / 'photo.png'}"}


CASES = {
    "text-to-image, every option": ["-p", "a cat", "-p", "a dog", "-n", "blurry", "--steps", "7",
                                    "-g", "5.5", "--scheduler", "euler", "--seed", str(2**64 - 1),
                                    "--height", "64", "--width", "72", "--num-images", "3"],
    "unconditional": ["--task", "unconditional", "--seed", "3"],
    "img2img": ["-p", "", "--init-image", "INIT", "--strength", "0.25"],
    "inpaint": ["-p", "a cat", "--task", "inpaint", "--init-image", "INIT", "--mask", "MASK"],
    "upscale": ["-p", "a cat", "--init-image", "INIT", "--noise-level", "0"],
    "super-resolution": ["--task", "super-resolution", "--init-image", "INIT"],
    "two ControlNets": ["-p", "a cat", "--control", "EDGES:0.5", "--control", "DEPTH",
                        "--control-start", "0.1", "--control-end", "0.75", "--guess-mode",
                        "--control-preprocess", "canny:50:150"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_served_request_keywords_are_the_local_ones(case, files, monkeypatch):
    args = [files.get(a, a) for a in CASES[case]]
    local = keywords(args, monkeypatch, served=False)
    served = keywords(args, monkeypatch, served=True)
    assert local.pop("latents") is None  # local only: never sent
    assert local.pop("denoising_end") is None  # the base's hand-over to --refiner: local only
    assert served == local
    given = {a: b for a, b in zip(args, args[1:]) if a.startswith("-")}
    assert served["task"] == given.get("--task")
    assert served["noise_level"] == (int(given["--noise-level"]) if "--noise-level" in given
                                     else None)


def test_control_images_travel_with_their_names_and_scales(files, monkeypatch):
    args = ["-p", "x", "--control", files["EDGES:0.5"], "--control", files["DEPTH"],
            "--control", f"depth:{files['INIT']}:2"]
    served = keywords(args, monkeypatch, served=True)
    assert served["control"] == [("edges", ("edges.png", b"the client's edge map"), 0.5),
                                 ("depth", ("photo.png", b"the client's mask, of the same name"),
                                  1.0),
                                 ("depth", ("photo.png", b"the client's photo"), 2.0)]
    assert served["guess_mode"] is False and served["control_start"] is None


def test_a_control_image_the_client_cannot_read_is_refused_before_sending(tmp_path):
    with pytest.raises(UsageError, match=r"^--control image .*nothing\.png not found$"):
        remote.request_inputs(prompts=["x"], control=[f"edges:{tmp_path / 'nothing.png'}"])


def test_control_values_and_images_must_pair_up(files):
    inputs = remote.request_inputs(prompts=["x"], control=[files["EDGES:0.5"]])
    inputs["control_image"] = inputs["control_image"] * 2
    with pytest.raises(UsageError, match="1 values and 2 control_image files"):
        served_model_sees(inputs)


def test_two_files_of_one_name_stay_apart(files, monkeypatch):
    args = ["-p", "x", "--init-image", files["INIT"], "--mask", files["MASK"]]
    served = keywords(args, monkeypatch, served=True)
    assert served["init_image"] == ("photo.png", b"the client's photo")
    assert served["mask"] == ("photo.png", b"the client's mask, of the same name")


def test_a_refusal_names_the_clients_file_not_the_servers_copy(files, monkeypatch):
    def refuse(**kw):
        raise UsageError(f"--mask {kw['mask']} is 64x64, the init image is {kw['init_image']}")
    monkeypatch.setattr(StandIn, "request", lambda self, **kw: refuse(**kw))
    with pytest.raises(UsageError) as e:
        served_model_sees(remote.request_inputs(prompts=["x"], init_image=files["INIT"],
                                                mask=files["MASK"]))
    assert str(e.value) == f"--mask {files['MASK']} is 64x64, the init image is {files['INIT']}"


@pytest.mark.parametrize("name", ["..", ".", "", "a/../..", "x\x00y", "é" * 200, None])
def test_a_sent_file_name_cannot_leave_its_folder(name, tmp_path):
    written = pipeline_model.write_files(tmp_path, {"mask": (name, b"m")})
    path, said = written["mask"]
    assert path.parent == tmp_path / "mask" and path.read_bytes() == b"m"
    assert said == (name or "mask")


def test_a_mask_over_the_size_limit_is_refused_before_it_is_written(monkeypatch):
    model = pipeline_model.TritonPythonModel()
    model.limits, model.pipe = ServeLimits(max_init_bytes=4), StandIn()
    monkeypatch.setattr(pipeline_model, "write_files", lambda *a: pytest.fail("written"))
    inputs = {"prompt": [b"x"], "mask": [b"12345"], "mask_name": [b"m.png"]}
    body, n = remote.encode_request(inputs)
    with pytest.raises(UsageError, match=r"^--mask of 5 bytes is over this server's limit of 4$"):
        model._generate(object(), FakePbUtils(triton_tensors(body, n)))
