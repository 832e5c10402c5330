"""The real TensorRT Python API, as recorded from NVIDIA's bindings wheels, and a guard that
holds the TensorRT fakes to it.

``tests/data/tensorrt_api.json`` (written by ``tests/tools/record_tensorrt_api.py``) holds,
per TensorRT release, every module-level name, every class's methods (parameter names per
overload), properties, class attributes and enum members. :meth:`Surface.module` turns a fake's
implementations into a stand-in ``tensorrt`` module for one release that behaves like the
bindings at their edges:

* a name the release does not have is an ``AttributeError`` (on the module, a class, an enum
  or an object the fake hands out), as is setting one or setting a read-only property;
* a call whose positional count or keywords fit none of the release's overloads, or that
  passes a non-TensorRT value where the binding takes a TensorRT enum or class, is a
  ``TypeError`` ("incompatible function arguments"), as pybind11 raises;
* enum members are values with the real names (``str()`` gives ``DataType.BF16``), not strings;
* what a fake returns is checked against the recorded return type (a fake's ``bool`` stays a
  bool) and a TensorRT object it returns is guarded as that class in turn.

Every refusal is also kept in :attr:`Surface.refusals`, so a refusal that production code
swallows (an ``except TypeError`` meant for something else) is still seen by the tests.

A name the release has but the fake does not implement raises :class:`FakeGap` (not an
AttributeError: ``hasattr`` must not answer False for something TensorRT has).
"""

from __future__ import annotations

import functools
import json
import numbers
import re
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "tensorrt_api.json"
FLOOR = "10.3.0"  # the oldest TensorRT ldm-edge supports (JetPack 6.1)


class FakeGap(AssertionError):
    """The fake lacks, or misbehaves on, something the real release has: fix the fake."""


@functools.lru_cache(maxsize=None)
def _versions() -> dict:
    return json.loads(DATA.read_text(encoding="utf-8"))["versions"]


def _key(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version))


def versions() -> list[str]:
    """The recorded releases, oldest first."""
    return sorted(_versions(), key=_key)


def newest(major: int | None = None) -> str:
    """The newest recorded release (of ``major``)."""
    return [v for v in versions() if major is None or _key(v)[0] == major][-1]


@functools.lru_cache(maxsize=None)
def surface(version: str = FLOOR) -> "Surface":
    return Surface(version)


def unwrap(obj):
    """The fake behind a guarded object (for a test's own bookkeeping, never for the code
    under test)."""
    return object.__getattribute__(obj, "_impl") if isinstance(obj, Guarded) else obj


def refusals(module) -> list:
    """What the guard refused since the fake module was made: (where, why) pairs."""
    return object.__getattribute__(module, "_refusals")


# -- parameters and calls ---------------------------------------------------------------------
def _params(tokens: list[str]) -> tuple[list[tuple], bool, bool]:
    """(params [(name, type or None, has default, positional only, keyword only)],
    takes *args, takes **kwargs) from the recorded tokens."""
    params, var_pos, var_kw, kw_only = [], False, False, False
    for tok in tokens:
        if tok == "/":
            params = [(n, t, d, True, k) for n, t, d, _, k in params]
        elif tok == "*":
            kw_only = True
        elif tok.startswith("**"):
            var_kw = True
        elif tok.startswith("*"):
            var_pos, kw_only = True, True
        else:
            default = tok.endswith("=")
            name, _, t = tok.rstrip("=").partition(":")
            params.append((name, t or None, default, bool(re.fullmatch(r"arg\d+", name)), kw_only))
    return params, var_pos, var_kw


