"""Triton's ``config.pbtxt`` for our models, written from the manifest's component specs.

Text in protobuf text format (Triton's ``ModelConfig`` message); the tests parse every file
with Triton's own ``model_config_pb2`` so a field that Triton does not know fails there.
"""

from __future__ import annotations

import json

from ldm_edge.runtime.bundle.spec import ComponentSpec, TensorSpec

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "uint8": "TYPE_UINT8",
                "int8": "TYPE_INT8", "bool": "TYPE_BOOL", "uint64": "TYPE_UINT64"}
KSERVE_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "UINT64": "TYPE_UINT64",
                "FP64": "TYPE_FP64", "FP32": "TYPE_FP32", "UINT8": "TYPE_UINT8",
                "BOOL": "TYPE_BOOL"}
BATCH_DIM = "batch"
# The U-Net's dynamic batcher waits this long for other requests' calls before running what
# it has: a demo-model U-Net call takes a few ms on this CPU, an SD1.5 one hundreds, so 2 ms
# costs a lone request little and lets calls that arrive together run as one batch.
UNET_QUEUE_DELAY_US = 2000


def model_name(component: str) -> str:
    """The served model of a bundle component: its key, a ControlNet's ``controlnet/NAME``
    as ``controlnet_NAME`` (a Triton model is a folder of the repository, one level deep)."""
    return component.replace("/", "_")


def batched(spec: ComponentSpec) -> bool:
    """Every input and output starts with the ``batch`` dim: Triton may batch it."""
    return all(t.shape and t.shape[0] == BATCH_DIM for t in spec.inputs + spec.outputs)


def max_batch(spec: ComponentSpec) -> int:
    """The largest batch the graph was exported for (Triton's ``max_batch_size``)."""
    return int(spec.ranges.get(BATCH_DIM, (1, 1))[1]) if batched(spec) else 0


def _dims(t: TensorSpec, batch: bool) -> tuple[list[int], list[int] | None]:
    """(dims, reshape): symbolic dims are -1; with batching the batch dim is left out, and a
    tensor that is only [batch] (the timestep) is sent as [batch, 1] and reshaped to [batch]."""
    shape = list(t.shape[1:] if batch else t.shape)
    dims = [d if isinstance(d, int) else -1 for d in shape]
    if batch and not dims:
        return [1], []
    return dims, None


def _tensor(kind: str, name: str, dtype: str, dims: list[int], reshape=None,
            optional: bool = False) -> str:
    body = f'name: {json.dumps(name)} data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]'
    if reshape is not None:
        body += f' reshape: {{ shape: [ {", ".join(map(str, reshape))} ] }}'
    if optional:
        body += " optional: true"
    return f"  {{ {body} }}"


def _block(kind: str, items: list[str]) -> str:
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def parameters(params: dict) -> str:
    return "".join(f'parameters {{ key: {json.dumps(k)} value: {{ string_value: '
                   f'{json.dumps(str(v))} }} }}\n' for k, v in params.items())


def component_config(name: str, spec: ComponentSpec, *, kind: str, graph_names: dict,
                     filename: str | None, instances: int, dynamic_batching: bool,
                     params: dict | None = None,
                     queue_delay_us: int = UNET_QUEUE_DELAY_US) -> str:
    """``kind``: onnxruntime, tensorrt or python; ``graph_names``: our tensor name -> the
    name the model exposes (the graph's own for onnxruntime and tensorrt)."""
    batch = batched(spec)
    head = {"onnxruntime": 'backend: "onnxruntime"\n', "tensorrt": 'platform: "tensorrt_plan"\n',
            "python": 'backend: "python"\n'}[kind]
    text = f'name: "{name}"\n{head}max_batch_size: {max_batch(spec)}\n'
    if filename:
        text += f"default_model_filename: {json.dumps(filename)}\n"
    for section, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        rows = []
        for t in tensors:
            dims, reshape = _dims(t, batch)
            rows.append(_tensor(section, graph_names.get(t.name, t.name), TRITON_TYPES[t.dtype],
                                dims, reshape))
        text += _block(section, rows)
    # Triton's onnxruntime and TensorRT backends are for the GPU (NVIDIA's container);
    # Python components run onnxruntime on the CPU
    device = "KIND_CPU" if kind == "python" else "KIND_GPU"
    text += f"instance_group [ {{ count: {instances} kind: {device} }} ]\n"
    if dynamic_batching and batch:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
    return text + parameters(params or {})


def pipeline_config(name: str, inputs: dict, outputs: dict, *, instances: int,
                    params: dict) -> str:
    """The ``ldm_pipeline`` Python model. Every input is optional to Triton, the prompt too:
    the model refuses a request without one in ldm-run's words, not Triton's."""
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
    text += _block("input", [_tensor("input", n, KSERVE_TYPES[k], dims, optional=True)
                             for n, (k, dims) in inputs.items()])
    text += _block("output", [_tensor("output", n, KSERVE_TYPES[k], dims)
                              for n, (k, dims) in outputs.items()])
    text += f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]\n"
    return text + parameters(params)
