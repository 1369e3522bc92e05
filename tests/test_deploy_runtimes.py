"""Whole networks on the compiled runtimes (TVM, ORT custom ops, ORT portable): deploy form == export form."""

import contextlib

import numpy as np
import pytest

import bnnc
from bnnc.runtimes.reference import OrtReferenceRunner

from .test_passes import export_random


@pytest.mark.parametrize("arch", [
    dict(c0=16, c1=37, c2=70, k1=3, stride1=1, pool1=True, k2=3, act="maxout"),
    dict(c0=8, c1=33, c2=9, k1=3, stride1=2, pool1=False, k2=1, aq="rsign", wq="libra_pb"),
    dict(c0=8, c1=33, c2=9, k1=3, stride1=1, pool1=True, k2=3, pool_before_bn=True),
    dict(c0=8, c1=20, c2=9, k1=3, stride1=1, pool1=False, k2=3, aq="adabin", wq="adabin"),
], ids=["maxout-pool-or", "rsign-stride2-1x1", "pool-before-bn", "adabin-affine"])
@pytest.mark.parametrize("runtime", ["tvm", "ort", "ort-portable"])
def test_compiled_runtimes_equal_reference(arch, runtime):
    _, model, rng = export_random(21, **arch)
    x = rng.standard_normal((5, 3, 12, 12)).astype(np.float32)
    ref = OrtReferenceRunner(model).run(x)
    fallback = arch.get("pool_before_bn")
    with pytest.warns(UserWarning, match="stays in float") if fallback else contextlib.nullcontext():
        cm = bnnc.compile(model, runtime=runtime, batch_size=2)
    got = cm.run(x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert np.array_equal(got.argmax(1), ref.argmax(1))