def bind(tokens: list[str], args: tuple, kwargs: dict, accepts=None) -> dict | None:
    """{param: value} when ``args``/``kwargs`` fit this overload (``accepts(value, type)``
    checks a TensorRT-typed parameter; None skips the types), else None."""
    params, var_pos, var_kw = _params(tokens)
    positional = [p for p in params if not p[4]]
    if len(args) > len(positional) and not var_pos:
        return None
    got = {p[0]: a for p, a in zip(positional, args)}
    names = {p[0]: p for p in params}
    for k, v in kwargs.items():
        p = names.get(k)
        if p is None or p[3] or k in got:
            if var_kw and p is None:
                continue
            return None
        got[k] = v
    if any(not d and n not in got for n, _, d, _, _ in params):
        return None
    if accepts is not None and not all(accepts(got[n], t) for n, t, *_ in params
                                       if t and n in got):
        return None
    return got


def signature_text(tokens: list[str]) -> str:
    return "(" + ", ".join(tokens) + ")"


class EnumMember:
    """A member of a TensorRT enum: compares by enum and name, prints as the bindings do."""

    __slots__ = ("enum", "name", "value")

    def __init__(self, enum: str, name: str, value: int):
        object.__setattr__(self, "enum", enum)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "value", value)

    def __setattr__(self, name, value):
        raise AttributeError(f"'{self.enum}' member is read-only")

    def __eq__(self, other):
        return isinstance(other, EnumMember) and (self.enum, self.name) == (other.enum, other.name)

    def __hash__(self):
        return hash((self.enum, self.name))

    def __int__(self):
        return self.value

    __index__ = __int__

    def __str__(self):
        return f"{self.enum.rsplit('.', 1)[-1]}.{self.name}"

    def __repr__(self):
        return f"<{self}: {self.value}>"


def member(qualified: str) -> EnumMember:
    """``member("DataType.BF16")``: the member, from the newest release that has it (a fake's
    own constant; the guard still refuses one its release lacks)."""
    enum, _, name = qualified.rpartition(".")
    for v in reversed(versions()):
        members = _versions()[v]["classes"].get(enum, {}).get("enum", {})
        if name in members:
            return EnumMember(enum, name, members[name])
    raise KeyError(f"no TensorRT release recorded here has {qualified}")


