"""The published AdaBin ResNet-20 checkpoint: import (CLI), export, compile on every runtime, same predictions."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import bnnc
from bnnc.cli import main

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "adabin_resnet20_cifar10" / "model.th"
pytestmark = pytest.mark.skipif(not FIXTURE.is_file() and not os.environ.get("CI"),
                                reason="needs ../shared/fixtures (present beside the checkout in CI)")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("adabin")
    assert main(["import", str(FIXTURE), "--model", "adabin_resnet20", "-o", str(root / "adabin.pt")]) == 0
    assert main(["export", str(root / "adabin.pt"), "-o", str(root / "adabin.onnx")]) == 0
    return bnnc.load_checkpoint(root / "adabin.pt"), root / "adabin.onnx"


def _inputs():
    rng = np.random.default_rng(0)
    random = rng.standard_normal((6, 3, 32, 32)).astype(np.float32)
    # structured: constant images, stripes and a checkerboard, at ImageNet-normalized scales
    yy, xx = np.mgrid[0:32, 0:32]
    structured = np.stack([np.full((3, 32, 32), v, np.float32) for v in (-2.0, 0.5, 2.2)]
                          + [np.broadcast_to(((xx // 4) % 2 * 2.0 - 1.0).astype(np.float32), (3, 32, 32))]
                          + [np.broadcast_to((((xx + yy) % 2) * 2.0 - 1.0).astype(np.float32), (3, 32, 32))])
    return np.concatenate([random, structured])


@pytest.mark.parametrize("runtime", ["reference", "numpy", "tvm", "ort", "ort-portable"])
def test_adabin_resnet20_same_predictions_on_every_runtime(imported, runtime):
    net, onnx_path = imported
    x = _inputs()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every binary conv deploys bit-packed: no float fallback warning
        cm = bnnc.compile(onnx_path, runtime=runtime, batch_size=4)
    got = cm.run(x)
    assert np.array_equal(got.argmax(1), ref.argmax(1)), runtime
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
