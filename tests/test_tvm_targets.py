"""TVM backend on other targets: AArch64/NEON (cross-compiled, run under qemu-user) and CUDA (sm_80/sm_90
codegen + nvcc here; bit-exact runs against the NumPy references where a CUDA GPU exists)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402

from bnnc.ops import deploy as ref  # noqa: E402
from bnnc.runtimes.tvm import kernels as K  # noqa: E402
from bnnc.runtimes.tvm import cross  # noqa: E402
from bnnc.runtimes.tvm.target import (  # noqa: E402
    arm_target, cuda_target, resolve_target, target_family)

from .test_tvm_float_kernels import _conv_ref  # noqa: E402
from .test_tvm_runtime import (  # noqa: E402
    CONV_CASES, _conv_inputs, _deploy_model, _rand_packed, _reference, _with_output)

_A64_MISSING = cross.missing_aarch64_tools()
needs_a64 = pytest.mark.skipif(bool(_A64_MISSING), reason=f"needs the AArch64 cross toolchain and qemu-user "
                               f"(missing: {', '.join(_A64_MISSING)}; apt-get install gcc-aarch64-linux-gnu "
                               "qemu-user-static)")
needs_a64_cc = pytest.mark.skipif(not shutil.which(cross.AARCH64_CC),
                                  reason=f"needs {cross.AARCH64_CC} (apt-get install gcc-aarch64-linux-gnu)")
needs_nvcc = pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc (the CUDA toolkit)")


def _has_cuda_gpu() -> bool:
    try:
        return bool(tvm.runtime.enabled("cuda") and tvm.cuda(0).exist)
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not _has_cuda_gpu(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------------------------------
# Op cases (shared by the AArch64 and CUDA runs); each → (primfunc builder(target), inputs, reference)


def _conv_case(case):
    n, c, h, w, o, k, s, p, output = case
    rng = np.random.default_rng(hash(case) % 2**32)
    args, attrs = _conv_inputs(rng, n, c, h, w, o, k, s, p, output)
    make = lambda t: K.binary_conv2d_packed_primfunc(args[0].shape, args[1].shape, args[2].shape,  # noqa: E731
                                                     target=t, **attrs)
    return make, args, ref.binary_conv2d_packed(*args, **attrs)


def _pack_case(shape, with_t):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[::7] = 0.0
    t = (rng.standard_normal(shape[1]).astype(np.float32) * 0.5) if with_t else None
    if with_t:
        t[0] = 0.0
    args = (x, t) if with_t else (x,)
    return lambda tg: K.pack_sign_primfunc(shape, with_t, target=tg), args, ref.pack_sign(x, t)


def _unpack_case(shape, channels):
    xp = _rand_packed(np.random.default_rng(2), shape[:-1], channels)
    return lambda tg: K.unpack_sign_primfunc(shape, channels, target=tg), (xp,), ref.unpack_sign(xp, channels)


def _pool_case(hw, c, ks, st, pads, mode):
    xp = _rand_packed(np.random.default_rng(3), hw, c)
    attrs = dict(channels=c, kernel_shape=ks, strides=st, pads=pads, mode=mode)
    return (lambda tg: K.maxpool_bits_primfunc(xp.shape, target=tg, **attrs)), (xp,), ref.maxpool_bits(xp, **attrs)


OP_CASES = {
    **{"conv-" + "-".join(map(str, c)): (_conv_case, (c,)) for c in CONV_CASES},
    "pack-4d-t": (_pack_case, ((2, 33, 5, 6), True)),
    "pack-4d-w17": (_pack_case, ((1, 64, 4, 17), False)),
    "pack-4d-flat": (_pack_case, ((2, 70, 8, 6), True)),  # rows of 6, planes of 48: vectors along H·W
    "pack-2d-t": (_pack_case, ((3, 70), True)),
    "pack-c1": (_pack_case, ((2, 1, 3, 3), False)),
    "unpack-4d": (_unpack_case, ((2, 5, 6, 2), 37)),
    "unpack-2d": (_unpack_case, ((3, 3), 70)),
    "pool-or": (_pool_case, ((2, 7, 8), 37, (2, 2), (2, 2), (0, 0, 0, 0), "or")),
    "pool-and-pad": (_pool_case, ((1, 9, 9), 64, (3, 3), (2, 2), (1, 1, 1, 1), "and")),
    "pool-and-s1": (_pool_case, ((1, 6, 5), 31, (3, 3), (1, 1), (1, 1, 1, 1), "and")),
}


def _case(name):
    fn, params = OP_CASES[name]
    return fn(*params)


# --------------------------------------------------------------------------------------------------
# Targets


def test_target_family_and_resolution():
    assert target_family("arm") == target_family("aarch64") == "arm"
    assert target_family("cuda") == target_family("cuda:sm_90") == "cuda"
    assert target_family(arm_target()) == "arm"
    assert target_family(tvm.target.Target(arm_target())) == "arm"
    assert target_family(cuda_target("sm_90")) == "cuda"
    assert target_family({"kind": "llvm", "mcpu": "haswell"}) in ("x86", "arm")  # host-dependent
    assert target_family({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}) == "x86"
    with pytest.raises(ValueError):
        target_family("tpu")

    t = arm_target(num_threads=4)
    assert t["mtriple"] == "aarch64-linux-gnu" and "+neon" in t["mattr"] and t["num-cores"] == 4
    assert tvm.target.Target(t).attrs["mtriple"] == "aarch64-linux-gnu"
    c = resolve_target("cuda:sm_90")
    assert c["kind"] == "cuda" and c["arch"] == "sm_90" and c["host"]["kind"] == "llvm"
    assert str(tvm.target.Target(c).arch) == "sm_90"
    assert resolve_target("cuda:90")["arch"] == "sm_90"
    with pytest.raises(ValueError):
        resolve_target("riscv")


# --------------------------------------------------------------------------------------------------
# AArch64 / NEON


def test_arm_conv_assembly_uses_neon_cnt():
    """LLVM lowers the 32-bit popcount on NEON to byte-wise cnt + widening pairwise adds."""
    f = K.binary_conv2d_packed_primfunc((1, 6, 6, 2), (64, 3, 3, 2), (64, 3, 3), out_channels=64,
                                        kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1),
                                        dilations=(1, 1), output="bits", target="arm")
    asm = cross.aarch64_assembly(f)
    assert "\tcnt\tv" in asm and ".16b" in asm
    assert "uadalp" in asm or "uaddlp" in asm
    assert "popcnt" not in asm and "%xmm" not in asm  # no x86 code


def test_arm_schedule_differs_from_x86():
    kw = dict(out_channels=64, kernel_shape=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dilations=(1, 1),
              output="bits")
    shapes = ((1, 6, 8, 2), (64, 3, 3, 2), (64, 3, 3))
    a = K.binary_conv2d_packed_primfunc(*shapes, target="arm", **kw)
    x = K.binary_conv2d_packed_primfunc(*shapes, target={"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, **kw)
    assert a.script() != x.script()
    assert "T.vectorized(4)" in a.script() and "T.vectorized(16)" in x.script()


@needs_a64
@pytest.mark.parametrize("name", list(OP_CASES))
def test_arm_kernel_under_qemu(name, tmp_path):
    make, args, want = _case(name)
    got = cross.QemuKernel(make("arm"), workdir=str(tmp_path))(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


@needs_a64
def test_arm_kernel_single_task_under_qemu(tmp_path):
    """The parallel loops give the same result however many tasks they are split into."""
    make, args, want = _case("conv-2-70-6-6-64-3-2-0-bits")
    k = cross.QemuKernel(make("arm"), workdir=str(tmp_path), num_tasks=1)
    assert np.array_equal(k(*args), want)


@needs_a64
@pytest.mark.parametrize("winograd", [False, True])
def test_arm_float_conv_stride2_padded_under_qemu(tmp_path, winograd):
    """The float stem-like conv (7×7/2, pad 3, odd width) with the ARM family's 8-lane vectors on AArch64:
    direct (its stride-2 padded input copy: masked vector loads, lane shuffles into the two column phases)
    and by 1-D Winograd F(4, 4) (the default for this conv: the rows' de-interleaving shuffles, the
    transforms)."""
    from bnnc.runtimes.tvm.float_kernels import float_conv2d_primfunc

    rng = np.random.default_rng(21)
    x = rng.standard_normal((1, 3, 19, 29)).astype(np.float32)
    w = rng.standard_normal((8, 3, 7, 7)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    f, consts, _ = float_conv2d_primfunc(x.shape, w, b, [2, 2], [3] * 4, vec=8, winograd=winograd)
    got = cross.QemuKernel(f, workdir=str(tmp_path))(x, *consts)
    want = _conv_ref(x, w, b, (2, 2), [3] * 4)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_a64
def test_arm_stem_with_pack_sign_under_qemu(tmp_path):
    """The stem conv + max pool with the PackSign fused (``pack=True``, 64 channels: 2 words per pixel, byte
    stores on NEON) on AArch64: the bits equal pack_sign of the float output the same kernel without the pack
    gives there (a threshold equal to one output value: the tie gives 1)."""
    from bnnc.ops.deploy import pack_sign
    from bnnc.runtimes.tvm.float_kernels import float_conv2d_maxpool_primfunc

    rng = np.random.default_rng(22)
    x = rng.standard_normal((1, 3, 21, 27)).astype(np.float32)
    w = rng.standard_normal((64, 3, 7, 7)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    args = ([2, 2], [3] * 4, [3, 3], [2, 2], [1] * 4)
    f, consts, oshape = float_conv2d_maxpool_primfunc(x.shape, w, b, *args, vec=8)
    y = cross.QemuKernel(f, workdir=str(tmp_path / "plain"))(x, *consts)
    th = rng.standard_normal(64).astype(np.float32)
    th[5] = y[0, 5, 2, 3]
    fp, consts, _ = float_conv2d_maxpool_primfunc(x.shape, w, b, *args, vec=8, pack=True)
    bits = cross.QemuKernel(fp, workdir=str(tmp_path / "pack"))(x, *consts, th, np.zeros(oshape, np.float32))
    assert np.array_equal(bits, pack_sign(y, th))


@needs_a64_cc
def test_arm_kernel_exports_aarch64_library(tmp_path):
    make, _, _ = _case("conv-1-64-10-10-64-3-1-1-float")
    ex = cross.aarch64_compile(make("arm"))
    so = cross.export_aarch64_library(ex, tmp_path / "k.so")
    head = open(so, "rb").read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64


def _elf_machine(path) -> int:
    return int.from_bytes(open(path, "rb").read(20)[18:20], "little")


@needs_a64_cc
def test_compile_model_arm(tmp_path):
    from bnnc.runtimes.tvm import compile_model

    model, _, _ = _deploy_model(np.random.default_rng(11))
    tm = compile_model(model, target="arm", batch_size=2)
    assert tm.info["target_family"] == "arm" and tm.info["target"]["mtriple"] == "aarch64-linux-gnu"
    if not tm.runnable:
        with pytest.raises(RuntimeError, match="AArch64"):
            tm.run(np.zeros((1, 3, 12, 12), np.float32))
    so = tm.export_library(str(tmp_path / "model_a64.so"))
    assert _elf_machine(so) == 183


# --------------------------------------------------------------------------------------------------
# CUDA: code generation + nvcc (no GPU needed)


def _cuda_module(target):
    names = ["conv-2-31-7-7-33-3-1-1-float", "conv-1-64-12-12-96-3-1-1-bits", "pack-4d-t", "pack-2d-t",
             "unpack-4d", "pool-and-pad"]
    funcs = {}
    for i, n in enumerate(names):
        make, _, _ = _case(n)
        funcs[f"k{i}"] = make(target).with_attr("global_symbol", f"k{i}")
    return tvm.IRModule(funcs)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_codegen_and_nvcc(arch):
    tgt = tvm.target.Target(cuda_target(arch))
    with K.nvcc_env():
        ex = tvm.compile(_cuda_module("cuda"), target=tgt)  # TVM itself runs nvcc (fatbin) here
    src = K.cuda_source(ex)
    assert "__popc(" in src
    assert "threadIdx.x" in src and "blockIdx.x" in src
    cubin = K.nvcc_compile(src, arch, "cubin")
    assert cubin[:4] == b"\x7fELF"
    if arch == "sm_80":
        ptx = K.nvcc_compile(src, arch, "ptx").decode()
        assert "popc.b32" in ptx and ".target sm_80" in ptx


@needs_nvcc
def test_compile_model_cuda(tmp_path):
    from bnnc.runtimes.tvm import compile_model

    model, _, _ = _deploy_model(np.random.default_rng(11))
    tm = compile_model(model, target="cuda:sm_80", batch_size=2)
    assert tm.info["target_family"] == "cuda" and tm.info["target"]["arch"] == "sm_80"
    src = K.cuda_source(tm.executable)
    assert "__popc(" in src and "__global__" in src
    if not tm.runnable:
        with pytest.raises(RuntimeError, match="CUDA"):
            tm.run(np.zeros((1, 3, 12, 12), np.float32))
    so = tm.export_library(str(tmp_path / "model_cuda.so"))
    assert open(so, "rb").read(4) == b"\x7fELF"


def _float_pool_model():
    """Float pooling as a BNN's shortcuts and heads use it: 2×2 average pools, a padded 3×3 max pool, a 3×3
    average pool without the padding counted, a global average pool."""
    nodes = [
        oh.make_node("AveragePool", ["x"], ["a"], kernel_shape=[2, 2], strides=[2, 2]),
        oh.make_node("MaxPool", ["a"], ["m"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
        oh.make_node("AveragePool", ["m"], ["a2"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1],
                     count_include_pad=0),
        oh.make_node("Add", ["a2", "a"], ["s"]),
        oh.make_node("GlobalAveragePool", ["s"], ["g"]),
        oh.make_node("Flatten", ["g"], ["y"]),
    ]
    g = oh.make_graph(nodes, "pools", [oh.make_tensor_value_info("x", TP.FLOAT, ["N", 8, 14, 14])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["N", 8])])
    return oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)], ir_version=10)


def _kernel_launch_bounds(src: str) -> dict:
    import re

    return {m.group(2): int(m.group(1)) for m in re.finditer(r"__launch_bounds__\((\d+)\)\s+(\w+)\(", src)}


@needs_nvcc
def test_cuda_pooling_one_thread_per_output():
    """Pooling windows (≤ 64 terms) are summed by one thread per output: blocks of many threads, not one
    block of window-size threads per output (dlight's GeneralReduction: 4 threads for a 2×2 pool)."""
    from bnnc.runtimes.tvm import compile_model

    tm = compile_model(_float_pool_model(), target="cuda:sm_90", batch_size=4)
    bounds = {k: v for k, v in _kernel_launch_bounds(K.cuda_source(tm.executable)).items() if "pool" in k}
    assert len(bounds) >= 3, bounds
    assert min(bounds.values()) >= 128, bounds


@needs_nvcc
@pytest.mark.parametrize("graph", [True, False])
def test_cuda_graph_capture(graph):
    from bnnc.runtimes.tvm import compile_model

    model, _, _ = _deploy_model(np.random.default_rng(11))
    tm = compile_model(model, target="cuda:sm_90", batch_size=2, cuda_graph=graph)
    assert ("vm.builtin.cuda_graph.run_or_capture" in tm.executable.as_text()) == graph


# conv + chain + PackSign cases (tests/test_tvm_popfuse.py rows): whole words, stride 2 with a partial last
# word, one partial word with bits only, O % 32 != 0 on a small plane
CUDA_CHAIN_CASES = [(2, 33, 21, 23, 64, 1, True, True), (2, 40, 20, 21, 40, 2, True, False),
                    (2, 16, 32, 32, 16, 1, False, True), (2, 70, 9, 7, 50, 1, True, True)]


def _cuda_chain_kernel(case):
    from .test_tvm_popfuse import chain_reference

    args, attrs, a, extras, steps, v, thr, bits = chain_reference(case)
    f = K.binary_conv2d_packed_chain_primfunc(args[0].shape, args[1].shape, args[2].shape, **a,
                                              extra_shapes=[e.shape for e in extras], steps=steps,
                                              want_float=case[6], pack=True, with_threshold=case[7], target="cuda")
    return f, list(args) + list(extras) + ([thr] if case[7] else []), v, bits


@needs_nvcc
@pytest.mark.parametrize("case", CUDA_CHAIN_CASES[:2], ids=lambda c: "-".join(str(v) for v in c))
def test_cuda_fused_chain_kernel_layout(case):
    """The float epilogue and the chain are one kernel (the conv's float value is never stored): popcount,
    chain (+ its float output), pack; without the float output the chain is inside the pack."""
    f, _, _, _ = _cuda_chain_kernel(case)
    src = K.cuda_source(f)
    assert "__popc(" in src and "__fmul_rn(" in src
    assert len(_kernel_launch_bounds(src)) == (4 if case[6] else 3)  # weight transpose, popcount, chain, pack
    assert 'T.sblock("epilogue")' not in f.script()


def test_graph_fuses_chain_into_cuda_conv():
    from bnnc.runtimes.tvm import graph as G

    from .test_tvm_runtime import _residual_block

    model, _, _ = _residual_block(np.random.default_rng(3), n=2, c=64, h=7, w=9, stride=1)
    mod, _ = G.translate(model, batch_size=2, target="cuda")
    names = [gv.name_hint for gv in mod.functions]
    assert any(nm.startswith("bnnc_chain_pack_bconv") for nm in names)
    assert any(nm.startswith("bnnc_chain_bconv") for nm in names)  # bconv2 + bias add (the graph output)
    assert not any(nm.startswith(("bnnc_chain_pack_", "bnnc_chain_")) and "bconv" not in nm for nm in names)
    assert not any(nm.startswith("bnnc_bconv") for nm in names)


# --------------------------------------------------------------------------------------------------
# CUDA: runs (GPU only)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("case", CUDA_CHAIN_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_cuda_fused_chain_kernel_matches_reference(case):
    from .test_tvm_runtime import _run_outs

    f, ins, v, bits = _cuda_chain_kernel(case)
    outs = ([(v.shape, "float32")] if case[6] else []) + [(bits.shape, "uint32")]
    got = _run_outs(K.build_kernel(f, target="cuda").lib, ins, outs, dev=tvm.cuda(0))
    if case[6]:
        assert np.array_equal(got[0].view(np.uint32), v.view(np.uint32))
    assert np.array_equal(got[-1], bits)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("geom", [(64, 7, 9, 1), (40, 21, 23, 2)], ids=["s1", "s2-c40"])
def test_cuda_residual_block_fused_matches_reference(geom):
    from onnx import TensorProto as TPx

    from bnnc.runtimes.tvm import compile_model

    from .test_tvm_runtime import _residual_block

    c, h, w, stride = geom
    model, x, want = _residual_block(np.random.default_rng(40 + c + stride), n=2, c=c, h=h, w=w, stride=stride)
    for out, elem in (("pk1", TPx.UINT32), ("v", TPx.FLOAT), ("y", TPx.FLOAT)):
        got = compile_model(_with_output(model, out, elem), target="cuda", batch_size=2).run(x)
        assert got.dtype == want[out].dtype and np.array_equal(got.view(np.uint32), want[out].view(np.uint32)), out


@pytest.mark.cuda
@needs_gpu
def test_cuda_float_pooling_matches_onnxruntime():
    import onnxruntime as ort
    from bnnc.runtimes.tvm import compile_model

    model = _float_pool_model()
    x = np.random.default_rng(5).standard_normal((6, 8, 14, 14)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = compile_model(model, target="cuda", batch_size=4).run(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("name", list(OP_CASES))
def test_cuda_kernel_matches_reference(name):
    make, args, want = _case(name)
    got = K.build_kernel(make("cuda"), target="cuda")(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.cuda
@needs_gpu
def test_cuda_whole_graph(tmp_path):
    from bnnc.runtimes.tvm.graph import TVMModel, compile_model

    rng = np.random.default_rng(11)
    model, inits, attrs = _deploy_model(rng)
    x = rng.standard_normal((5, 3, 12, 12)).astype(np.float32)
    want = _reference(model, inits, attrs, x)
    mid = compile_model(_with_output(model, "mpb", TP.UINT32), target="cuda", batch_size=2)
    assert np.array_equal(mid.run(x), want["mpb"])
    tm = compile_model(model, target="cuda", batch_size=2)
    y = tm.run(x)
    np.testing.assert_allclose(y, want["y"], rtol=1e-4, atol=1e-4 * np.abs(want["y"]).max())
    # the CUDA graph replays the same kernels: same output as launching them one by one, call after call
    assert np.array_equal(compile_model(model, target="cuda", batch_size=2, cuda_graph=False).run(x), y)
    assert np.array_equal(tm.run(x[::-1].copy()), y[::-1])
    so = tm.export_library(str(tmp_path / "m.so"))
    assert np.array_equal(TVMModel.load(so, tm.meta()).run(x), y)
