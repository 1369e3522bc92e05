"""Evaluations and benchmarks people can trust: `bnnc eval --layers` names the layer that diverges, the
protocol (drop-last, preprocessing) is reported, sharded evaluation under torchrun equals one process,
bench plots are real images, and `bnnc report` carries the numbers of the files it reads."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import bnnc
from bnnc.cli import main
from bnnc.data import load_fashion_mnist
from bnnc.nn import BinaryConv2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        BinaryConv2d(8, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.MaxPool2d(2),
        BinaryConv2d(32, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
        torch.nn.Flatten(), torch.nn.Linear(16 * 7 * 7, 10))
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():  # non-trivial BatchNorm statistics, so thresholds differ per channel
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


@pytest.fixture
def tiny_onnx(tmp_path):
    return bnnc.export(_tiny_net(), tmp_path / "tiny.onnx", input_shape=(1, 1, 28, 28))


def _set_init(model, name, fn):
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))
            return
    raise KeyError(name)


def _layers_json(capsys, args):
    capsys.readouterr()
    assert main(["eval", *args, "--layers", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------------ --layers


def test_layers_no_divergence_on_an_unmodified_pair(tiny_onnx, tiny_fmnist, capsys):
    r = _layers_json(capsys, [str(tiny_onnx), "--runtime", "numpy", "--compare-to", "reference",
                              "--data-path", str(tiny_fmnist)])
    assert r["first"] is None and r["naming"] == "export" and r["images"] == 32
    values = [row["value"] for row in r["rows"]]
    export = onnx.load(tiny_onnx)
    # the stem conv, both binarizations (the packed bits unpacked), the folded BatchNorm, the logits
    sign_nodes = [n.output[0] for n in export.graph.node if n.op_type == "SignBinarize"]
    assert len(sign_nodes) == 2 and set(sign_nodes) <= set(values)
    assert export.graph.output[0].name == values[-1]
    assert all(row["ok"] for row in r["rows"])
    assert {row["kind"] for row in r["rows"] if row["value"] in sign_nodes} == {"sign"}
    # the table form says so too
    assert main(["eval", str(tiny_onnx), "--runtime", "numpy", "--layers", "--limit", "4",
                 "--data-path", str(tiny_fmnist)]) == 0
    out = capsys.readouterr().out
    assert "no divergence" in out and "protocol: fashion-mnist/test, 4 of 32 images" in out


def test_layers_names_a_perturbed_deploy_threshold(tiny_onnx, tiny_fmnist, tmp_path, capsys):
    """Flip the integer thresholds of the first binary conv of the deploy form: --layers (reference vs the
    modified deploy model on TVM) names that conv, not the stem before it nor the layers after it."""
    deploy = bnnc.fold(tiny_onnx)
    conv = next(n for n in deploy.graph.node if n.op_type == "BinaryConv2dPacked")
    thr_name = conv.input[6]
    _set_init(deploy, thr_name, lambda t: -t + 7)
    bad = tmp_path / "bad.deploy.onnx"
    onnx.save(deploy, bad)
    r = _layers_json(capsys, [str(tiny_onnx), "--runtime", "reference", "--compare-to", str(bad),
                              "--data-path", str(tiny_fmnist), "--limit", "8"])
    first = r["first"]
    export = onnx.load(tiny_onnx)
    bconvs = [n.name for n in export.graph.node if n.op_type == "BinaryConv2d"]
    assert first is not None and first["layer"] == bconvs[0] == conv.name
    assert first["kind"] == "sign" and 0 < first["sign_diff"] <= 1 and first["max_abs_diff"] == 2
    # everything before it agrees; the nodes between the agreeing values and it are the fused region
    before = r["rows"][:r["rows"].index({k: first[k] for k in r["rows"][0]})]
    assert before and all(row["ok"] for row in before)
    assert [x["op"] for x in first["region"]] == ["BinaryConv2d", "BatchNormalization", "MaxPool", "SignBinarize"]


def test_layers_names_a_perturbed_export_weight(tiny_onnx, tiny_fmnist, tmp_path, capsys):
    """Model vs model on the reference: one flipped weight sign of the second binary conv is found there, and
    the reported difference equals an independent ONNX Runtime run of both models."""
    import onnxruntime as ort

    good = onnx.load(tiny_onnx)
    conv = [n for n in good.graph.node if n.op_type == "BinaryConv2d"][1]
    bad = onnx.load(tiny_onnx)

    def flip(w):
        w[3] = -w[3]  # every weight of output channel 3
        return w

    _set_init(bad, conv.input[1], flip)
    bad_path = tmp_path / "bad.onnx"
    onnx.save(bad, bad_path)
    r = _layers_json(capsys, [str(tiny_onnx), "--runtime", "reference", "--compare-to", str(bad_path),
                              "--data-path", str(tiny_fmnist), "--limit", "16"])
    first = r["first"]
    assert first["layer"] == first["node"] == conv.name and first["op"] == "BinaryConv2d"
    assert [x["node"] for x in first["region"]] == [conv.name]

    x = load_fashion_mnist("test", tiny_fmnist)[0][:16]

    def value(m):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        m2.graph.output.append(onnx.ValueInfoProto(name=conv.output[0]))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m2.SerializeToString(), so).run([conv.output[0]], {"input": x})[0]

    want = np.abs(value(good).astype(np.float64) - value(bad).astype(np.float64))
    assert first["max_abs_diff"] == pytest.approx(want.max())
    assert want[:, [c for c in range(want.shape[1]) if c != 3]].max() == 0  # only channel 3 moved


def test_layers_refuses_a_checkpoint(tmp_path, tiny_fmnist, capsys):
    net = bnnc.models.create("fmnist_bnn")
    from bnnc.train import save_checkpoint

    save_checkpoint(net, tmp_path / "m.pt")
    assert main(["eval", str(tmp_path / "m.pt"), "--layers", "--compare-to", "reference",
                 "--data-path", str(tiny_fmnist)]) == 1
    assert "bnnc export" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ protocol


def test_drop_last_and_protocol(tiny_fmnist, capsys, tmp_path):
    net = _tiny_net(1)
    x, y = load_fashion_mnist("test", tiny_fmnist)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).double().numpy()
    r = bnnc.evaluate(net, "fashion-mnist", data_path=tiny_fmnist, batch_size=10, drop_last=True)
    assert r["n"] == 30  # 32 images, batches of 10: the last partial batch (2 images) is dropped
    assert r["top1"] == pytest.approx(float(np.mean(logits[:30].argmax(1) == y[:30])), abs=0)
    lse = np.log(np.exp(logits[:30] - logits[:30].max(1, keepdims=True)).sum(1)) + logits[:30].max(1)
    assert r["loss"] == pytest.approx(float(np.mean(lse - logits[np.arange(30), y[:30]])), rel=1e-6)
    p = r["protocol"]
    assert (p["dataset"], p["split"], p["images"], p["dataset_images"], p["batch_size"], p["drop_last"],
            p["dropped"]) == ("fashion-mnist", "test", 30, 32, 10, True, 2)
    assert "0.286" in p["preprocessing"] and "0.353" in p["preprocessing"]
    full = bnnc.evaluate(net, "fashion-mnist", data_path=tiny_fmnist, batch_size=10)
    assert full["n"] == 32 and full["protocol"]["drop_last"] is False and full["protocol"]["dropped"] == 0

    from bnnc.train import save_checkpoint

    save_checkpoint(bnnc.models.create("fmnist_bnn"), tmp_path / "m.pt")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m.pt"), "--batch-size", "10", "--drop-last", "--json",
                 "--data-path", str(tiny_fmnist)]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["n"] == 30 and j["protocol"]["drop_last"] and j["protocol"]["batch_size"] == 10
    assert main(["eval", str(tmp_path / "m.pt"), "--batch-size", "10", "--drop-last",
                 "--data-path", str(tiny_fmnist)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("protocol: fashion-mnist/test, 30 of 32 images, batch 10, drop-last on (2 images")


def test_shard_ranges_cover_whole_batches():
    from bnnc.evaluate import shard_range

    for n, bs, ws in [(32, 5, 2), (30, 10, 4), (7, 3, 3), (1, 4, 2), (100, 1, 3)]:
        ranges = [shard_range(n, bs, r, ws) for r in range(ws)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(s % bs == 0 for s, _ in ranges)


@pytest.mark.slow  # ≈20 s: two fresh interpreters importing torch under torchrun
def test_torchrun_sharded_eval_equals_one_process(tiny_fmnist, tmp_path, capsys):
    from bnnc.train import save_checkpoint

    net = bnnc.models.create("fmnist_bnn")
    torch.manual_seed(3)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
    save_checkpoint(net, tmp_path / "m.pt")
    args = ["eval", str(tmp_path / "m.pt"), "--json", "--batch-size", "5", "--data-path", str(tiny_fmnist)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1)
    try:
        capsys.readouterr()
        assert main(args) == 0
        one = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "bnnc.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    r1, r2 = json.loads(one), json.loads(lines[0])
    assert r2["protocol"]["world_size"] == 2 and r1["protocol"]["world_size"] == 1
    for k in ("top1", "top5", "loss", "n", "per_class"):
        assert r1[k] == r2[k], k
    x, y = load_fashion_mnist("test", tiny_fmnist)
    with torch.no_grad():
        logits = bnnc.load_checkpoint(tmp_path / "m.pt")(torch.from_numpy(x)).numpy()
    assert r2["n"] == 32 and r2["top1"] == float(np.mean(logits.argmax(1) == y))


# ------------------------------------------------------------------------------------------------ bench


def _check_png(path):
    from PIL import Image

    assert path.is_file()
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.width >= 300 and im.height >= 200
        px = np.asarray(im.convert("RGB"), np.int32)
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 8 and px.std() > 5  # not a flat image


def test_bench_layers_json_and_plots(tmp_path, capsys, monkeypatch):
    from bnnc import bench

    # the popcount bound (a C microbenchmark) is not what this test is about
    monkeypatch.setattr(bench, "popcount_bound", lambda: {"isa": "test", "freq_hz": None, "freq_source": "test",
                                                          "theory_bitmacs_per_cycle": None})
    capsys.readouterr()
    assert main(["bench", "--layers", "resnet18", "--shapes", "3,5,40,36", "--repeat", "3",
                 "--no-openvino", "--json", "--plot", str(tmp_path / "plots")]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [row["shape"] for row in r["rows"]] == ["3×5×40→36"] and r["bound"]["isa"]
    for row in r["rows"]:
        assert row["bnnc_p90_ms"] >= row["bnnc_ms"] > 0 and row["ort_fp32_p90_ms"] >= row["ort_fp32_ms"] > 0
        assert row["speedup_vs_ort"] == pytest.approx(row["ort_fp32_ms"] / row["bnnc_ms"])
    for name in ("layer_latency.png", "layer_speedup.png"):
        _check_png(tmp_path / "plots" / name)


def test_percentile_and_interleaved_samples():
    from bnnc import bench

    assert bench.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)
    assert bench.percentile([4.0], 50) == 4.0
    s = bench._interleaved({"a": lambda n: 2e-3}, repeat=4, block_s=0.01, samples=True)
    assert s == {"a": [2e-3] * 4}


def test_fp32_twin_is_the_unbinarized_network(tiny_onnx, tiny_fmnist):
    """The FP32 contender: every binary conv a plain Conv on the stored ±1 weights, activations real —
    equal to the PyTorch network with BinaryConv2d replaced that way."""
    import onnxruntime as ort

    from bnnc import bench

    twin = bench.fp32_twin(onnx.load(tiny_onnx))
    assert not any(n.domain == "ai.bnnc" for n in twin.graph.node) and not twin.functions
    net = _tiny_net()
    for i, m in enumerate(net):
        if isinstance(m, BinaryConv2d):
            c = torch.nn.Conv2d(m.in_channels, m.out_channels, 3, padding=1, bias=False)
            c.weight.data = torch.where(m.weight >= 0, 1.0, -1.0).detach()
            net[i] = c
    x = load_fashion_mnist("test", tiny_fmnist)[0][:8]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(twin.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_accuracy_specs(tmp_path):
    from bnnc import bench

    (tmp_path / "eval_tvm.json").write_text(json.dumps({"runtime": "tvm", "top1": 0.8125, "n": 32}))
    assert bench.parse_accuracies(["reference=0.9", str(tmp_path / "eval_tvm.json")]) == {"reference": 0.9,
                                                                                           "tvm": 0.8125}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bnnc eval --json"):
        bench.parse_accuracies([str(tmp_path / "bad.json")])
    with pytest.raises(ValueError, match="RUNTIME=TOP1"):
        bench.parse_accuracies(["tvm=fast"])


# ------------------------------------------------------------------------------------------------ report


def test_report_of_a_run_folder(tiny_fmnist, tmp_path, capsys):
    from bnnc import bench

    run = tmp_path / "runs"
    fm = run / "fm"
    net = bnnc.models.create("fmnist_bnn")
    res = bnnc.train(net, "fashion-mnist", epochs=2, out=fm, data_path=tiny_fmnist, batch_size=32, progress=False)
    history = res["history"]
    capsys.readouterr()
    assert main(["eval", str(fm / "last.pt"), "--json", "--batch-size", "8", "--data-path", str(tiny_fmnist)]) == 0
    ev = json.loads(capsys.readouterr().out)
    (fm / "eval_pytorch.json").write_text(json.dumps(ev))
    onnx_path = bnnc.export(bnnc.load_checkpoint(fm / "last.pt"), fm / "model.onnx", input_shape=(1, 1, 28, 28))
    b = bench.run_model_bench(onnx_path, threads=1, repeat=2, block_s=0.002)
    (fm / "bench_model.json").write_text(json.dumps(b))
    # a second run with a trainer's metrics.csv only
    other = run / "csv_run"
    other.mkdir()
    (other / "metrics.csv").write_text("epoch,train_loss,test_top1,lr\n1,2.25,0.125,0.1\n2,1.5,0.3125,0.05\n")

    assert main(["report", str(run), "-o", str(tmp_path / "out" / "report.md")]) == 0
    assert "2 model page(s)" in capsys.readouterr().out
    index = (tmp_path / "out" / "report.md").read_text()
    assert "report_fm.md" in index and "report_csv_run.md" in index
    page = (tmp_path / "out" / "report_fm.md").read_text()
    # model card: the zoo recipe and the source of its number
    recipe = bnnc.models.get_recipe("fmnist_bnn")
    assert "`fmnist_bnn`" in page and recipe.source in page and f"{recipe.epochs} epochs" in page
    # training curve numbers from the checkpoint's history
    for rec in history:
        assert f"{rec['train_loss']:.4f}" in page and f"{rec['test_top1']:.4f}" in page
    # accuracy per runtime, from the eval json (independently: the checkpoint's own logits)
    x, y = load_fashion_mnist("test", tiny_fmnist)
    with torch.no_grad():
        top1 = float(np.mean(bnnc.load_checkpoint(fm / "last.pt")(torch.from_numpy(x)).numpy().argmax(1) == y))
    assert ev["top1"] == top1 and f"| pytorch | fashion-mnist/test | 32 | {top1:.4f} |" in page
    assert f"{ev['loss']:.4f}" in page and "batch 8, drop-last off, 32 of 32 images" in page
    # benchmark numbers and plots
    for name, c in b["batches"][0]["contenders"].items():
        assert f"| 1 | {name} | {c['p50_ms']:.3f} | {c['p90_ms']:.3f} |" in page
    pngs = sorted((tmp_path / "out").glob("*.png"))
    names = {p.name for p in pngs}
    assert "report_fm_training.png" in names and "report_csv_run_training.png" in names
    assert any(n.startswith("report_fm_bench0_") and n.endswith("_latency.png") for n in names)
    for p in pngs:
        assert f"]({p.name})" in (page + (tmp_path / "out" / "report_csv_run.md").read_text())
        _check_png(p)
    csv_page = (tmp_path / "out" / "report_csv_run.md").read_text()
    assert "0.3125" in csv_page and "Best test top-1 0.3125 at epoch 2" in csv_page


def test_report_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "no trained or compiled model" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "eval_x.json").write_text('{"nothing": 1}')
    assert main(["report", str(tmp_path / "bad")]) == 1
    assert "eval_x.json" in capsys.readouterr().err and not (tmp_path / "bad" / "report.md").exists()
