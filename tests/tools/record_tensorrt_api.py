"""Record the Python API surface of real TensorRT bindings into tests/data/tensorrt_api.json.

The TensorRT fakes (tests/trt_surface.py) refuse every name, keyword and arity that is not in
this record for the TensorRT version they claim to be, so a call that exists only in a fake,
or only in one TensorRT release, fails on a machine without a GPU.

TensorRT's libraries are not installable everywhere, but the bindings wheels on PyPI
(``tensorrt-cu12-bindings`` for 10.x, ``tensorrt-cu13-bindings`` for 11.x) are: this script
unpacks each, builds empty stand-ins for the libraries they link (``libnvinfer.so.N``,
``libnvonnxparser.so.N``, ``libnvinfer_plugin.so.N``, whose factory functions all return
NULL) with ``gcc``, imports the bindings in a subprocess over them and reads from the live
module: module-level names, every class's own methods (parameter names from the pybind11
signatures in the docstrings, one list per overload), properties (read-only or not), class
attributes, enum members and, where they are TensorRT types or plain scalars, parameter and
return types. Docstrings are not kept.

Regenerate (Linux x86_64 with gcc and pip; needs the network)::

    python tests/tools/record_tensorrt_api.py --download
    python tests/tools/record_tensorrt_api.py --wheels DIR     # wheels already downloaded

``--download`` fetches the releases in ``RELEASES`` (the floor, TensorRT 10.3 as JetPack 6.1
ships it; the newest 10.x; the newest 11.x) with ``pip download --no-deps`` into a temporary
folder; bump them there when NVIDIA publishes newer ones (``pip index versions
tensorrt-cu13-bindings``). The output is written with sorted keys, so a regeneration diffs
cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "tensorrt_api.json"
# (pip requirement, why it is recorded)
RELEASES = (
    ("tensorrt-cu12-bindings==10.3.0", "the floor: JetPack 6.1"),
    ("tensorrt-cu12-bindings==10.16.1.11", "the newest 10.x"),
    ("tensorrt-cu13-bindings==11.4.0.106", "the newest 11.x"),
)
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")
# the symbols the bindings import from TensorRT's libraries; each stub returns NULL / 0
STUB_C = """
void *createInferBuilder_INTERNAL(void *a, int b) { return 0; }
void *createInferRefitter_INTERNAL(void *a, void *b, int c) { return 0; }
void *createInferRuntime_INTERNAL(void *a, int b) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *a, void *b, int c) { return 0; }
void *createNvOnnxParser_INTERNAL(void *a, void *b, int c) { return 0; }
void *getBuilderPluginRegistry(int a) { return 0; }
void *getPluginRegistry(void) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void *a, const char *b) { return 0; }
"""
STUB_LIBS = ("nvinfer", "nvonnxparser", "nvinfer_plugin")


# -- run by hand: fetch, unpack, stub, import in a subprocess ------------------------------------
def download(into: Path) -> list[Path]:
    for requirement, _ in RELEASES:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", f"{sys.version_info[0]}.{sys.version_info[1]}",
               "-d", str(into), requirement]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        subprocess.run(cmd, check=True)
    return sorted(into.glob("*.whl"))


def needed_libs(binding: Path, major: str) -> list[str]:
    """The TensorRT libraries the bindings' extension links (``readelf -d``), else the usual
    three of this major version."""
    try:
        dynamic = subprocess.run(["readelf", "-d", str(binding)], check=True,
                                 capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [f"lib{lib}.so.{major}" for lib in STUB_LIBS]
    return re.findall(r"Shared library: \[(libnv[^\]]+)\]", dynamic)


def make_stubs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "stub.c"
    src.write_text(STUB_C)
    for name in names:
        subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{name}", "-o",
                        str(folder / name), str(src)], check=True)


def record_wheel(wheel: Path, work: Path) -> dict:
    """Record one bindings wheel (a .whl file, or a folder it was unpacked into)."""
    unpacked = wheel
    if wheel.is_file():
        unpacked = work / wheel.stem
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
    init = (unpacked / "tensorrt_bindings" / "__init__.py").read_text()
    version = re.search(r'__version__ = "([^"]+)"', init).group(1)
    stubs = work / f"stubs-{version}"
    binding = next((unpacked / "tensorrt_bindings").glob("tensorrt*.so"))
    make_stubs(stubs, needed_libs(binding, version.split(".")[0]))
    env = dict(os.environ, LD_LIBRARY_PATH=str(stubs), PYTHONPATH=str(unpacked))
    done = subprocess.run([sys.executable, __file__, "--dump"], env=env, check=True,
                          capture_output=True, text=True)
    surface = json.loads(done.stdout)
    assert surface["version"] == version, (surface["version"], version)
    surface["wheel"] = wheel.name.split("-cp")[0]  # e.g. tensorrt_cu12_bindings-10.3.0
    return surface


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--download", action="store_true", help="pip download RELEASES first")
    how.add_argument("--wheels", type=Path, help="a folder holding the bindings .whl files "
                     "(or the folders they were unpacked into)")
    how.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.dump:  # inside the subprocess, over the stubs
        json.dump(dump_module(), sys.stdout, sort_keys=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="trt-api-") as tmp:
        work = Path(tmp)
        wheels = download(work / "wheels") if args.download else sorted(
            [*args.wheels.glob("*.whl"), *(p.parent.parent for p in
                                           args.wheels.glob("*/tensorrt_bindings/__init__.py"))])
        if not wheels:
            ap.error("no bindings wheels found")
        versions = {}
        for wheel in wheels:
            surface = record_wheel(wheel, work)
            versions[surface.pop("version")] = surface
            print(f"{wheel.name}: {len(surface['classes'])} classes", file=sys.stderr)
    data = {"about": "TensorRT Python API surface, recorded from the bindings wheels by "
                     "tests/tools/record_tensorrt_api.py (see its docstring to regenerate)",
            "versions": versions}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(_pretty(data) + "\n")
    print(f"wrote {args.output} ({args.output.stat().st_size // 1024} KiB)", file=sys.stderr)
    return 0


def _pretty(value, indent: str = "") -> str:
    """JSON with one line per member: a dict is spread over lines only while it holds dicts."""
    if not (isinstance(value, dict) and any(isinstance(v, dict) for v in value.values())):
        return json.dumps(value, sort_keys=True)
    inner = indent + " "
    items = [f"{inner}{json.dumps(k)}: {_pretty(v, inner)}" for k, v in sorted(value.items())]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"


# -- inside the subprocess: read the live module --------------------------------------------------
# what every pybind11 enum and object carries: not TensorRT's API, supplied by the fakes' guard
ENUM_MACHINERY = {"__init__", "__entries", "__repr__", "name", "__str__", "__members__", "__eq__",
                  "__ne__", "__getstate__", "__hash__", "value", "__int__", "__index__",
                  "__setstate__"}
SKIP = {"__doc__", "__module__", "__dict__", "__weakref__", "_pybind11_conduit_v1_", "__del__"}
# leftover loop variables of the bindings' own __init__.py, not API
MODULE_SKIP = {"attr", "value"}
SCALARS = {"bool": "bool", "int": "int", "float": "float", "str": "str", "None": "None",
           "typing.SupportsInt": "int", "typing.SupportsFloat": "float"}


def dump_module() -> dict:
    import inspect

    import tensorrt_bindings as trt

    classes: dict = {}
    out = {"version": trt.__version__, "functions": {}, "values": {}, "classes": classes}
    for name, value in sorted(vars(trt).items()):
        if (name.startswith("_") and name != "__version__") or name in MODULE_SKIP \
                or inspect.ismodule(value):
            continue
        if isinstance(value, type):
            _record_class(value, classes)
            if name != value.__qualname__:
                out["values"][name] = "class " + value.__qualname__
        elif callable(value):
            out["functions"][name] = _function(value)
        else:
            out["values"][name] = _value(value)
    return out


def _is_trt(obj) -> bool:
    return getattr(type(obj) if not isinstance(obj, type) else obj, "__module__", "") \
        .startswith("tensorrt")


def _is_enum(cls) -> bool:
    return isinstance(cls, type) and "__members__" in vars(cls)


def _value(value) -> str:
    """A class attribute or module value: an enum member as ``Enum.MEMBER``, a TensorRT class as
    ``class Name``, anything else as its type's name."""
    if _is_enum(type(value)) and _is_trt(value):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, type):
        return "class " + value.__qualname__
    return type(value).__name__


