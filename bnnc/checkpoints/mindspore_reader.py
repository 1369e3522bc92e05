"""MindSpore ``.ckpt`` files read without MindSpore (``shared/spec/methods.md`` §10).

The file is a concatenation of serialized ``Checkpoint`` protobuf messages (proto2)::

    message Checkpoint { message Value { required string tag = 1;
                                         oneof value { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
                         repeated Value value = 1; }
    message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }

(older MindSpore: ``Value { required string tag = 1; required TensorProto tensor = 2; }`` — the same wire
bytes). It is decoded here straight from the protobuf wire format: no protobuf dependency, no generated code.

* Consecutive ``Value``s with the same tag are slices of one large tensor: their contents are concatenated.
* ``tensor_content`` is the little-endian C-order bytes; ``dims = [0]`` with one element is a scalar.
* Type names: ``Float16/32/64``, ``Int8..64``, ``UInt8..64`` (``Uint8..`` in old versions), ``Bool``,
  ``BFloat16`` (returned as float32), ``str`` (bookkeeping strings). Matching is case-insensitive.
* Optional trailer ``b"crc_num"`` + 10-byte big-endian CRC-32 of everything before it (MindSpore ≥ 2 with
  ``crc_check=True``): verified when present.
* Optimizer state and training bookkeeping (``moments.*``, ``learning_rate``, ``global_step`` …) are left
  out unless ``include_optimizer=True``.
"""

from __future__ import annotations

import binascii
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

__all__ = ["read_mindspore", "is_optimizer_entry", "MINDSPORE_TYPES", "CRC_MARK"]

CRC_MARK = b"crc_num"
_CRC_TRAILER = len(CRC_MARK) + 10

#: MindSpore ``tensor_type`` names (lower-cased) → numpy dtypes. ``bfloat16`` is decoded separately.
MINDSPORE_TYPES: dict[str, np.dtype] = {
    "float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"), "int16": np.dtype("<i2"), "int32": np.dtype("<i4"), "int64": np.dtype("<i8"),
    "uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4"), "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"), "bool_": np.dtype("?"),
    "bfloat16": np.dtype("<u2"),
}

# Optimizer state / bookkeeping written by MindSpore optimizers and ModelCheckpoint. Only unambiguous
# prefixes: an entry this misses is reported by name by the strict importer, never silently dropped.
_OPTIMIZER_PREFIXES = ("moments.", "moment1.", "moment2.", "moment3.", "accum.", "mean_grad.", "mean_square.",
                       "adam_m.", "adam_v.", "exp_avg.", "exp_avg_sq.", "vhat.")
_OPTIMIZER_NAMES = frozenset({
    "learning_rate", "momentum", "global_step", "beta1_power", "beta2_power", "epoch_num", "step_num",
    "current_iterator_step", "last_overflow_iterator_step", "loss_scale", "scale_sense",
})


def is_optimizer_entry(name: str) -> bool:
    """True for optimizer state (``moments.<param>``, ``moment1.<param>`` …) and training bookkeeping
    (``learning_rate``, ``momentum``, ``global_step``, ``epoch_num`` …) of a MindSpore checkpoint."""
    return name in _OPTIMIZER_NAMES or name.startswith(_OPTIMIZER_PREFIXES)


