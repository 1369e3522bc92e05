import os

import numpy as np
import pytest

# Keep test runs quiet and deterministic on 2 cores.
os.environ.setdefault("TVM_NUM_THREADS", "2")


def pytest_configure(config):
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def write_idx(path, array, gz=False):
    """Write an IDX file (the MNIST format) the way the dataset's own files are written."""
    import gzip

    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if gz:
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.fixture
def tiny_fmnist(tmp_path, rng):
    """A Fashion-MNIST folder in the real IDX format with 64 train and 32 test images."""
    root = tmp_path / "fmnist"
    root.mkdir()
    for prefix, n in (("train", 64), ("t10k", 32)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        # class-dependent images so a model can learn something
        images = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, gz=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return root
