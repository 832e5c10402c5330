"""LoRA files, torch-free: the safetensors reader, both key layouts, alpha, the merge formula
and the one-line errors, against hand-computed numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldm_edge.runtime.lora.files import LoraError, LoraFile, LoraSet, parse_lora_arg
from ldm_edge.runtime.lora.apply import check_lora_precision
from ldm_edge.runtime.lora.safetensors_read import (SafetensorsError, read_safetensors,
                                                    write_safetensors)
from ldm_edge.runtime.lora.weights_map import MappedParam, WeightsMap

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TE = "encoder.layers.0.self_attn.q_proj"  # transformers 5's CLIP names (no text_model.)


def _maps():
    unet = WeightsMap("unet", "unet.onnx", {
        f"{Q}.weight": MappedParam("onnx::MatMul_1", True, (8, 6)),
        f"{CONV}.weight": MappedParam("unet.conv1.weight", False, (8, 6, 3, 3))})
    te = WeightsMap("text_encoder", "text_encoder.onnx",
                    {f"{TE}.weight": MappedParam("onnx::MatMul_9", True, (5, 5))})
    return {"unet": unet, "text_encoder": te}


def _rng():
    return np.random.default_rng(0)


def test_reader_reads_f32_f16_bf16(tmp_path):
    x = _rng().standard_normal((3, 4)).astype(np.float32)
    write_safetensors(tmp_path / "a.safetensors", {"a": x, "h": x.astype(np.float16)}, {"k": "v"})
    t, meta = read_safetensors(tmp_path / "a.safetensors")
    assert np.array_equal(t["a"], x) and np.array_equal(t["h"], x.astype(np.float16).astype(np.float32))
    assert meta == {"k": "v"}
    # bfloat16 by hand: the top 16 bits of each float32
    bf = (x.view(np.uint32) >> 16).astype("<u2")
    header = json.dumps({"b": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, bf.nbytes]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bf.tobytes())
    got = read_safetensors(tmp_path / "b.safetensors")[0]["b"]
    assert np.array_equal(got, (bf.astype(np.uint32) << 16).view(np.float32))
    assert np.allclose(got, x, rtol=1e-2)


def test_reader_refuses_truncated_and_garbage(tmp_path):
    write_safetensors(tmp_path / "a.safetensors", {"a": np.zeros((64,), np.float32)})
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match="truncated"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        read_safetensors(tmp_path / "g.safetensors")


@pytest.mark.parametrize("arg,expected", [("a.safetensors:0.8", ("a.safetensors", 0.8)),
                                          ("a.safetensors", ("a.safetensors", 1.0)),
                                          ("dir:x/a.safetensors:-1", ("dir:x/a.safetensors", -1.0))])
def test_parse_lora_arg(arg, expected):
    assert parse_lora_arg(arg) == expected


@pytest.mark.parametrize("arg,msg", [("a.safetensors:inf", "finite"), ("a.safetensors:nan", "finite"),
                                     ("a.safetensors:big", "not a number"), (":0.5", "FILE:SCALE")])
def test_parse_lora_arg_errors(arg, msg):
    with pytest.raises(LoraError, match=msg):
        parse_lora_arg(arg)


def _diffusers_file(path, rank=2, alpha=None, pattern=None):
    rng = _rng()
    t = {f"unet.{Q}.lora_A.weight": rng.standard_normal((rank, 6), dtype=np.float32),
         f"unet.{Q}.lora_B.weight": rng.standard_normal((8, rank), dtype=np.float32),
         f"unet.{CONV}.lora_A.weight": rng.standard_normal((rank, 6, 3, 3), dtype=np.float32),
         f"unet.{CONV}.lora_B.weight": rng.standard_normal((8, rank, 1, 1), dtype=np.float32),
         f"text_encoder.text_model.{TE}.lora_A.weight": rng.standard_normal((rank, 5), dtype=np.float32),
         f"text_encoder.text_model.{TE}.lora_B.weight": rng.standard_normal((5, rank), dtype=np.float32)}
    meta = None
    if alpha is not None:
        cfg = {"unet.r": rank, "unet.lora_alpha": alpha, "unet.alpha_pattern": pattern or {},
               "text_encoder.lora_alpha": alpha}
        meta = {"lora_adapter_metadata": json.dumps(cfg)}
    write_safetensors(path, t, meta)
    return t


def test_merge_formula_and_alpha(tmp_path):
    """delta = s * (alpha / r) * B @ A; convolutions through flattened matrices; alpha from
    the adapter metadata, with alpha_pattern overriding it for the modules it names."""
    t = _diffusers_file(tmp_path / "a.safetensors", rank=2, alpha=6.0, pattern={"conv1": 1.0})
    s = LoraSet([(tmp_path / "a.safetensors", 0.5)], _maps())
    d = s.deltas("unet")
    B, A = t[f"unet.{Q}.lora_B.weight"], t[f"unet.{Q}.lora_A.weight"]
    assert np.allclose(d[f"{Q}.weight"], 0.5 * (6.0 / 2) * B @ A, rtol=1e-6, atol=1e-6)
    B, A = t[f"unet.{CONV}.lora_B.weight"], t[f"unet.{CONV}.lora_A.weight"]
    conv = (B.reshape(8, 2) @ A.reshape(2, -1)).reshape(8, 6, 3, 3)
    assert np.allclose(d[f"{CONV}.weight"], 0.5 * (1.0 / 2) * conv, rtol=1e-6, atol=1e-6)
    te = s.deltas("text_encoder")[f"{TE}.weight"]  # text_model. prefix of transformers 4 files
    tB = t[f"text_encoder.text_model.{TE}.lora_B.weight"]
    tA = t[f"text_encoder.text_model.{TE}.lora_A.weight"]
    assert np.allclose(te, 0.5 * 3.0 * tB @ tA, rtol=1e-6, atol=1e-6)


def test_no_metadata_means_alpha_equals_rank(tmp_path):
    t = _diffusers_file(tmp_path / "a.safetensors", rank=2)
    d = LoraSet([(tmp_path / "a.safetensors", 1.0)], _maps()).deltas("unet")
    assert np.allclose(d[f"{Q}.weight"], t[f"unet.{Q}.lora_B.weight"] @ t[f"unet.{Q}.lora_A.weight"])


def test_kohya_layout_equals_diffusers_layout(tmp_path):
    t = _diffusers_file(tmp_path / "a.safetensors", rank=2, alpha=3.0)
    kohya = {}
    for k, v in t.items():
        comp, rest = k.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        stem = ("lora_unet_" if comp == "unet" else "lora_te_") + module.replace(".", "_")
        kohya[f"{stem}.{'lora_down' if part.startswith('A') else 'lora_up'}.weight"] = v
        kohya[f"{stem}.alpha"] = np.array(3.0, np.float32)
    write_safetensors(tmp_path / "k.safetensors", kohya)
    a = LoraSet([(tmp_path / "a.safetensors", 0.7)], _maps())
    k = LoraSet([(tmp_path / "k.safetensors", 0.7)], _maps())
    for comp in ("unet", "text_encoder"):
        da, dk = a.deltas(comp), k.deltas(comp)
        assert da.keys() == dk.keys() and all(np.array_equal(da[p], dk[p]) for p in da)


def test_blend_sums_and_zero_scale_drops(tmp_path):
    _diffusers_file(tmp_path / "a.safetensors")
    one = LoraSet([(tmp_path / "a.safetensors", 0.3)], _maps()).deltas("unet")
    two = LoraSet([(tmp_path / "a.safetensors", 0.3), (tmp_path / "a.safetensors", 0.3)], _maps())
    assert np.allclose(two.deltas("unet")[f"{Q}.weight"], 2 * one[f"{Q}.weight"], rtol=1e-6, atol=1e-6)
    zero = LoraSet([(tmp_path / "a.safetensors", 0.0)], _maps())
    assert zero.components() == set() and zero.key("unet") == "" and zero.deltas("unet") == {}
    assert zero.provenance()[0]["scale"] == 0.0


def test_unmatched_keys_name_count_and_first(tmp_path):
    t = _diffusers_file(tmp_path / "a.safetensors")
    t["unet.mid_block.attentions.9.to_q.lora_A.weight"] = np.zeros((2, 6), np.float32)
    t["unet.mid_block.attentions.9.to_q.lora_B.weight"] = np.zeros((8, 2), np.float32)
    t["lora_unet_x.hada_w1_a"] = np.zeros((2, 6), np.float32)  # LoHa's: not read
    write_safetensors(tmp_path / "b.safetensors", t)
    with pytest.raises(LoraError, match=r"b.safetensors: 2 of its 5 modules match nothing .*"
                                        r"first: lora_unet_x.hada_w1_a, "
                                        r"unet.mid_block.attentions.9.to_q"):
        LoraSet([(tmp_path / "b.safetensors", 1.0)], _maps())


def test_rank_and_shape_mismatch(tmp_path):
    t = _diffusers_file(tmp_path / "a.safetensors")
    bad = dict(t, **{f"unet.{Q}.lora_B.weight": np.zeros((8, 3), np.float32)})
    write_safetensors(tmp_path / "r.safetensors", bad)
    with pytest.raises(LoraError, match="rank mismatch"):
        LoraSet([(tmp_path / "r.safetensors", 1.0)], _maps())
    big = dict(t, **{f"unet.{Q}.lora_B.weight": np.zeros((16, 2), np.float32)})
    write_safetensors(tmp_path / "s.safetensors", big)
    with pytest.raises(LoraError, match=r"B @ A is \[16, 6\], the weight it adapts is \[8, 6\]"):
        LoraSet([(tmp_path / "s.safetensors", 1.0)], _maps())


def test_not_a_lora_and_half_pairs(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", {"model.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(LoraError, match="is not a LoRA: none of its 1 tensors"):
        LoraFile(tmp_path / "w.safetensors")
    write_safetensors(tmp_path / "h.safetensors", {f"unet.{Q}.lora_A.weight": np.zeros((2, 6), np.float32)})
    with pytest.raises(LoraError, match="only one of its two LoRA matrices"):
        LoraFile(tmp_path / "h.safetensors")


def test_shared_weights_are_refused(tmp_path):
    _diffusers_file(tmp_path / "a.safetensors")
    maps = _maps()
    maps["unet"].params.pop(f"{Q}.weight")
    maps["unet"].shared.add(f"{Q}.weight")
    with pytest.raises(LoraError, match="stored once for several layers"):
        LoraSet([(tmp_path / "a.safetensors", 1.0)], maps)


def test_mapped_param_transposes_into_the_graph_layout():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(MappedParam("x", True, (2, 3)).to_graph(w), w.T)
    assert MappedParam("x", False, (2, 3)).to_graph(w) is w


def test_int8_engines_refuse_in_one_line():
    with pytest.raises(LoraError, match="precision int8 is not supported on the tensorrt"):
        check_lora_precision("unet", "int8", "tensorrt")
    check_lora_precision("unet", "int8", "onnxruntime")  # re-quantised there: no error
    check_lora_precision("unet", "fp16", "openvino")  # supported: no error
