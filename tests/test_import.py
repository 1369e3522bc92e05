"""Checkpoint import: PyTorch (the published AdaBin ResNet-20) and MindSpore (.ckpt written here in the real
protobuf wire format through google.protobuf, independently of bnnc's hand-written decoder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnnc.checkpoints import (detect_format, import_checkpoint, read_checkpoint, read_mindspore, read_torch,
                              convert_checkpoint)
from bnnc.errors import ModelFormatError

from .conftest import write_ms_ckpt

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "adabin_resnet20_cifar10" / "model.th"
if not FIXTURE.is_file():  # the repo may be checked out elsewhere than beside shared/
    FIXTURE = Path("/work/shared/fixtures/adabin_resnet20_cifar10/model.th")

pytestmark = pytest.mark.skipif(not FIXTURE.is_file(), reason="AdaBin ResNet-20 fixture not available")


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw():
    """The fixture's state dict exactly as stored (``module.`` keys)."""
    return torch.load(FIXTURE, weights_only=True, map_location="cpu")["state_dict"]


@pytest.fixture(scope="module")
def net():
    return import_checkpoint(FIXTURE, "adabin_resnet20")


def ref_forward(sd, x):
    """The official AdaBin ResNet-20 forward (EC resnet20_1w1a, methods.md §1.1–1.4) in functional torch ops
    on the raw state dict: torch.sign (sign(0) = 0), activations α·(sign((x−β)/α) + β), weights
    std·sign(Ŵ) + mean (population std), Maxout, option-A shortcuts, GAP → BN1d → Linear."""

    def g(k):
        return sd["module." + k]

    def bn(x, p):
        return F.batch_norm(x, g(p + ".running_mean"), g(p + ".running_var"), g(p + ".weight"), g(p + ".bias"),
                            False, 0.0, 1e-5)

    def maxout(x, p):
        pos, neg = g(p + ".pos_scale").view(1, -1, 1, 1), g(p + ".neg_scale").view(1, -1, 1, 1)
        return pos * F.relu(x) - neg * F.relu(-x)

    def adabin_conv(x, p, stride):
        a, b = g(p + ".binary_a.alpha_a"), g(p + ".binary_a.beta_a")
        xb = a * (torch.sign((x - b) / a) + b)
        w = g(p + ".weight")
        mean = w.mean((1, 2, 3), keepdim=True)
        std = torch.sqrt(((w - mean) ** 2).sum((1, 2, 3), keepdim=True) / w[0].numel())
        wb = std * torch.sign((w - mean) / std) + mean
        return F.conv2d(xb, wb, None, stride, 1)

    out = maxout(bn(F.conv2d(x, g("conv1.weight"), None, 1, 1), "bn1"), "nonlinear1")
    for s, planes in enumerate((16, 32, 64), 1):
        for j in range(3):
            p = f"layer{s}.{j}"
            stride = 2 if s > 1 and j == 0 else 1
            sc = out if stride == 1 else F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))
            h = maxout(bn(adabin_conv(out, p + ".conv1", stride), p + ".bn1") + sc, p + ".nonlinear1")
            out = maxout(bn(adabin_conv(h, p + ".conv2", 1), p + ".bn2") + h, p + ".nonlinear2")
    out = F.avg_pool2d(out, out.shape[3]).flatten(1)
    out = F.batch_norm(out, g("bn2.running_mean"), g("bn2.running_var"), g("bn2.weight"), g("bn2.bias"), False,
                       0.0, 1e-5)
    return F.linear(out, g("linear.weight"), g("linear.bias"))


