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


def _sdxl_maps():
    """An SDXL bundle's maps: two text encoders (the first one's last layer unused)."""
    maps = _maps()
    maps["text_encoder"].unused.add("encoder.layers.2.self_attn.q_proj.weight")
    maps["text_encoder_2"] = WeightsMap("text_encoder_2", "text_encoder_2.onnx", {
        f"text_model.{TE}.weight": MappedParam("onnx::MatMul_5", True, (5, 5))})
    return maps


def test_sdxl_keys_reach_both_text_encoders(tmp_path):
    """diffusers' ``text_encoder_2.`` and kohya's ``lora_te1_`` / ``lora_te2_``; a module of
    the first encoder's unused last layer is matched and left out."""
    rng = _rng()
    A, B = rng.standard_normal((2, 5), dtype=np.float32), rng.standard_normal((5, 2), dtype=np.float32)
    dead = "encoder.layers.2.self_attn.q_proj"
    for name, t in {
        "d": {f"text_encoder_2.text_model.{TE}.lora_A.weight": A,
              f"text_encoder_2.text_model.{TE}.lora_B.weight": B,
              f"text_encoder.{dead}.lora_A.weight": A, f"text_encoder.{dead}.lora_B.weight": B},
        "k": {f"lora_te2_text_model_{TE.replace('.', '_')}.lora_down.weight": A,
              f"lora_te2_text_model_{TE.replace('.', '_')}.lora_up.weight": B,
              f"lora_te2_text_model_{TE.replace('.', '_')}.alpha": np.array(2.0, np.float32),
              f"lora_te1_text_model_{dead.replace('.', '_')}.lora_down.weight": A,
              f"lora_te1_text_model_{dead.replace('.', '_')}.lora_up.weight": B}}.items():
        write_safetensors(tmp_path / f"{name}.safetensors", t)
        s = LoraSet([(tmp_path / f"{name}.safetensors", 1.0)], _sdxl_maps())
        assert s.components() == {"text_encoder_2"}
        d = s.deltas("text_encoder_2")
        assert np.allclose(d[f"text_model.{TE}.weight"], B @ A, rtol=1e-6, atol=1e-6)


def test_lora_for_a_text_encoder_the_bundle_lacks_is_refused(tmp_path):
    rng = _rng()
    t = {f"text_encoder.{TE}.lora_A.weight": rng.standard_normal((2, 5), dtype=np.float32),
         f"text_encoder.{TE}.lora_B.weight": rng.standard_normal((5, 2), dtype=np.float32)}
    write_safetensors(tmp_path / "te1.safetensors", t)
    refiner = {k: v for k, v in _sdxl_maps().items() if k != "text_encoder"}
    with pytest.raises(LoraError, match=r"te1.safetensors: 1 of its modules adapt text_encoder, "
                                        r"which this bundle does not have \(an SDXL refiner"):
        LoraSet([(tmp_path / "te1.safetensors", 1.0)], refiner)
    t = {k.replace("text_encoder.", "text_encoder_2."): v for k, v in t.items()}
    write_safetensors(tmp_path / "te2.safetensors", t)
    with pytest.raises(LoraError, match=r"adapt text_encoder_2, which this bundle does not "
                                        r"have; is it a LoRA for another model\?$"):
        LoraSet([(tmp_path / "te2.safetensors", 1.0)], _maps())  # an SD1 bundle


def test_sgm_names_of_kohya_sdxl_files():
    """kohya's SDXL U-Net names (the original U-Net's) -> diffusers', for SDXL's layout."""
    from ldm_edge.runtime.lora.sgm import sgm_module

    modules = {f"down_blocks.{b}.resnets.{k}.conv1" for b in range(3) for k in range(2)}
    modules |= {f"up_blocks.{b}.attentions.0.proj_in" for b in range(2)}
    cases = {"input_blocks_4_1_transformer_blocks_0_attn1_to_q":
             "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
             "input_blocks_1_0_in_layers_2": "down_blocks_0_resnets_0_conv1",
             "input_blocks_3_0_op": "down_blocks_0_downsamplers_0_conv",
             "input_blocks_8_0_skip_connection": "down_blocks_2_resnets_1_conv_shortcut",
             "middle_block_1_proj_out": "mid_block_attentions_0_proj_out",
             "middle_block_2_emb_layers_1": "mid_block_resnets_1_time_emb_proj",
             "output_blocks_2_2_conv": "up_blocks_0_upsamplers_0_conv",
             "output_blocks_5_1_proj_in": "up_blocks_1_attentions_2_proj_in",
             "output_blocks_8_0_out_layers_3": "up_blocks_2_resnets_2_conv2",
             "label_emb_0_0": "add_embedding_linear_1", "input_blocks_0_0": "conv_in"}
    for sgm, want in cases.items():
        assert sgm_module(sgm, modules) == want, sgm
    assert sgm_module("input_blocks_1_0_norm", modules) is None
    assert sgm_module("down_blocks_0_resnets_0_conv1", modules) is None