# -- one release's surface ----------------------------------------------------------------------
class Surface:
    """One recorded TensorRT release: lookups, and the guard's factories."""

    def __init__(self, version: str):
        if version not in _versions():
            raise KeyError(f"TensorRT {version} is not recorded in {DATA.name} "
                           f"(recorded: {', '.join(versions())})")
        rec = _versions()[version]
        self.version = version
        self.classes, self.functions, self.values = rec["classes"], rec["functions"], rec["values"]

    def __repr__(self):
        return f"Surface({self.version!r})"

    def mro(self, cls: str) -> list[str]:
        out, todo = [], [cls]
        while todo:
            c = todo.pop(0)
            if c not in out and c in self.classes:
                out.append(c)
                todo += self.classes[c].get("bases", [])
        return out

    def is_subclass(self, cls: str, base: str) -> bool:
        return base in self.mro(cls)

    def lookup(self, cls: str, name: str) -> tuple[str, object] | None:
        """("method", rec) | ("property", [ro/rw, type]) | ("attribute", value) |
        ("member", value) for ``cls.name`` (through its bases), None when absent."""
        for c in self.mro(cls):
            rec = self.classes[c]
            if name in rec.get("enum", {}):
                return "member", rec["enum"][name]
            for kind, section in (("method", "methods"), ("property", "properties"),
                                  ("attribute", "attributes")):
                if name in rec.get(section, {}):
                    return kind, rec[section][name]
        return None

    def has(self, cls: str, name: str) -> bool:
        return self.lookup(cls, name) is not None

    def module_kind(self, name: str) -> str | None:
        if name in self.functions:
            return "function"
        value = self.values.get(name)
        if (name in self.classes and "." not in name) or (value or "").startswith("class "):
            return "class"
        return "value" if value is not None else None

    def is_enum(self, cls: str) -> bool:
        return "enum" in self.classes.get(cls, {})

    def enum_member(self, enum: str, name: str) -> EnumMember:
        members = self.classes.get(enum, {}).get("enum", {})
        if name not in members:
            raise AttributeError(f"type object '{enum.rsplit('.', 1)[-1]}' has no attribute "
                                 f"'{name}'")
        return EnumMember(enum, name, members[name])

    def value(self, text: str, refused: list):
        """A recorded class attribute or module value: an enum member, a class, or None."""
        if text.startswith("class "):
            return GuardedClass(self, text[6:], None, refused)
        enum, _, name = text.rpartition(".")
        if enum in self.classes and self.is_enum(enum):
            return self.enum_member(enum, name)
        return None

    # -- the guard's checks
    def accepts(self, value, type_name: str) -> bool:
        """Would the binding take ``value`` for a parameter of TensorRT type ``type_name``?"""
        if value is None:
            return True  # pybind11 passes None for a pointer
        if self.is_enum(type_name):
            return isinstance(value, EnumMember) and value.enum == type_name
        if isinstance(value, Guarded):
            return self.is_subclass(object.__getattribute__(value, "_cls"), type_name)
        return type_name not in self.classes  # a type this record does not describe

    def check_call(self, where: str, rec: dict, args: tuple, kwargs: dict, refused: list):
        if any(bind(sig, args, kwargs, self.accepts) is not None for sig in rec["sigs"]):
            return
        takes = " | ".join(signature_text(s) for s in rec["sigs"])
        shown = ", ".join([_show(a) for a in args] + [f"{k}={_show(v)}" for k, v in kwargs.items()])
        what = "constructor" if where.endswith(".__init__") else "function"
        why = (f"{where}(): incompatible {what} arguments; TensorRT {self.version} takes "
               f"{takes}; invoked with ({shown})")
        refused.append((where, why))
        raise TypeError(why)

    def result(self, where: str, value, rtype: str | None, refused: list):
        """The fake's ``value`` as the binding returns a ``rtype``: checked, and guarded when
        it is a TensorRT object."""
        if rtype is None or isinstance(value, Guarded):
            return value
        if rtype in ("bool", "int", "float", "str", "None", "list"):
            ok = {"bool": lambda v: isinstance(v, bool),
                  "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
                  "float": lambda v: isinstance(v, numbers.Real),
                  "str": lambda v: isinstance(v, str), "None": lambda v: v is None,
                  "list": lambda v: isinstance(v, list)}[rtype](value)
            if not ok:
                raise FakeGap(f"the fake's {where} returned {value!r}; TensorRT {self.version} "
                              f"returns {rtype}")
            return value
        if self.is_enum(rtype):
            if not (isinstance(value, EnumMember) and value.enum == rtype
                    and value.name in self.classes[rtype]["enum"]):
                raise FakeGap(f"the fake's {where} returned {value!r}; TensorRT {self.version} "
                              f"returns a member of {rtype}")
            return value
        if value is None or rtype not in self.classes:
            return value
        return Guarded(self, rtype, value, refused)

    # -- factories
    def module(self, refused: list | None = None, **impl) -> "FakeModule":
        """A ``tensorrt`` module of this release made of ``impl`` (name -> the fake's class,
        factory or function); enums and module values come from the record."""
        return FakeModule(self, impl, [] if refused is None else refused)

    def wrap(self, cls: str, impl, refused: list | None = None) -> "Guarded":
        """``impl`` guarded as a TensorRT ``cls`` (e.g. a network or config a fake hands out)."""
        if cls not in self.classes:
            raise KeyError(f"TensorRT {self.version} has no class {cls}")
        return Guarded(self, cls, impl, [] if refused is None else refused)


def _show(value) -> str:
    if isinstance(value, Guarded):
        return f"<tensorrt.{object.__getattribute__(value, '_cls')}>"
    text = repr(value)
    return text if len(text) < 60 else text[:57] + "..."


def _refuse(refused: list, where: str, why: str):
    refused.append((where, why))
    return AttributeError(why)