def _double(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


# ------------------------------------------------------------------------------------ MindSpore writer


MS_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
SLICED = "layer3.2.conv2.weight"


def ms_adabin_entries(raw, scalar_dims=(0,)):
    """The AdaBin ResNet-20 parameters under MindSpore names and shapes (methods.md §10.3): no ``module.``,
    BN gamma/beta/moving_*, no num_batches_tracked, Maxout (1, C, 1, 1), scalars with dims [0]."""
    out = []
    for k, v in raw.items():
        k = k.removeprefix("module.")
        owner, leaf = k.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        if owner.rsplit(".", 1)[-1].startswith("bn"):
            leaf = MS_BN[leaf]
        a = v.numpy()
        if leaf in ("neg_scale", "pos_scale"):
            a = a.reshape(1, -1, 1, 1)
        out.append((f"{owner}.{leaf}", a, "Float32", list(a.shape) if a.ndim else list(scalar_dims)))
    return out


def optimizer_entries(raw):
    """What ModelCheckpoint adds with a Momentum optimizer, plus bookkeeping and a string entry."""
    w = raw["module.conv1.weight"].numpy()
    return [
        ("moments.conv1.weight", np.zeros_like(w), "Float32", list(w.shape)),
        ("moments.layer1.0.conv1.binary_a.alpha_a", np.zeros((), np.float32), "Float32", [0]),
        ("learning_rate", np.array([0.1], np.float32), "Float32", [1]),
        ("momentum", np.array(0.9, np.float32), "Float32", [0]),
        ("global_step", np.array([1000], np.int32), "Int32", [1]),
        ("epoch_num", np.array([400], np.int32), "Int32", [1]),
        ("step_num", np.array([1000], np.int32), "Int32", [1]),
        ("net_name", "resnet20".encode(), "str", [0]),
    ]


# -------------------------------------------------------------------------------------------- PyTorch


def test_fixture_imports_strictly(net, raw):
    from bnnc import models
    from bnnc.models.adabin import AdaBinResNet20

    assert isinstance(net, AdaBinResNet20) and not net.training
    assert net.bnnc_name == "adabin_resnet20" and net.bnnc_source_format == "torch"
    recipe = models.get_recipe("adabin_resnet20")
    assert recipe.dataset == "cifar10" and recipe.input_shape == (1, 3, 32, 32)
    sd = net.state_dict()
    assert len(sd) == len(raw) == 195
    for k, v in raw.items():
        ours = k.removeprefix("module.").replace(".binary_a.", ".input_quantizer.")
        assert torch.equal(sd[ours], v), k
    assert net.layer2[0].shortcut.pad == 8 and net.layer3[0].shortcut.pad == 16
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules()) == 1


def test_forward_matches_official_formulas(net, raw):
    torch.manual_seed(0)
    ref = _double(raw)
    net64 = import_checkpoint(FIXTURE).double()
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = net64(x), ref_forward(ref, x)
    assert ours.shape == (32, 10)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    # float32: the same up to rounding, except where rounding flips a binarization (rare, per sample)
    x32 = x.float()
    with torch.no_grad():
        a, b = net(x32), ref_forward(raw, x32)
    close = ((a - b).abs().amax(1) < 1e-3).float().mean().item()
    assert close >= 0.9, close


def test_wrappers_prefixes_legacy_and_cuda_tagged(tmp_path, raw, net):
    plain = {k.removeprefix("module."): v for k, v in raw.items()}
    files = {
        "bare.pth": plain,
        "model.pth.tar": {"epoch": 3, "model": {"module." + k: v for k, v in plain.items()}},
        "net.pt": {"net": plain, "optimizer": {"state": {}, "param_groups": []}},
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    torch.save({"state_dict": raw}, tmp_path / "legacy.th", _use_new_zipfile_serialization=False)
    # a file whose storages say "cuda:0" (as saved on a GPU), loaded through map_location
    entry = (0, lambda storage: "cuda:0", lambda storage, location: None)
    torch.serialization._package_registry.insert(0, entry)
    try:
        torch.save({"state_dict": raw}, tmp_path / "cuda.th")
    finally:
        torch.serialization._package_registry.remove(entry)
    with open(tmp_path / "cuda.th", "rb") as f:
        assert b"cuda:0" in f.read()
    for name in [*files, "legacy.th", "cuda.th"]:
        sd = read_torch(tmp_path / name)
        assert set(sd) == set(plain), name
        assert all(v.device.type == "cpu" for v in sd.values())
        out = import_checkpoint(tmp_path / name)
        assert torch.equal(out.linear.weight, net.linear.weight), name


def test_missing_extra_and_misshapen_reported_together(tmp_path, raw):
    bad = dict(raw)
    del bad["module.layer1.0.bn1.running_var"]
    bad["module.layer9.0.extra.weight"] = torch.zeros(3)
    bad["module.linear.weight"] = torch.zeros(10, 32)
    torch.save({"state_dict": bad}, tmp_path / "bad.th")
    with pytest.raises(ModelFormatError) as e:
        import_checkpoint(tmp_path / "bad.th")
    msg = str(e.value)
    assert "bad.th" in msg and "adabin_resnet20" in msg
    assert "layer1.0.bn1.running_var" in msg
    assert "layer9.0.extra.weight" in msg  # (the reader has removed `module.`)
    assert "linear.weight" in msg and "(10, 32)" in msg and "(10, 64)" in msg


def _touch(path):  # would run at unpickling time if the loader executed code
    Path(path).write_text("code ran")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _touch, (self.path,)


def test_pickled_code_is_refused_without_running(tmp_path, raw):
    marker = tmp_path / "marker"
    torch.save({"state_dict": raw, "extra": _Payload(str(marker))}, tmp_path / "evil.th")
    with pytest.raises(ModelFormatError, match=r"evil\.th: refused"):
        read_torch(tmp_path / "evil.th")
    assert not marker.exists()
    torch.save(import_checkpoint(FIXTURE), tmp_path / "whole_module.pth")  # a pickled nn.Module (custom classes)
    with pytest.raises(ModelFormatError, match=r"whole_module\.pth: refused"):
        import_checkpoint(tmp_path / "whole_module.pth")


def test_truncated_and_garbage_torch_files(tmp_path):
    data = FIXTURE.read_bytes()
    (tmp_path / "cut.th").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match=r"cut\.th: .*(truncated|corrupted)"):
        import_checkpoint(tmp_path / "cut.th")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty"):
        import_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "notes.txt").write_bytes(b"hello")
    with pytest.raises(ModelFormatError, match="unknown checkpoint format"):
        import_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        import_checkpoint(tmp_path / "nope.th")


