"""The benchmark harness (bnnc.bench): well-formed rows, and it times kernels that compute the right thing.

No timing assertions: the numbers depend on the machine and its load."""

import math

import numpy as np
import pytest

from bnnc import bench
from bnnc.ops.deploy import binary_conv2d_packed, pack_sign

TINY = bench.LayerShape(6, 5, 40, 36)  # odd sizes: tail words in and out, non-square, 9 border classes


def test_layer_shape():
    s = bench.LayerShape(56, 56, 64, 64)
    assert s.out_hw == (56, 56)
    assert s.bops == 64 * 9 * 64 * 56 * 56
    assert s.label == "56²×64→64"
    labels = ["56²×64→64", "28²×128→128", "14²×256→256", "7²×512→512"]
    assert [x.label for x in bench.RESNET18_3X3] == labels


def test_bench_kernels_match_numpy_reference():
    """The kernels the bench times are the deploy kernels and agree with bnnc.ops.deploy bit for bit."""
    case = bench.make_layer_case(TINY, seed=3)
    k = bench.bnnc_layer_kernels(case)
    xp = k["pack"](case["x"])
    np.testing.assert_array_equal(xp, pack_sign(case["x"]))
    # the NumPy reference takes W as [O, KH, KW, Cw] and E as [O, R, C]; the kernels may take W laid out for
    # their schedule and E as a border table
    ref = {mode: binary_conv2d_packed(xp, case["wp"], case["e"], *k["args"][mode][2:], output=mode,
                                      **case["attrs"]) for mode in ("bits", "float")}
    for mode in ("bits", "float"):
        np.testing.assert_array_equal(k[f"conv_{mode}"](xp, *k["args"][mode]), ref[mode])
    # the bits case exercises both comparison directions and a non-trivial threshold
    assert set(np.unique(case["direction"])) <= {-1, 1} and case["ref_bits"].any()
    # the float chain compiled as one Relax module (what the headline times) matches too
    tm, timer = bench._bnnc_chain(case, "float", threads=1)
    np.testing.assert_array_equal(tm.run(case["x"]), ref["float"])
    assert timer(2) > 0


def test_float_dot_reference_is_the_signed_conv():
    """ref_dot (what OpenVINO's BinaryConvolution outputs) is Conv(sign(x), sign(w)) with zero padding."""
    torch = pytest.importorskip("torch")
    case = bench.make_layer_case(TINY, seed=1)
    sx = torch.from_numpy(np.where(case["x"] >= 0, 1.0, -1.0))
    want = torch.nn.functional.conv2d(sx, torch.from_numpy(case["wsign"]).double(), padding=1).numpy()
    np.testing.assert_array_equal(case["ref_dot"], want.astype(np.float32))


def test_layer_bench_rows_well_formed():
    rows = bench.run_layer_bench([TINY], threads=1, repeat=2, block_s=0.002, include_openvino=True,
                                 bound={"freq_hz": 3e9, "theory_bitmacs_per_cycle": 341.3, "isa": "test",
                                        "freq_source": "test"})
    assert len(rows) == 1
    r = rows[0]
    assert r["shape"] == TINY.label and r["threads"] == 1 and r["bops"] == TINY.bops
    for key in ("bnnc_ms", "bnnc_chain_bits_ms", "bnnc_chain_float_ms", "bnnc_sum_bits_ms", "bnnc_sum_float_ms",
                "pack_ms", "conv_bits_ms", "conv_float_ms", "ort_fp32_ms", "speedup_vs_ort", "gbops",
                "bitmacs_per_cycle", "frac_of_bound"):
        assert isinstance(r[key], float) and r[key] > 0 and math.isfinite(r[key]), key
    assert r["bnnc_ms"] == r["bnnc_chain_float_ms"]
    assert r["speedup_vs_ort"] == pytest.approx(r["ort_fp32_ms"] / r["bnnc_ms"])
    ok, why = bench.openvino_status()
    if ok and r["openvino_ms"] is not None:
        assert r["openvino_ms"] > 0 and r["ratio_vs_openvino"] == pytest.approx(r["openvino_ms"] / r["bnnc_ms"])
    else:
        # no number without a reason
        assert r["openvino_ms"] is None and r["ratio_vs_openvino"] is None and r["openvino_note"]
    ok, isa = bench.ort_lib_status()
    if ok:  # the ORT custom-op library's column (its output checked bit for bit inside the bench)
        assert r["ort_lib_note"] == isa and r["ort_lib_ms"] > 0 and r["ort_lib_bits_ms"] > 0
        assert r["ort_lib_speedup_vs_ort"] == pytest.approx(r["ort_fp32_ms"] / r["ort_lib_ms"])
        assert r["ort_lib_vs_bnnc"] == pytest.approx(r["ort_lib_ms"] / r["bnnc_ms"])
    else:
        assert r["ort_lib_ms"] is None and r["ort_lib_speedup_vs_ort"] is None and r["ort_lib_note"]
    table = bench.format_layer_table(rows)
    assert TINY.label in table and table.count("\n") == 2
    assert table.splitlines()[0].count("|") == table.splitlines()[2].count("|")  # one cell per column


