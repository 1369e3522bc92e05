"""The ai.bnnc ops: torch custom ops, ONNX function bodies and NumPy references agree with closed forms."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from bnnc.ops import DOMAIN, OPSET_VERSION
from bnnc.ops import deploy as K
from bnnc.ops import export as E


def _run_function_body(op_name, inputs, attrs=None):
    """Run an export op through its ONNX function body on stock ONNX Runtime."""
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(op_name, names, ["y"], domain=DOMAIN, **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, a.shape)
                                            for n, a in zip(names, inputs)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, OPSET_VERSION)],
                              functions=[E.FUNCTIONS[op_name].to_function_proto()], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, inputs)))[0]


def test_sign_binarize_all_forms_agree(rng):
    x = rng.standard_normal((3, 5, 4, 4)).astype(np.float32)
    x[0, 0, 0, :2] = 0.0  # sign(0) = +1 by bnnc's convention
    t = rng.standard_normal(5).astype(np.float32) * 0.3
    x[1, 2, 1, 1] = t[2]  # exactly at the threshold → +1
    expected = np.where(x >= t.reshape(1, -1, 1, 1), 1.0, -1.0).astype(np.float32)
    assert np.array_equal(E.sign_binarize(torch.tensor(x), torch.tensor(t)).numpy(), expected)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    assert np.array_equal(_run_function_body("SignBinarize", [x, t, one, zero]), expected)
    # affine binary set a = p·s + q (AdaBin: p = α, q = α·β), per channel
    p = rng.uniform(0.2, 1.5, 5).astype(np.float32)
    q = rng.standard_normal(5).astype(np.float32)
    affine = (expected * p.reshape(1, -1, 1, 1) + q.reshape(1, -1, 1, 1)).astype(np.float32)
    assert np.array_equal(_run_function_body("SignBinarize", [x, t, p, q]), affine)
    got = E.affine_sign(torch.tensor(x), torch.tensor(t), torch.tensor(p), torch.tensor(q)).numpy()
    assert np.array_equal(got, affine)
    # 2-D input (dense layers) uses the same per-channel threshold on axis 1
    x2 = rng.standard_normal((4, 5)).astype(np.float32)
    assert np.array_equal(_run_function_body("SignBinarize", [x2, t, one, zero]), np.where(x2 >= t, 1.0, -1.0))


@pytest.mark.parametrize("stride,pad,dil", [(1, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 2)])
def test_binary_conv2d_function_body_matches_closed_form(rng, stride, pad, dil):
    x = np.where(rng.standard_normal((2, 37, 9, 8)) >= 0, 1.0, -1.0).astype(np.float32)
    w = rng.standard_normal((6, 37, 3, 3)).astype(np.float32)
    r = rng.uniform(0.1, 2.0, 6).astype(np.float32)
    # closed form: sum over valid taps of x·sign(w), times r
    ws = np.where(w >= 0, 1.0, -1.0)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (9 + 2 * pad - dil * 2 - 1) // stride + 1
    ow = (8 + 2 * pad - dil * 2 - 1) // stride + 1
    ref = np.zeros((2, 6, oh, ow))
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, i * dil: i * dil + stride * (oh - 1) + 1: stride, j * dil: j * dil + stride * (ow - 1) + 1: stride]
            ref += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    ref = (ref * r.reshape(1, -1, 1, 1)).astype(np.float32)
    attrs = dict(strides=[stride] * 2, pads=[pad] * 4, dilations=[dil] * 2, group=1)
    zeros = np.zeros(6, np.float32)
    got_ort = _run_function_body("BinaryConv2d", [x, w, r, zeros], attrs)
    got_torch = E.binary_conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(r), torch.tensor(zeros),
                                [stride] * 2, [pad] * 2, [dil] * 2, 1).numpy()
    np.testing.assert_array_equal(got_ort, ref)
    np.testing.assert_array_equal(got_torch, ref)
    # weight offsets (AdaBin: w_b = r·s + b): y = r·Σ s_w·x + b·Σ_V x, Σ_V over the valid window
    b = rng.standard_normal(6).astype(np.float32)
    window = torch.nn.functional.conv2d(torch.tensor(x), torch.ones(1, 37, 3, 3), stride=stride, padding=pad,
                                        dilation=dil).numpy()
    expected = ref + window * b.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(_run_function_body("BinaryConv2d", [x, w, r, b], attrs), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("c", [1, 31, 32, 33, 70])
def test_pack_unpack_roundtrip_and_tail_bits_zero(rng, c):
    x = rng.standard_normal((2, c, 3, 4)).astype(np.float32)
    p = K.pack_sign(x)
    assert p.dtype == np.uint32 and p.shape == (2, 3, 4, (c + 31) // 32)
    assert np.array_equal(K.unpack_sign(p, c), np.where(x >= 0, 1.0, -1.0))
    # channel c → bit c % 32 of word c // 32; bits past c are zero
    for ch in (0, c - 1):
        bit = (p[..., ch // 32] >> np.uint32(ch % 32)) & 1
        assert np.array_equal(bit.astype(bool), np.moveaxis(x >= 0, 1, -1)[..., ch])
    if c % 32:
        assert not np.any(p[..., -1] >> np.uint32(c % 32))


def test_xor_popcount_identity(rng):
    """Σ s_a·s_w = K − 2·popcount(a XOR w) (deploy.md §2), with padded tail words."""
    for k in (1, 5, 32, 33, 100):
        a = rng.standard_normal(k) >= 0
        w = rng.standard_normal(k) >= 0
        dot = int(np.sum(np.where(a, 1, -1) * np.where(w, 1, -1)))
        pc = int(K.popcount32(K.pack_bits(a) ^ K.pack_bits(w)).sum())
        assert dot == k - 2 * pc


def test_maxpool_bits_equals_float_maxpool(rng):
    x = rng.standard_normal((2, 45, 7, 7)).astype(np.float32)
    s = torch.tensor(np.where(x >= 0, 1.0, -1.0))
    p = K.pack_sign(x)
    got_or = K.maxpool_bits(p, channels=45, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], mode="or")
    ref = torch.nn.functional.max_pool2d(s, 3, 2, 1).numpy()
    assert np.array_equal(K.unpack_sign(got_or, 45), ref)
    got_and = K.maxpool_bits(p, channels=45, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], mode="and")
    ref_min = -torch.nn.functional.max_pool2d(-s, 2, 2).numpy()
    assert np.array_equal(K.unpack_sign(got_and, 45), ref_min)
    with pytest.raises(ValueError, match="mode"):
        K.maxpool_bits(p, channels=45, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0], mode="max")
