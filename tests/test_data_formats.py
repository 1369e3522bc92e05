"""build_dataset / make_loader: real file formats written in tmp dirs, decoded exactly; transforms against closed
forms; deterministic loaders; the restricted unpickler refuses code."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from bnnc.data import (
    CenterCrop,
    Lighting,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToNormalizedTensor,
    build_dataset,
    load_data_pickle,
    load_dataset,
    make_loader,
)
from bnnc.errors import DatasetNotFoundError, ModelFormatError

# spec methods.md "General conventions": CIFAR normalisation = ImageNet mean/std
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# AlexNet / fb.resnet.torch PCA of ImageNet RGB: eigenvalues and eigenvectors (columns)
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def known_images(n, offset=0):
    """uint8 [n, 32, 32, 3] with pixel (k, y, x, c) = (7k + 3y + 5x + 11c) mod 256: every value known."""
    k, y, x, c = np.meshgrid(np.arange(n) + offset, np.arange(32), np.arange(32), np.arange(3), indexing="ij")
    return ((7 * k + 3 * y + 5 * x + 11 * c) % 256).astype(np.uint8)


def rows(images):
    """The official CIFAR row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_cifar10_py(root, per_batch=3, protocol=2):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        imgs = known_images(per_batch, offset=b * per_batch)
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        batch = {b"batch_label": b"training batch", b"labels": labels, b"data": rows(imgs),
                 b"filenames": [b"img_%d.png" % i for i in range(per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return d


def test_cifar10_python_batches_decode_exactly(tmp_path):
    write_cifar10_py(tmp_path)
    ds = build_dataset("cifar10", "train", tmp_path, augment=False)
    assert (ds.name, ds.num_classes, len(ds)) == ("cifar10", 10, 15)
    assert np.array_equal(ds.images, known_images(15))  # batches 1..5 in order
    x, y = ds[7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 7
    want = (known_images(15)[7].transpose(2, 0, 1) / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    np.testing.assert_allclose(x.numpy(), want, atol=1e-5)
    test = build_dataset("cifar10", "test", tmp_path / "cifar-10-batches-py")  # the batch folder itself works too
    assert len(test) == 3 and np.array_equal(test.images, known_images(3, offset=15))
    assert [test[i][1] for i in range(3)] == [5, 6, 7]


def test_python2_numpy_names_and_protocol5_are_accepted(tmp_path):
    imgs = known_images(2)
    blob = pickle.dumps({b"data": rows(imgs), b"labels": [3, 4]}, protocol=2)
    assert b"numpy._core.multiarray" in blob
    py2 = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # how the 2009 cPickle files name it
    (tmp_path / "py2").write_bytes(py2)
    (tmp_path / "p5").write_bytes(pickle.dumps({b"data": rows(imgs), b"labels": [3, 4]}, protocol=5))
    for name in ("py2", "p5"):
        d = load_data_pickle(tmp_path / name)
        assert np.array_equal(d[b"data"], rows(imgs)) and d[b"labels"] == [3, 4]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (d / name).write_bytes(evil)
    with pytest.raises(ModelFormatError, match=r"data_batch_1.*(posix|os)\.system.*not allowed"):
        build_dataset("cifar10", "train", tmp_path)
    assert not marker.exists()
    pickle.loads(evil)  # the control: the ordinary unpickler does run the payload
    assert marker.exists()
    (tmp_path / "eval").write_bytes(pickle.dumps(eval, protocol=4))
    with pytest.raises(ModelFormatError, match="global 'builtins.eval' is not allowed"):
        load_data_pickle(tmp_path / "eval")


def test_cifar100_python_uses_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    imgs = known_images(4)
    for name in ("train", "test"):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rows(imgs), b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [19, 0, 5, 1]}, f,
                        protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"c%d" % i for i in range(100)]}, f, protocol=2)
    ds = build_dataset("cifar100", "test", tmp_path)
    assert ds.num_classes == 100 and ds.classes[42] == "c42"
    assert [ds[i][1] for i in range(4)] == [99, 0, 42, 7]
    assert np.array_equal(ds.images, imgs)


def test_cifar_binary_records(tmp_path):
    imgs = known_images(5)
    labels = np.array([9, 0, 3, 3, 1], dtype=np.uint8)
    d10 = tmp_path / "c10" / "cifar-10-batches-bin"
    d10.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (d10 / name).write_bytes(np.concatenate([labels[:, None], rows(imgs)], axis=1).tobytes())
    ds = build_dataset("cifar10", "train", tmp_path / "c10")
    assert len(ds) == 25 and np.array_equal(ds.images[5:10], imgs)
    assert ds.targets.tolist() == labels.tolist() * 5
    d100 = tmp_path / "c100" / "cifar-100-binary"
    d100.mkdir(parents=True)
    coarse, fine = np.array([1, 2, 3, 4, 5], np.uint8), np.array([10, 20, 30, 40, 99], np.uint8)
    for name in ("train.bin", "test.bin"):
        (d100 / name).write_bytes(np.concatenate([coarse[:, None], fine[:, None], rows(imgs)], axis=1).tobytes())
    ds = build_dataset("cifar100", "val", tmp_path / "c100", augment=False)
    assert ds.targets.tolist() == fine.tolist() and np.array_equal(ds.images, imgs)
    np.testing.assert_allclose(ds[4][0][2, 0, 0].item(), (imgs[4, 0, 0, 2] / 255 - MEAN[2]) / STD[2], atol=1e-6)


def test_truncated_and_missing_files_are_clear_errors(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    rec = np.zeros((2, 3073), np.uint8).tobytes()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)]:
        (d / name).write_bytes(rec)
    (d / "data_batch_3.bin").write_bytes(rec[:-10])
    with pytest.raises(ModelFormatError, match=r"data_batch_3\.bin: 6136 bytes .* 3073-byte .*truncated"):
        build_dataset("cifar10", "train", tmp_path)
    (d / "data_batch_4.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_4\.bin"):
        build_dataset("cifar10", "train", tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python.*cifar-100-binary"):
        build_dataset("cifar100", "train", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build_dataset("cifar10", "train", tmp_path / "nope")
    (d / "test_batch.bin").write_bytes(bytes([10]) + bytes(3072))  # label 10 in a 10-class set
    with pytest.raises(ModelFormatError, match="labels outside 0..9"):
        build_dataset("cifar10", "test", tmp_path)
    bad = tmp_path / "py" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    (bad / "test_batch").write_bytes(pickle.dumps({b"data": rows(known_images(1))}, protocol=2)[:-7])
    with pytest.raises(ModelFormatError, match="test_batch: not a valid data pickle"):
        build_dataset("cifar10", "test", tmp_path / "py")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("svhn", "train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        build_dataset("cifar10", "dev", tmp_path)


def test_normalization_numbers():
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = (124, 116, 104)  # ≈ 255·mean
    img[1, 1] = 255
    t = ToNormalizedTensor(MEAN, STD)(img, None)
    want = (img.transpose(2, 0, 1) / 255.0 - MEAN[:, None, None]) / STD[:, None, None]
    np.testing.assert_allclose(t.numpy(), want, atol=1e-6)
    np.testing.assert_allclose(t[:, 1, 1].numpy(), (1 - MEAN) / STD, atol=1e-6)  # 2.2489, 2.4286, 2.64
    np.testing.assert_allclose(t[:, 1, 1].numpy(), [2.2489, 2.4286, 2.64], atol=1e-4)
    unit = ToNormalizedTensor(MEAN, STD)((img / 255.0).astype(np.float32), None)  # float input is in [0, 1]
    np.testing.assert_allclose(unit.numpy(), want, atol=1e-6)


def test_random_crop_and_flip_geometry():
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([y * 8 + 1, x * 8 + 1, np.full_like(y, 200)], -1).astype(np.uint8)  # (row, col) readable
    offsets, flips = set(), 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        out = RandomHorizontalFlip()(RandomCrop(32, 4)(img, rng), rng)
        inside = out[..., 2] == 200
        src_y, src_x = (out[..., 0].astype(int) - 1) // 8, (out[..., 1].astype(int) - 1) // 8
        u, v = np.nonzero(inside)
        dy = np.unique(src_y[inside] - u)
        assert len(dy) == 1
        flipped = len(np.unique(src_x[inside] + v)) == 1
        dx = np.unique(src_x[inside] + v - 31) if flipped else np.unique(src_x[inside] - v)
        assert len(dx) == 1 and -4 <= dy[0] <= 4 and -4 <= dx[0] <= 4
        assert not inside.all() or (dy[0] == 0 and dx[0] == 0)
        assert np.all(out[~inside] == 0)  # zero padding
        assert inside.sum() == (32 - abs(dy[0])) * (32 - abs(dx[0]))
        offsets.add((int(dy[0]), int(dx[0])))
        flips += flipped
    assert len(offsets) > 60 and 110 < flips < 190  # 81 offsets uniformly, flip with p = 0.5


def test_random_resized_crop_box_and_ramp():
    t = RandomResizedCrop(32)
    boxes = [t.box(200, 160, np.random.default_rng(s)) for s in range(400)]
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 200 and 0 <= top and top + h <= 160
        assert 0.08 * 0.9 <= w * h / (200 * 160) <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    areas = np.array([w * h for _, _, w, h in boxes]) / (200 * 160)
    assert areas.min() < 0.2 and areas.max() > 0.8
    # A horizontal ramp R = x, vertical ramp G = y: bilinear resizing keeps ramps linear, so the output maps
    # back to the crop box: R at output column v = left + (v + 0.5)·w/32 − 0.5.
    y, x = np.mgrid[0:160, 0:200]
    img = np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)
    for seed in range(5):
        left, top, w, h = t.box(200, 160, np.random.default_rng(seed))
        out = t(Image.fromarray(img), np.random.default_rng(seed))
        assert out.shape == (32, 32, 3)
        v = np.arange(2, 30)
        np.testing.assert_allclose(out[16, 2:30, 0], left + (v + 0.5) * w / 32 - 0.5, atol=1.01)
        np.testing.assert_allclose(out[2:30, 16, 1], top + (v + 0.5) * h / 32 - 0.5, atol=1.01)


def test_eval_resize_and_center_crop():
    assert Resize(256)(Image.new("RGB", (400, 300)), None).size == (341, 256)  # int(256·400/300)
    assert Resize(256)(Image.new("RGB", (300, 500)), None).size == (256, 426)
    y, x = np.mgrid[0:300, 0:256]
    img = np.stack([x, y // 2, np.zeros_like(x)], -1).astype(np.uint8)  # shorter side is already 256
    out = CenterCrop(224)(Resize(256)(Image.fromarray(img), None), None)
    assert out.shape == (224, 224, 3)
    assert np.array_equal(out[0, :, 0], 16 + np.arange(224))  # left = (256 − 224)/2
    assert np.array_equal(out[:, 0, 1], (38 + np.arange(224)) // 2)  # top = (300 − 224)/2


def test_lighting_closed_form_and_statistics():
    img = np.full((4, 5, 3), 100, np.uint8)
    img[0, 0] = (0, 255, 3)
    for seed in range(20):
        out = Lighting(0.1)(img, np.random.default_rng(seed))
        alpha = (np.random.default_rng(seed).standard_normal(3) * 0.1).astype(np.float32)
        delta = [sum(EIGVEC[c, j] * alpha[j] * EIGVAL[j] for j in range(3)) for c in range(3)]
        want = np.clip(img + np.array(delta), 0, 255).astype(np.uint8)  # ReActNet: uint8 cast truncates
        assert np.array_equal(out, want) and out.dtype == np.uint8
        assert set(np.unique(out[1:].astype(int) - 100)) <= {-1, 0}  # |delta| < 1 on a 0..255 scale
    # float mode (fb.resnet.torch, values in [0, 1]): the added colour has covariance V diag((0.1 λ)²) Vᵀ
    lt, rng = Lighting(0.1, mode="float"), np.random.default_rng(0)
    alpha = (np.random.default_rng(5).standard_normal(3) * 0.1).astype(np.float32)
    np.testing.assert_allclose(lt(img, np.random.default_rng(5)), img / 255 + EIGVEC @ (alpha * EIGVAL), atol=1e-6)
    draws = np.array([lt(np.zeros((1, 1, 3), np.float32), rng)[0, 0] for _ in range(20000)])
    cov = EIGVEC @ np.diag((0.1 * EIGVAL) ** 2) @ EIGVEC.T
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.05 * cov.max())
    np.testing.assert_allclose(draws.mean(0), 0, atol=4 * np.sqrt(cov.max() / 20000))


def test_make_loader_is_deterministic_across_workers(tmp_path):
    write_cifar10_py(tmp_path, per_batch=8)
    ds = build_dataset("cifar10", "train", tmp_path)  # 40 images, random crop + flip

    def epochs(loader, n=2):
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]

    a = epochs(make_loader(ds, 6, shuffle=True, seed=3))
    b = epochs(make_loader(ds, 6, shuffle=True, seed=3, workers=2))
    c = epochs(make_loader(ds, 6, shuffle=True, seed=4), n=1)
    for ea, eb in zip(a, b):
        assert len(ea) == len(eb) == 7
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    labels = [torch.cat([y for _, y in e]) for e in a]
    assert sorted(labels[0].tolist()) == sorted(ds.targets.tolist())  # a permutation of the dataset
    assert not torch.equal(labels[0], labels[1])  # a new order each epoch
    assert not torch.equal(a[0][0][0], c[0][0][0])  # another seed, other batches
    # augmentation is drawn per sample: the same image appears with different crops across epochs
    plain = make_loader(ds, 40, shuffle=False, seed=3)
    e1, e2 = next(iter(plain))[0], next(iter(plain))[0]
    assert not torch.equal(e1, e2)
    assert len(make_loader(ds, 6, shuffle=False, drop_last=True)) == 6
    with pytest.raises(ValueError, match="sampler"):
        make_loader(ds, 6, shuffle=True, sampler=range(3))
    picked = make_loader(ds, 2, shuffle=False, sampler=[5, 1, 3])  # e.g. a DistributedSampler's shard
    assert torch.cat([y for _, y in picked]).tolist() == ds.targets[[5, 1, 3]].tolist()
    plain_ds = torch.utils.data.TensorDataset(torch.arange(10))  # datasets without seeds get plain indices
    orders = [torch.cat([b[0] for b in make_loader(plain_ds, 4, shuffle=True, seed=s)]).tolist() for s in (1, 1, 2)]
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == list(range(10))


def _png_folder(root, classes, n, size=(9, 9)):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = np.zeros(size[::-1] + (3,), np.uint8)
            a[..., 0], a[..., 1], a[..., 2] = ord(c[0]), i * 10, np.arange(size[0]) * 9  # red names the class
            Image.fromarray(a).save(root / c / f"{i}.png")


def test_image_folder_decodes_pngs_exactly(tmp_path):
    _png_folder(tmp_path / "train", ["dog", "cat"], 2)
    _png_folder(tmp_path / "val", ["dog"], 1)
    ds = build_dataset("folder", "train", tmp_path, input_size=8)  # eval: resize 9 (= 8/0.875), crop 8
    assert ds.classes == ["cat", "dog"] and len(ds) == 4 and ds.num_classes == 2
    ev = build_dataset("folder", "test", tmp_path, input_size=8)  # 'test' falls back to val/
    x, y = ev[0]
    assert y == 1 and x.shape == (3, 8, 8)  # 'dog' keeps its training label though val/ has one class
    rgb = np.stack([np.full((8, 8), 100.0),  # ord('d')
                     np.zeros((8, 8)), np.tile(np.arange(8) * 9.0, (8, 1))])
    np.testing.assert_allclose(x.numpy(), (rgb / 255 - MEAN[:, None, None]) / STD[:, None, None], atol=1e-6)
    xt, _ = ds[0]
    assert xt.shape == (3, 8, 8)  # train: RandomResizedCrop(8) + flip
    _png_folder(tmp_path / "flat", ["a", "b", "c"], 1)
    assert build_dataset("folder", "train", tmp_path / "flat").num_classes == 3
    (tmp_path / "val" / "wolf").mkdir()
    with pytest.raises(ModelFormatError, match="wolf"):
        build_dataset("folder", "val", tmp_path)


def test_imagenet_layout(tmp_path):
    _png_folder(tmp_path / "in" / "train", ["n02", "n01", "n03"], 1, size=(40, 30))
    (tmp_path / "in" / "val" / "n03").mkdir(parents=True)
    Image.new("RGB", (50, 60), (10, 20, 30)).save(tmp_path / "in" / "val" / "n03" / "ILSVRC2012_val_1.JPEG")
    val = build_dataset("imagenet", "val", tmp_path / "in")
    x, y = val[0]
    assert y == 2 and val.num_classes == 3 and x.shape == (3, 224, 224)
    np.testing.assert_allclose(x[:, 100, 100].numpy(), (np.array([10, 20, 30]) / 255 - MEAN) / STD, atol=0.02)
    tr = build_dataset("imagenet", "train", tmp_path / "in", lighting=True, input_size=64)
    assert tr[0][0].shape == (3, 64, 64) and "Lighting" in repr(tr.transform)
    with pytest.raises(DatasetNotFoundError, match="train/<wnid>"):
        build_dataset("imagenet", "val", tmp_path / "missing")


def test_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n09", "n01", "n05"]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        Image.new("RGB", (64, 64), (int(w[1:]) * 20, 0, 0)).save(root / "train" / w / "images" / f"{w}_0.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_0.JPEG")  # some are grayscale
    Image.new("RGB", (64, 64), (0, 0, 250)).save(root / "val" / "images" / "val_1.JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09\t0\t0\t10\t10\nval_1.JPEG\tn01\t1\t2\t3\t4\n")
    tr = build_dataset("tiny-imagenet", "train", tmp_path)
    assert tr.classes == ["n01", "n05", "n09"] and tr.targets.tolist() == [0, 1, 2] and tr[0][0].shape == (3, 64, 64)
    ev = build_dataset("tiny-imagenet", "test", tmp_path)
    (x0, y0), (x1, y1) = ev[0], ev[1]
    assert (y0, y1) == (2, 0)
    np.testing.assert_allclose(x0.mean((1, 2)).numpy(), (128 / 255 - MEAN) / STD, atol=0.02)
    np.testing.assert_allclose(x1[2].mean().item(), (250 / 255 - MEAN[2]) / STD[2], atol=0.03)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn77\t0\t0\t1\t1\n")
    with pytest.raises(ModelFormatError, match=r"val_annotations.txt:1: .*wnids.txt"):
        build_dataset("tiny-imagenet", "val", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="wnids.txt"):
        build_dataset("tiny-imagenet", "train", tmp_path / "nope")


def test_mnist_formats_match_load_dataset(tiny_fmnist):
    x, y = load_dataset("fashion-mnist", "test", tiny_fmnist)
    ds = build_dataset("fashion-mnist", "test", tiny_fmnist)
    assert ds.num_classes == 10 and len(ds) == 32 and ds[5][0].shape == (1, 28, 28)
    np.testing.assert_allclose(ds[5][0].numpy(), x[5], atol=1e-6)
    assert ds[5][1] == y[5]
    mn = build_dataset("mnist", "train", tiny_fmnist)  # same IDX files, MNIST statistics
    raw = (mn.images[3] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(mn[3][0][0].numpy(), raw, atol=1e-5)
    with pytest.raises(ValueError, match="grayscale"):
        build_dataset("mnist", "train", tiny_fmnist, lighting=True)