def test_layer_bench_without_openvino():
    rows = bench.run_layer_bench([bench.LayerShape(4, 4, 32, 32)], threads=1, repeat=1, block_s=0.001,
                                 include_openvino=False, chain=False, bound={}, include_ort_lib=False)
    r = rows[0]
    assert r["openvino_ms"] is None and r["openvino_note"] == "not requested"
    assert r["ort_lib_ms"] is None and r["ort_lib_note"] == "not requested"
    assert r["bnnc_ms"] == r["bnnc_sum_float_ms"] > 0 and r["bitmacs_per_cycle"] is None
    assert "n/a: not requested" in bench.format_layer_table(rows)


def test_interleaved_median():
    calls = []
    def timer(name, sec):
        return lambda n: calls.append((name, n)) or sec

    t = bench._interleaved({"a": timer("a", 1e-3), "b": timer("b", 2e-3)}, repeat=3, block_s=0.01)
    assert t == {"a": 1e-3, "b": 2e-3}
    # after the warm-up calls: blocks of ~block_s, order rotating between rounds
    assert calls[4:] == [("a", 10), ("b", 5), ("b", 5), ("a", 10), ("a", 10), ("b", 5)]


def test_model_bench_tiny(tmp_path):
    torch = pytest.importorskip("torch")
    import bnnc
    from bnnc.nn import BinaryConv2d

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                              BinaryConv2d(8, 40, 3, padding=1), torch.nn.BatchNorm2d(40),
                              BinaryConv2d(40, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10)).eval()
    path = bnnc.export(net, tmp_path / "tiny.onnx", input_shape=(1, 1, 6, 6))
    r = bench.run_model_bench(path, threads=1, repeat=2, block_s=0.002)
    assert r["input_shape"] == [1, 1, 6, 6]
    assert r["bnnc_tvm_ms"] > 0 and r["ort_reference_ms"] > 0 and r["compile_s"] > 0
    assert r["speedup"] == pytest.approx(r["ort_reference_ms"] / r["bnnc_tvm_ms"])
    assert r["same_argmax"] and r["max_abs_diff"] < 1e-3
    assert "speedup" in bench.format_model_result(r)


def test_train_overhead_bench_rows():
    rows = bench.run_train_overhead_bench(quantizers=(("sign", "sign"), ("rbnn", "rbnn")), batch=2, steps=1,
                                          rounds=1)
    assert [r["quantizers"] for r in rows] == ["fp32", "sign/sign", "rbnn/rbnn"]
    assert rows[0]["ratio_vs_fp32"] == 1.0 and all(r["step_ms"] > 0 for r in rows)


def test_ort_lib_status_names_a_missing_library(monkeypatch, tmp_path):
    monkeypatch.setenv("BNNC_ORT_LIBRARY", str(tmp_path / "nope.so"))
    ok, why = bench.ort_lib_status()
    assert not ok and "nope.so" in why and "no such file" in why