# -- the guarded objects -------------------------------------------------------------------------
class Guarded:
    """A fake TensorRT object held to its class's recorded surface."""

    __slots__ = ("_surface", "_cls", "_impl", "_refused")

    def __init__(self, surface: Surface, cls: str, impl, refused: list):
        for k, v in (("_surface", surface), ("_cls", cls), ("_impl", impl), ("_refused", refused)):
            object.__setattr__(self, k, v)

    def __getattr__(self, name):
        s, cls, impl, refused = (object.__getattribute__(self, k)
                                 for k in ("_surface", "_cls", "_impl", "_refused"))
        found = s.lookup(cls, name)
        if found is None:
            raise _refuse(refused, f"{cls}.{name}", f"'tensorrt.{cls}' object has no attribute "
                                                   f"'{name}' (TensorRT {s.version})")
        kind, rec = found
        if kind == "method":
            return _Method(s, f"{cls}.{name}", rec, lambda: _fake_attr(impl, cls, name, s),
                           refused)
        if kind == "property":
            value = _fake_attr(impl, cls, name, s)
            return s.result(f"{cls}.{name}", value, rec[1] if len(rec) > 1 else None, refused)
        if kind == "member":
            return EnumMember(cls, name, rec)
        return s.value(rec, refused)

    def __setattr__(self, name, value):
        s, cls, impl, refused = (object.__getattribute__(self, k)
                                 for k in ("_surface", "_cls", "_impl", "_refused"))
        found = s.lookup(cls, name)
        if found is None or found[0] != "property":
            raise _refuse(refused, f"{cls}.{name}", f"'tensorrt.{cls}' object has no attribute "
                                                   f"'{name}' (TensorRT {s.version})")
        if found[1][0] != "rw":
            raise _refuse(refused, f"{cls}.{name}", f"property '{name}' of 'tensorrt.{cls}' "
                                                   f"object has no setter")
        ptype = found[1][1] if len(found[1]) > 1 else None
        if ptype and not s.accepts(value, ptype):
            why = f"{cls}.{name}: incompatible value {_show(value)}; TensorRT takes {ptype}"
            refused.append((f"{cls}.{name}", why))
            raise TypeError(why)
        setattr(impl, name, value)

    def _dunder(self, name: str, *args):
        s, cls = object.__getattribute__(self, "_surface"), object.__getattribute__(self, "_cls")
        if not s.has(cls, name):
            raise TypeError(f"'tensorrt.{cls}' object does not support {name}")
        return Guarded.__getattr__(self, name)(*args)

    def __bool__(self):  # pybind11 objects are true unless they have a length
        s, cls = object.__getattribute__(self, "_surface"), object.__getattribute__(self, "_cls")
        return not s.has(cls, "__len__") or len(self) > 0

    def __len__(self):
        return Guarded._dunder(self, "__len__")

    def __getitem__(self, key):
        return Guarded._dunder(self, "__getitem__", key)

    def __repr__(self):
        return f"<guarded tensorrt.{object.__getattribute__(self, '_cls')}>"


def _fake_attr(impl, cls: str, name: str, s: Surface):
    try:
        return getattr(impl, name)
    except AttributeError:
        raise FakeGap(f"the fake {cls} does not implement {name!r} (TensorRT {s.version} has "
                      f"it)") from None


class _Method:
    """A bound method of a guarded object (or a module function): the call is checked against
    the recorded overloads before the fake runs, and what it returns after."""

    def __init__(self, s: Surface, where: str, rec: dict, resolve, refused: list):
        self.s, self.where, self.rec, self.resolve, self.refused = s, where, rec, resolve, refused

    def __call__(self, *args, **kwargs):
        self.s.check_call(self.where, self.rec, args, kwargs, self.refused)
        value = self.resolve()(*args, **kwargs)
        return self.s.result(self.where, value, self.rec.get("returns"), self.refused)