def test_convert_to_bnnc_checkpoint(tmp_path, net):
    from bnnc.train import load_checkpoint

    out = convert_checkpoint(FIXTURE, tmp_path / "adabin.pt")
    again = load_checkpoint(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ MindSpore


@pytest.mark.parametrize("schema,packed", [("new", False), ("old", False), ("new", True)])
def test_mindspore_adabin_matches_pytorch_import(tmp_path, raw, net, schema, packed):
    entries = ms_adabin_entries(raw, scalar_dims=(0,) if schema == "new" else ())
    entries = entries[:5] + optimizer_entries(raw)[:4] + entries[5:] + optimizer_entries(raw)[4:]
    path = write_ms_ckpt(tmp_path / "adabin.ckpt", entries, schema=schema, packed=packed,
                         slices={SLICED: 1001})  # uneven byte chunks, across element boundaries
    raw_bytes = path.read_bytes()
    assert raw_bytes.count(SLICED.encode()) == -(-64 * 64 * 9 * 4 // 1001) and raw_bytes[-17:-10] == b"crc_num"
    assert detect_format(path) == "mindspore"
    tensors = read_mindspore(path)
    assert "moments.conv1.weight" not in tensors and "learning_rate" not in tensors and "net_name" not in tensors
    assert tensors["nonlinear1.pos_scale"].shape == (1, 16, 1, 1)
    assert tensors["layer1.0.conv1.binary_a.alpha_a"].shape == ()
    np.testing.assert_array_equal(tensors[SLICED], raw["module." + SLICED].numpy())
    everything = read_mindspore(path, include_optimizer=True)
    assert str(everything["net_name"]) == "resnet20" and int(everything["global_step"][0]) == 1000
    ms_net = import_checkpoint(path)
    assert ms_net.bnnc_source_format == "mindspore"
    theirs, ours = ms_net.state_dict(), net.state_dict()
    assert set(theirs) == set(ours)
    for k in ours:
        if k.endswith("num_batches_tracked"):
            assert int(theirs[k]) == 0
        else:
            assert torch.equal(theirs[k], ours[k]), k
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ms_net(x), net(x), rtol=0, atol=0)


def test_mindspore_without_crc_and_scalars_as_shape_1(tmp_path, raw, net):
    entries = [(t, a, ty, [1] if a.ndim == 0 else d) for t, a, ty, d in ms_adabin_entries(raw)]
    path = write_ms_ckpt(tmp_path / "nocrc.ckpt", entries, crc=False)
    assert path.read_bytes()[-17:-10] != b"crc_num"
    assert read_mindspore(path)["layer1.0.conv1.binary_a.beta_a"].shape == (1,)
    ms_net = import_checkpoint(path)
    assert torch.equal(ms_net.layer1[0].conv1.input_quantizer.beta_a, net.layer1[0].conv1.input_quantizer.beta_a)


def test_mindspore_type_names_old_and_new(tmp_path):
    vals = {
        "f16": (np.array([1.5, -2.0], np.float16), ["Float16"]),
        "f32": (np.arange(6, dtype=np.float32).reshape(2, 3), ["Float32"]),
        "f64": (np.array([np.pi]), ["Float64"]),
        "i8": (np.array([-3, 4], np.int8), ["Int8"]),
        "i16": (np.array([-300], np.int16), ["Int16"]),
        "i32": (np.array([1 << 20], np.int32), ["Int32"]),
        "i64": (np.array([-(1 << 40)], np.int64), ["Int64"]),
        "u8": (np.array([200, 7], np.uint8), ["UInt8", "Uint8"]),
        "u16": (np.array([60000], np.uint16), ["UInt16", "Uint16"]),
        "u32": (np.array([4000000000], np.uint32), ["UInt32", "Uint32"]),
        "u64": (np.array([1 << 63], np.uint64), ["UInt64", "Uint64"]),
        "b": (np.array([True, False]), ["Bool"]),
    }
    entries, expect = [], {}
    for name, (a, types) in vals.items():
        for ty in types:
            entries.append((f"{name}_{ty}", a, ty, list(a.shape)))
            expect[f"{name}_{ty}"] = a
    bf16 = np.array([1.0, -2.5, 3.0e38], np.float32)
    entries.append(("bf16", (bf16.view(np.uint32) >> 16).astype(np.uint16), "BFloat16", [3]))
    for schema in ("new", "old"):
        got = read_mindspore(write_ms_ckpt(tmp_path / f"types_{schema}.ckpt", entries, schema=schema))
        for k, a in expect.items():
            assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
            np.testing.assert_array_equal(got[k], a)
        np.testing.assert_allclose(got["bf16"], bf16, rtol=1e-2)
    write_ms_ckpt(tmp_path / "odd.ckpt", [("x", np.zeros(2, np.float32), "Complex64", [2])])
    with pytest.raises(ModelFormatError, match="unknown tensor_type 'Complex64'"):
        read_mindspore(tmp_path / "odd.ckpt")


def test_mindspore_truncated_corrupted_and_inconsistent(tmp_path, raw):
    good = write_ms_ckpt(tmp_path / "good.ckpt", ms_adabin_entries(raw)).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelFormatError, match=r"cut\.ckpt: truncated"):
        import_checkpoint(tmp_path / "cut.ckpt")
    flipped = bytearray(good)
    flipped[len(good) // 3] ^= 0x01  # inside tensor data: still parses, CRC catches it
    (tmp_path / "flip.ckpt").write_bytes(bytes(flipped))
    with pytest.raises(ModelFormatError, match=r"flip\.ckpt: CRC-32 check failed"):
        read_mindspore(tmp_path / "flip.ckpt")
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    (tmp_path / "badcrc.ckpt").write_bytes(bytes(bad_crc))
    with pytest.raises(ModelFormatError, match="CRC-32 check failed"):
        import_checkpoint(tmp_path / "badcrc.ckpt")
    # dims promise more elements than the content holds
    write_ms_ckpt(tmp_path / "short.ckpt", [("w", np.zeros(5, np.float32), "Float32", [2, 3])])
    with pytest.raises(ModelFormatError, match=r"short\.ckpt: tensor 'w': shape \[2, 3\].*holds 5"):
        read_mindspore(tmp_path / "short.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"\x00" * 20)
    with pytest.raises(ModelFormatError, match=r"junk\.ckpt"):
        read_mindspore(tmp_path / "junk.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty"):
        import_checkpoint(tmp_path / "empty.ckpt")


def test_mindspore_strict_mapping_names_problems(tmp_path, raw):
    entries = [e for e in ms_adabin_entries(raw) if e[0] != "bn2.moving_variance"]
    entries.append(("layer1.0.conv1.binary_a.gamma_a", np.zeros((), np.float32), "Float32", [0]))
    entries = [(t, a.reshape(-1, 1) if t == "linear.bias" else a, ty, [10, 1] if t == "linear.bias" else d)
               for t, a, ty, d in entries]
    entries = [(t, np.zeros((1, 8, 1, 1), np.float32), ty, [1, 8, 1, 1]) if t == "nonlinear1.pos_scale"
               else (t, a, ty, d) for t, a, ty, d in entries]
    path = write_ms_ckpt(tmp_path / "strict.ckpt", entries)
    with pytest.raises(ModelFormatError) as e:
        import_checkpoint(path)
    msg = str(e.value)
    assert "bn2.running_var" in msg  # missing (model name)
    assert "layer1.0.conv1.binary_a.gamma_a" in msg  # unexpected (checkpoint name)
    assert "nonlinear1.pos_scale" in msg and "(1, 8, 1, 1)" in msg  # misshapen
    assert "linear.bias" not in msg  # (10, 1) squeezes onto (10,)


def test_read_checkpoint_dispatch(tmp_path, raw):
    sd, fmt = read_checkpoint(FIXTURE)
    assert fmt == "torch" and "conv1.weight" in sd
    torch.save({"state_dict": raw}, tmp_path / "lightning_style.ckpt")  # a torch zip despite the suffix
    assert detect_format(tmp_path / "lightning_style.ckpt") == "torch"
    assert import_checkpoint(tmp_path / "lightning_style.ckpt").bnnc_source_format == "torch"


def test_import_into_a_model_instance(net):
    from bnnc.models.adabin import AdaBinResNet20

    fresh = AdaBinResNet20()  # built directly: no registry name, mapping found from its class
    out = import_checkpoint(FIXTURE, fresh)
    assert out is fresh and not out.training
    assert torch.equal(out.layer3[2].conv2.input_quantizer.alpha_a, net.layer3[2].conv2.input_quantizer.alpha_a)