def _record_class(cls, classes: dict) -> None:
    name = cls.__qualname__
    if name in classes or not _is_trt(cls):
        return
    rec: dict = {}
    classes[name] = rec
    bases = [b.__qualname__ for b in cls.__bases__ if _is_trt(b)]
    for b in cls.__bases__:
        _record_class(b, classes)
    if bases:
        rec["bases"] = bases
    enum = _is_enum(cls)
    if enum:
        rec["enum"] = {k: int(v) for k, v in cls.__members__.items()}
    for attr, raw in vars(cls).items():
        if attr in SKIP or attr.startswith("__pybind11_module_local") or \
                (enum and (attr in ENUM_MACHINERY or attr in rec["enum"])):
            continue
        value = getattr(cls, attr)
        if attr == "__init__" and not (raw.__doc__ or "").startswith("__init__("):
            continue  # pybind11's "No constructor defined!": not constructible from Python
        if isinstance(raw, property):
            ptype = _type(_signatures(raw.fget)[0][1]) if raw.fget and raw.fget.__doc__ else None
            rec.setdefault("properties", {})[attr] = \
                [("rw" if raw.fset else "ro")] + ([ptype] if ptype else [])
        elif isinstance(value, type):
            _record_class(value, classes)
            rec.setdefault("attributes", {})[attr] = _value(value)
        elif callable(value) or isinstance(raw, (staticmethod, classmethod)):
            static = isinstance(raw, staticmethod)
            method = _function(value, drop_self=not static)
            if static:
                method["static"] = True
            rec.setdefault("methods", {})[attr] = method
        else:
            rec.setdefault("attributes", {})[attr] = _value(value)