class GuardedClass:
    """A TensorRT class on the fake module: constructing it checks the recorded ``__init__``
    overloads; class attributes (enum members, nested enums) come from the record."""

    def __init__(self, s: Surface, cls: str, factory, refused: list):
        self._s, self._cls, self._factory, self._refused = s, cls, factory, refused

    def __call__(self, *args, **kwargs):
        found = self._s.lookup(self._cls, "__init__")
        if found is None:
            raise TypeError(f"tensorrt.{self._cls}: No constructor defined!")
        if self._factory is None:
            raise FakeGap(f"the fake tensorrt module does not implement {self._cls} (TensorRT "
                          f"{self._s.version} has it)")
        self._s.check_call(f"{self._cls}.__init__", found[1], args, kwargs, self._refused)
        return self._s.result(self._cls, self._factory(*args, **kwargs), self._cls,
                              self._refused)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        found = self._s.lookup(self._cls, name)
        if found is None:
            raise _refuse(self._refused, f"{self._cls}.{name}",
                          f"type object '{self._cls.rsplit('.', 1)[-1]}' has no attribute "
                          f"'{name}' (TensorRT {self._s.version})")
        kind, rec = found
        if kind == "member":
            return EnumMember(self._cls, name, rec)
        if kind == "attribute":
            return self._s.value(rec, self._refused)
        if kind == "method" and rec.get("static"):
            return _Method(self._s, f"{self._cls}.{name}", rec,
                           lambda: _fake_attr(self._factory, self._cls, name, self._s),
                           self._refused)
        return _Unbound(self._cls, name)

    @property
    def __members__(self):
        if not self._s.is_enum(self._cls):
            raise AttributeError("__members__")
        return {n: EnumMember(self._cls, n, v)
                for n, v in self._s.classes[self._cls]["enum"].items()}

    def __repr__(self):
        return f"<guarded class tensorrt.{self._cls}>"


class _Unbound:
    """``Class.method`` or ``Class.property`` read off the class: present, not callable here."""

    def __init__(self, cls: str, name: str):
        self.cls, self.name = cls, name

    def __repr__(self):
        return f"<tensorrt.{self.cls}.{self.name}>"


class FakeModule:
    """The fake ``tensorrt`` module of one release; see :meth:`Surface.module`."""

    def __init__(self, s: Surface, impl: dict, refused: list):
        extra = [n for n in impl if s.module_kind(n) is None]
        if extra:
            raise FakeGap(f"the fake offers {', '.join(sorted(extra))}, which TensorRT "
                          f"{s.version} does not have")
        object.__setattr__(self, "_s", s)
        object.__setattr__(self, "_impl", dict(impl))
        object.__setattr__(self, "_refusals", refused)
        object.__setattr__(self, "_made", {})

    def __getattr__(self, name):
        s, impl, made = self._s, self._impl, self._made
        if name in made:
            return made[name]
        kind = s.module_kind(name)
        if kind is None:
            raise _refuse(self._refusals, name, f"module 'tensorrt' has no attribute '{name}' "
                                                f"(TensorRT {s.version})")
        if name == "__version__":
            value = s.version
        elif kind == "class":
            cls = s.values[name][6:] if name in s.values else name
            value = GuardedClass(s, cls, impl.get(name), self._refusals)
        elif kind == "function":
            if name not in impl:
                raise FakeGap(f"the fake tensorrt module does not implement {name}() (TensorRT "
                              f"{s.version} has it)")
            value = _Method(s, name, s.functions[name], lambda: impl[name], self._refusals)
        else:
            value = s.value(s.values[name], self._refusals)
        made[name] = value
        return value

    def __setattr__(self, name, value):
        """A test replacing one implementation (``trt.Runtime = ...``) keeps the guard."""
        if self._s.module_kind(name) is None:
            raise FakeGap(f"TensorRT {self._s.version} has no {name}")
        self._impl[name] = value
        self._made.pop(name, None)

    def __repr__(self):
        return f"<fake module 'tensorrt' {self._s.version}>"
