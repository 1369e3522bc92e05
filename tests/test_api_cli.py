"""The public contracts (Python API and CLI) end to end on a tiny Fashion-MNIST in the real format."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import bnnc
from bnnc.cli import main
from bnnc.errors import ModelFormatError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """fmnist_bnn trained one epoch on a tiny dataset, exported: (net, onnx path, data path)."""
    from .conftest import write_idx

    root = tmp_path_factory.mktemp("api")
    data = root / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 48)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images, gz=True)
        write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", labels, gz=True)
    net = bnnc.models.create("fmnist_bnn")
    result = bnnc.train(net, "fashion-mnist", epochs=1, out=root / "run", data_path=data, progress=False)
    assert Path(result["checkpoint"]).is_file() and (root / "run" / "best.pt").is_file()
    path = bnnc.export(net, root / "model.onnx", input_shape=(1, 1, 28, 28))
    return net, path, data, root


def test_api_contract_all_runtimes_agree(trained):
    net, path, data, root = trained
    ref = bnnc.evaluate(net, "fashion-mnist", split="test", data_path=data, return_logits=True)
    assert set(ref) >= {"top1", "top5", "loss", "n"} and ref["n"] == 48
    for runtime in ("reference", "numpy", "tvm", "ort", "ort-portable"):
        cm = bnnc.compile(path, target="cpu", runtime=runtime)
        cm.save(root / f"model-{runtime}.bnnc")
        cm = bnnc.load(root / f"model-{runtime}.bnnc")
        r = bnnc.evaluate(cm, "fashion-mnist", split="test", data_path=data, return_logits=True)
        assert r["n"] == 48
        assert np.array_equal(r["logits"].argmax(1), ref["logits"].argmax(1)), runtime
        np.testing.assert_allclose(r["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
        assert r["top1"] == ref["top1"] and abs(r["loss"] - ref["loss"]) < 1e-4
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    assert cm.run(x).shape == (3, 10)
    with pytest.raises(ValueError, match="does not match"):
        cm.run(np.zeros((1, 3, 28, 28), np.float32))


def test_checkpoint_roundtrip_and_safe_loading(trained, tmp_path):
    net, _, _, root = trained
    loaded = bnnc.load_checkpoint(root / "run" / "last.pt")
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), k
    truncated = tmp_path / "t.pt"
    truncated.write_bytes((root / "run" / "last.pt").read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="not a loadable"):
        bnnc.load_checkpoint(truncated)


def test_corrupted_or_mismatched_artifact_is_refused(trained, tmp_path):
    _, path, _, _ = trained
    art = tmp_path / "m.bnnc"
    bnnc.compile(path, runtime="tvm").save(art)
    lib = art / "lib.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="corrupted"):
        bnnc.load(art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["bnnc_version"] = "0.0.0"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="recompile"):
        bnnc.load(art)
    with pytest.raises(ModelFormatError, match="not a bnnc artifact"):
        bnnc.load(tmp_path)


def test_cli_commands(trained, tmp_path, capsys):
    _, _, data, root = trained
    assert main(["models"]) == 0
    assert "fmnist_bnn" in capsys.readouterr().out
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--data-path", str(data)]) == 0
    ckpt = tmp_path / "run" / "last.pt"
    assert ckpt.is_file()
    assert main(["export", str(ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    assert main(["fold", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.deploy.onnx")]) == 0
    deploy = onnx.load(str(tmp_path / "m.deploy.onnx"))
    assert {"PackSign", "BinaryConv2dPacked", "MaxPoolBits"} <= {n.op_type for n in deploy.graph.node}
    assert main(["compile", str(tmp_path / "m.onnx"), "--target", "cpu", "-o", str(tmp_path / "m.bnnc")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m.bnnc"), "--json", "--data-path", str(data)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["runtime"] == "tvm" and r["n"] == 48 and set(r) >= {"top1", "top5", "loss", "n"}
    assert main(["eval", str(ckpt), "--json", "--data-path", str(data)]) == 0
    r_torch = json.loads(capsys.readouterr().out)
    assert r_torch["runtime"] == "pytorch" and r_torch["top1"] == r["top1"]


def test_cli_quickstart_smoke(tmp_path, tiny_fmnist, capsys):
    assert main(["quickstart", "--epochs", "1", "--out", str(tmp_path / "qs"), "--data-path", str(tiny_fmnist)]) == 0
    out = capsys.readouterr().out
    assert "agree w/ PyTorch" in out
    rows = [line for line in out.splitlines() if line.startswith(("pytorch", "reference", "tvm"))]
    assert len(rows) == 3 and all("100.00%" in line for line in rows)


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "bnnc.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_bad_inputs_one_line_error_no_output(tmp_path):
    # a non-ONNX file
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model")
    p = _cli("compile", str(bad), "-o", str(tmp_path / "out.bnnc"), cwd=tmp_path)
    assert p.returncode != 0 and "not an ONNX model" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.bnnc").exists()
    # an ONNX model with an unknown ai.bnnc op
    node = helper.make_node("TernaryConv", ["x"], ["y"], domain="ai.bnnc", name="layer7")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.bnnc", 1)],
                              ir_version=10)
    onnx.save(model, str(tmp_path / "unknown.onnx"))
    p = _cli("fold", str(tmp_path / "unknown.onnx"), "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    assert p.returncode != 0 and "ai.bnnc::TernaryConv" in p.stderr and "layer7" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.onnx").exists()
    # a missing dataset path
    p = _cli("train", "--epochs", "1", "--out", str(tmp_path / "run"), "--data-path", str(tmp_path / "nowhere"),
             cwd=tmp_path)
    assert p.returncode != 0 and "dataset-fashion-mnist" in p.stderr and "nowhere" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "last.pt").exists()
    # no stray temp files anywhere
    assert not list(tmp_path.rglob(".*.tmp"))


@pytest.mark.skipif(not __import__("shutil").which("aarch64-linux-gnu-gcc"), reason="needs gcc-aarch64-linux-gnu")
def test_arm_artifact_is_aarch64_and_refused_here(trained, tmp_path):
    _, path, _, _ = trained
    art = tmp_path / "m-arm.bnnc"
    bnnc.compile(path, target="arm").save(art)
    elf = (art / "lib.so").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(bnnc.BnncError, match="AArch64"):
        bnnc.load(art)
    with pytest.raises(bnnc.BnncError, match="needs runtime 'tvm'"):
        bnnc.compile(path, target="arm", runtime="reference")
    with pytest.raises(bnnc.BnncError, match="unknown target"):
        bnnc.compile(path, target="tpu")


def test_inspect_counts_match_closed_form(trained, capsys):
    """methods.md §12: MACs = Cout·Hout·Wout·Cin·kh·kw at batch 1; OPs = BOPs/64 + FLOPs."""
    _, path, _, _ = trained
    assert main(["inspect", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in r["rows"]}
    assert rows["features.0"]["bops"] == 14 * 14 * 48 * 32 * 9 and rows["features.0"]["output"] == "bits"
    assert "OR" in rows["features.0"]["form"]
    assert rows["features.3"]["bops"] == 7 * 7 * 64 * 48 * 9 and rows["features.3"]["output"] == "bits"
    assert rows["features.5"]["bops"] == 7 * 7 * 80 * 64 * 9 and rows["features.5"]["output"] == "float"
    flops = 28 * 28 * 32 * 1 * 9 + 720 * 10
    assert r["flops"] == flops and r["ops"] == pytest.approx(r["bops"] / 64 + flops)
    assert main(["inspect", str(path)]) == 0
    assert "integer threshold" in capsys.readouterr().out


def test_eval_per_class_and_compare_to(trained, capsys):
    net, path, data, _ = trained
    assert main(["eval", str(path), "--runtime", "tvm", "--compare-to", "reference", "--json",
                 "--data-path", str(data)]) == 0
    r = json.loads(capsys.readouterr().out)
    ref = bnnc.evaluate(net, "fashion-mnist", data_path=data, return_logits=True)
    from bnnc.data import load_dataset

    _, y = load_dataset("fashion-mnist", "test", data)
    pred = ref["logits"].argmax(1)
    want = [float((pred[y == c] == c).mean()) if np.any(y == c) else None for c in range(10)]
    assert r["per_class"] == want
    assert r["agreement"] == 1.0 and r["compare_to"] == "reference" and r["compare_top1"] == r["top1"]
    assert main(["eval", str(path.with_suffix(".missing.onnx")), "--json", "--data-path", str(data)]) == 1