class _Truncated(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Truncated("a varint runs past the end of its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("a varint is longer than 10 bytes")


def _fields(buf: memoryview, pos: int, end: int, where: str):
    """Yield (field number, wire type, value) over one message; value: int (varint/fixed) or (start, stop)."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise ValueError(f"{where}: field number 0 (not a protobuf message)")
        if wt == 0:
            value, pos = _varint(buf, pos, end)
        elif wt == 1:
            if pos + 8 > end:
                raise _Truncated(f"{where}: a fixed64 field runs past the end")
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Truncated(f"{where}: field {field} needs {n} bytes, {end - pos} left")
            value, pos = (pos, pos + n), pos + n
        elif wt == 5:
            if pos + 4 > end:
                raise _Truncated(f"{where}: a fixed32 field runs past the end")
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"{where}: invalid wire type {wt} (field {field})")
        yield field, wt, value


def _utf8(buf: memoryview, span, what: str) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8") from None


def _parse_tensor(buf: memoryview, start: int, end: int, tag: str) -> dict:
    dims: list[int] = []
    ttype = None
    content = None
    for field, wt, value in _fields(buf, start, end, f"tensor {tag!r}"):
        if field == 1:
            if wt == 0:
                dims.append(value)
            elif wt == 2:  # packed
                p, e = value
                while p < e:
                    d, p = _varint(buf, p, e)
                    dims.append(d)
            else:
                raise ValueError(f"tensor {tag!r}: dims has wire type {wt}")
        elif field == 2 and wt == 2:
            ttype = _utf8(buf, value, f"tensor {tag!r}: tensor_type")
        elif field == 3 and wt == 2:
            content = value
        # other fields: unknown, skipped (protobuf rules)
    if ttype is None or content is None:
        missing = [n for n, v in (("tensor_type", ttype), ("tensor_content", content)) if v is None]
        raise ValueError(f"tensor {tag!r}: required field(s) {', '.join(missing)} missing")
    # int64 dims are varints of two's complement values
    dims = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]
    return {"dims": dims, "type": ttype, "content": [content]}


def _parse_value(buf: memoryview, start: int, end: int, index: int) -> tuple[str, dict | None]:
    tag = None
    tensor_span = None
    is_map = False
    for field, wt, value in _fields(buf, start, end, f"entry #{index}"):
        if field == 1 and wt == 2:
            tag = _utf8(buf, value, f"entry #{index}: tag")
        elif field == 2 and wt == 2:
            tensor_span = value
        elif field == 3 and wt == 2:
            is_map = True
    if tag is None:
        raise ValueError(f"entry #{index}: required field 'tag' missing")
    if is_map:
        raise ValueError(f"entry {tag!r} is a MapTensor (MapParameter), which bnnc does not import")
    if tensor_span is None:
        raise ValueError(f"entry {tag!r}: no tensor")
    return tag, _parse_tensor(buf, tensor_span[0], tensor_span[1], tag)


def _decode(tag: str, entry: dict, buf: memoryview):
    ttype = entry["type"]
    dims = entry["dims"]
    data = b"".join(bytes(buf[s:e]) for s, e in entry["content"])
    key = ttype.lower()
    if key == "str" or key == "string":
        return np.array(data.decode("utf-8", errors="replace"))
    if key == "int4":
        raise ValueError(f"tensor {tag!r}: tensor_type Int4 is not supported")
    try:
        dtype = MINDSPORE_TYPES[key]
    except KeyError:
        raise ValueError(f"tensor {tag!r}: unknown tensor_type {ttype!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"tensor {tag!r}: negative dimension in {dims}")
    if len(data) % dtype.itemsize:
        raise ValueError(f"tensor {tag!r}: {len(data)} bytes is not a whole number of {ttype} elements")
    count = len(data) // dtype.itemsize
    if dims == [0] and count == 1:
        shape: tuple[int, ...] = ()  # MindSpore writes scalars with dims [0]
    elif not dims:
        shape = () if count == 1 else (count,)
    else:
        shape = tuple(dims)
    expected = int(np.prod(shape, dtype=np.int64))
    if expected != count:
        raise ValueError(f"tensor {tag!r}: shape {list(shape)} ({ttype}) needs {expected} elements, the file "
                         f"holds {count} (truncated or inconsistent)")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if key == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.copy()


def read_mindspore(path, *, include_optimizer: bool = False, verify_crc: bool = True) -> dict[str, np.ndarray]:
    """Read a MindSpore ``.ckpt`` into ``{name: numpy array}`` (file order).

    Optimizer state and bookkeeping are left out unless ``include_optimizer``; string entries are returned
    (as 0-d ``np.str_`` arrays) only then. Raises :class:`~bnnc.errors.ModelFormatError` naming the file and
    the problem for truncated, corrupted (CRC mismatch) or unsupported files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    raw = path.read_bytes()
    if not raw:
        raise ModelFormatError(f"{path}: empty file, not a MindSpore checkpoint")
    if len(raw) >= _CRC_TRAILER and raw[-_CRC_TRAILER:-10] == CRC_MARK:
        body = raw[:-_CRC_TRAILER]
        stored = int.from_bytes(raw[-10:], "big")
        if verify_crc:
            actual = binascii.crc32(body, 0)
            if actual != stored:
                raise ModelFormatError(f"{path}: CRC-32 check failed (file says {stored:#010x}, contents give "
                                       f"{actual:#010x}): the checkpoint is corrupted")
    else:
        body = raw
    buf = memoryview(body)
    entries: dict[str, dict] = {}
    order: list[str] = []
    last = None
    index = 0
    try:
        for field, wt, value in _fields(buf, 0, len(buf), "checkpoint"):
            if field != 1 or wt != 2:
                raise ValueError(f"unexpected top-level field {field} (wire type {wt}) at entry #{index}")
            tag, entry = _parse_value(buf, value[0], value[1], index)
            index += 1
            if tag == last:  # a slice of the previous tensor
                prev = entries[tag]
                if prev["type"] != entry["type"] or prev["dims"] != entry["dims"]:
                    raise ValueError(f"slices of {tag!r} disagree on type or dims")
                prev["content"].extend(entry["content"])
                continue
            if tag in entries:
                raise ValueError(f"entry {tag!r} appears twice, not as consecutive slices")
            entries[tag] = entry
            order.append(tag)
            last = tag
    except _Truncated as e:
        raise ModelFormatError(f"{path}: truncated MindSpore checkpoint ({e}; {index} complete entries before, "
                               f"the last {last!r})") from None
    except ValueError as e:
        raise ModelFormatError(f"{path}: not a valid MindSpore checkpoint ({e}); encrypted checkpoints "
                               "are not supported") from None
    if not order:
        raise ModelFormatError(f"{path}: no tensors found, not a MindSpore checkpoint")
    out: dict[str, np.ndarray] = {}
    for tag in order:
        entry = entries[tag]
        is_str = entry["type"].lower() in ("str", "string")
        if not include_optimizer and (is_str or is_optimizer_entry(tag)):
            continue
        try:
            out[tag] = _decode(tag, entry, buf)
        except ValueError as e:
            raise ModelFormatError(f"{path}: {e}") from None
    return out