def _function(fn, drop_self: bool = False) -> dict:
    """{"sigs": [[param, ...] per overload], "returns": type} for a pybind11 builtin (read from
    its docstring) or a Python function (from inspect). A param is ``name``, ``name=`` (has a
    default), ``*args``/``**kwargs``, ``*`` or ``/`` (Python's markers), with ``:Type`` added
    where its type is a TensorRT class; pybind11's unnamed ``argN`` are positional only."""
    import inspect

    if not _is_builtin(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values()]
        if drop_self and params and params[0].name in ("self", "this"):
            params = params[1:]
        toks = []
        for p in params:
            star = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
            toks.append(star + p.name + ("=" if p.default is not p.empty else ""))
        return {"sigs": [toks]}
    sigs = _signatures(fn)
    out: dict = {"sigs": []}
    returns = {_type(ret) for _, ret in sigs}
    for params, _ in sigs:
        if drop_self and params and params[0][0] in ("self", "arg0"):
            params = params[1:]
        out["sigs"].append([_param_token(n, t, d) for n, t, d in params])
    returns.discard(None)
    if len(returns) == 1:
        out["returns"] = returns.pop()
    return out


def _is_builtin(fn) -> bool:
    return type(fn).__name__ in ("builtin_function_or_method", "instancemethod") or \
        not hasattr(fn, "__code__")


def _param_token(name: str, annotation: str, default: bool) -> str:
    t = _type(annotation)
    tag = f":{t}" if t and t not in SCALARS.values() else ""
    return name + tag + ("=" if default else "")


def _type(annotation: str | None) -> str | None:
    """A TensorRT class's qualified name, a plain scalar, or "list"; None for anything else."""
    if not annotation:
        return None
    a = re.sub(r"\btensorrt(_bindings)?(\.tensorrt)?\.", "", annotation.strip())
    if a in SCALARS:
        return SCALARS[a]
    if a.startswith(("list[", "List[")) or a == "list":
        return "list"
    if re.fullmatch(r"[A-Z][A-Za-z0-9_]*(\.[A-Z][A-Za-z0-9_]*)*", a) and \
            annotation.strip().startswith("tensorrt"):
        return a
    return None


def _signatures(fn) -> list[tuple[list[tuple[str, str, bool]], str | None]]:
    """(params [(name, annotation, has default)], return annotation) per overload, parsed from
    pybind11's docstring: ``name(a: T, b: T = d) -> R``, or its "Overloaded function." list."""
    doc = fn.__doc__ or ""
    lines = doc.splitlines()
    if len(lines) > 1 and lines[1].strip() == "Overloaded function.":
        heads = [re.sub(r"^\d+\. ", "", ln) for ln in lines if re.match(r"^\d+\. \S*\(", ln)]
    else:
        heads = [lines[0]] if lines else []
    out = []
    for head in heads:
        start = head.index("(")
        end = _closing(head, start)
        ret = head[end + 1:].strip()
        ret = ret[2:].strip() if ret.startswith("->") else None
        out.append(([_split_param(p) for p in _split_top(head[start + 1:end])], ret))
    return out or [([], None)]


def _closing(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{<":
            depth += 1
        elif text[i] in ")]}>" and not (text[i] == ">" and text[i - 1] == "-"):
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced signature: {text}")


def _split_top(params: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in params:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def _split_param(text: str) -> tuple[str, str, bool]:
    head, eq, _ = text.partition("=")
    name, _, annotation = head.partition(":")
    return name.strip(), annotation.strip(), bool(eq)


if __name__ == "__main__":
    sys.exit(main())
