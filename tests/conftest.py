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


def _ms_checkpoint_class(schema: str, packed: bool):
    """MindSpore's ``Checkpoint`` message class (checkpoint.proto, methods.md §10.1), built from descriptors in
    code with google.protobuf, independently of bnnc's hand-written decoder. schema "new":
    Value { tag; oneof value { tensor, maptensor } }; "old": Value { required tag; required tensor }."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    L = descriptor_pb2.FieldDescriptorProto
    pkg = f"conftest_ms_{schema}_{int(packed)}"
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{pkg}.proto", package=pkg, syntax="proto2")
    t = fdp.message_type.add(name="TensorProto")
    dims = t.field.add(name="dims", number=1, type=L.TYPE_INT64, label=L.LABEL_REPEATED)
    if packed:
        dims.options.packed = True
    t.field.add(name="tensor_type", number=2, type=L.TYPE_STRING, label=L.LABEL_REQUIRED)
    t.field.add(name="tensor_content", number=3, type=L.TYPE_BYTES, label=L.LABEL_REQUIRED)
    c = fdp.message_type.add(name="Checkpoint")
    v = c.nested_type.add(name="Value")
    v.field.add(name="tag", number=1, type=L.TYPE_STRING, label=L.LABEL_REQUIRED)
    if schema == "new":
        m = fdp.message_type.add(name="MapTensorProto")
        m.field.add(name="tensor", number=1, type=L.TYPE_MESSAGE, type_name=f".{pkg}.TensorProto",
                    label=L.LABEL_REPEATED)
        v.oneof_decl.add(name="value")
        v.field.add(name="tensor", number=2, type=L.TYPE_MESSAGE, type_name=f".{pkg}.TensorProto",
                    label=L.LABEL_OPTIONAL, oneof_index=0)
        v.field.add(name="maptensor", number=3, type=L.TYPE_MESSAGE, type_name=f".{pkg}.MapTensorProto",
                    label=L.LABEL_OPTIONAL, oneof_index=0)
    else:
        v.field.add(name="tensor", number=2, type=L.TYPE_MESSAGE, type_name=f".{pkg}.TensorProto",
                    label=L.LABEL_REQUIRED)
    c.field.add(name="value", number=1, type=L.TYPE_MESSAGE, type_name=f".{pkg}.Checkpoint.Value",
                label=L.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{pkg}.Checkpoint"))


def write_ms_ckpt(path, entries, *, schema="new", packed=False, crc=True, slices=None):
    """Write ``entries`` [(tag, bytes-or-array, tensor_type, dims)] as MindSpore's ``_exec_save`` does: one
    serialized ``Checkpoint`` per entry (per slice), concatenated; ``slices[tag]`` = byte chunk size for
    sliced tensors; trailer b"crc_num" + 10-byte big-endian running CRC-32 when ``crc``. Returns the path."""
    import binascii
    from pathlib import Path

    cls = _ms_checkpoint_class(schema, packed)
    slices = slices or {}
    crc_num = 0
    with open(path, "wb") as f:
        for tag, data, ttype, dims in entries:
            content = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
            step = slices.get(tag, max(len(content), 1))
            for i in range(0, max(len(content), 1), step):
                msg = cls()
                value = msg.value.add()
                value.tag = tag
                value.tensor.dims.extend(dims)
                value.tensor.tensor_type = ttype
                value.tensor.tensor_content = content[i:i + step]
                out = msg.SerializeToString()
                crc_num = binascii.crc32(out, crc_num)
                f.write(out)
        if crc:
            f.write(b"crc_num" + crc_num.to_bytes(10, byteorder="big"))
    return Path(path)
