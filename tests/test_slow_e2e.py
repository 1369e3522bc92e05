"""The README's main job on the real Fashion-MNIST: accuracy and exact agreement across runtimes."""

import os
from pathlib import Path

import pytest

from bnnc.data import FASHION_MNIST_DEFAULT

pytestmark = [pytest.mark.slow, pytest.mark.ci]


@pytest.mark.skipif(not Path(FASHION_MNIST_DEFAULT).is_dir() and not os.environ.get("CI"),
                    reason="needs the Debian package dataset-fashion-mnist (CI installs it)")
def test_quickstart_reaches_published_accuracy_with_identical_predictions(tmp_path):
    from bnnc.quickstart import quickstart

    rows = quickstart(epochs=4, out=tmp_path / "qs")
    assert rows["pytorch"]["metrics"]["n"] == 10000
    assert rows["pytorch"]["metrics"]["top1"] >= 0.85
    for name in ("reference (ORT)", "tvm"):
        assert rows[name]["agreement"] == 1.0, name
        assert rows[name]["metrics"]["top1"] == rows["pytorch"]["metrics"]["top1"]
    assert rows["tvm"]["size"] * 5 < rows["pytorch"]["size"]
