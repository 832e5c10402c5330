"""LoRA on TensorRT: engines whose LoRA-targetable weights can be refitted, and the refit.

Built by ``ldm-export engines --refittable``: the network marks each weight of the
component's weights map refittable (``INetworkDefinition.mark_weights_refittable``) and the
config sets ``BuilderFlag.REFIT_INDIVIDUAL``, so only those stay refittable and the rest of
the graph keeps its fusions. The engine record says ``"refittable": "lora-weights"``.

At run time (``TensorRTBackend`` with a LoRA) the engine is deserialised from its plan (the
base weights) and refitted with the merged weights of the whole active set, plus the base
value of any weight TensorRT asks for alongside (``get_missing_weights``): never on top of a
previous LoRA, because switching reopens the backend from the plan. Only calls present in
TensorRT 10.3 (JetPack 6.1) and 11.x: ``Refitter(engine, logger)``, ``set_named_weights``,
``get_missing_weights``, ``refit_cuda_engine``, ``Weights(array)``.
"""

from __future__ import annotations

import numpy as np

from ..bundle.onnx_scan import ScanError, read_initializers
from ..errors import LdmEdgeError
from ..lora.files import LoraError

REFIT_KIND = "lora-weights"  # EngineRecord.refittable of an engine built --refittable


class RefitError(LdmEdgeError):
    """TensorRT refused to refit an engine."""


def refit_engine(trt, engine, logger, weights: dict, base_graph, component: str, hint: str):
    """Refit ``engine`` with ``weights`` {name: array in the graph's dtype}; weights TensorRT
    also wants come from ``base_graph`` (the ONNX the engine was built from)."""
    try:
        refitter = trt.Refitter(engine, logger)
    except TypeError:  # the bindings' "returned nullptr": the engine holds no refittable weight
        raise LoraError(f"{component}: TensorRT cannot refit this engine (built without "
                        f"refittable weights); rebuild it with {hint} --refittable") from None
    keep = []  # trt.Weights do not own their memory: the arrays live until refit returns

    def put(name: str, value: np.ndarray) -> bool:
        arr = np.ascontiguousarray(value)
        _check_prototype(trt, refitter, name, arr, component)
        keep.append(arr)
        return bool(refitter.set_named_weights(name, trt.Weights(arr)))

    for name, value in weights.items():
        if not put(name, value):
            raise LoraError(f"{component}: the TensorRT engine cannot refit weight {name!r}; "
                            f"rebuild it with {hint} --refittable")
    missing = [m for m in (refitter.get_missing_weights() or []) if m not in weights]
    if missing:
        try:
            base = read_initializers(base_graph, missing)
        except (OSError, ScanError) as e:
            raise RefitError(f"{component}: TensorRT asks for weights the graph does not hold "
                             f"({e}); rebuild the engine with {hint} --refittable")
        for name in missing:
            put(name, base[name])
    if not refitter.refit_cuda_engine():
        raise RefitError(f"{component}: TensorRT could not refit the engine with the LoRA "
                         f"weights (rerun with --debug for TensorRT's log)")


def _check_prototype(trt, refitter, name: str, arr: np.ndarray, component: str) -> None:
    """What the engine holds for ``name`` (``get_weights_prototype``: dtype and count) against
    what we hand it: TensorRT answers a mismatch with a bare False, which would read as "not
    refittable"."""
    get = getattr(refitter, "get_weights_prototype", None)
    if get is None:
        return
    proto = get(name)
    if proto is None or proto.size <= 0:  # not a weight of this engine: set_named_weights says
        return
    try:
        want = np.dtype(trt.nptype(proto.dtype))
    except TypeError:
        want = None
    if (want is not None and want != arr.dtype) or proto.size != arr.size:
        raise RefitError(f"{component}: weight {name!r} is {want or proto.dtype} x {proto.size} "
                         f"in the engine but {arr.dtype} x {arr.size} from the graph; rebuild the "
                         f"engine from this bundle's graph")


def mark_refittable(names):
    """Polygraphy ``PostprocessNetwork`` function: mark ``names`` refittable."""
    def mark(network):
        lost = [n for n in names if not network.mark_weights_refittable(n)]
        if lost:
            raise RefitError(f"TensorRT's network has no weight {lost[0]!r} of the weights map "
                             f"({len(lost)} missing); rebuild without --refittable")
    return mark


def refit_individual(trt):
    """Polygraphy ``PostprocessConfig`` function: only the marked weights are refittable."""
    def flag(builder, network, config):
        config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    return flag
