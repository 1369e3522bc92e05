"""bench/methods_fmnist.py: the per-method training benchmark, on a tiny synthetic Fashion-MNIST."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("methods_fmnist", ROOT / "bench" / "methods_fmnist.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mf():
    return _load_script()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_methods_bench_tiny(mf, tiny_fmnist, tmp_path, one_thread):
    from bnnc.evaluate import evaluate
    from bnnc.quantizers import MagnitudeAwareWeight, RSign, SignSTE, XnorWeight
    from bnnc.train import load_checkpoint

    methods = ["sign", "rsign"]
    doc = mf.run_methods(methods, epochs=1, data_path=tiny_fmnist, runs_dir=tmp_path / "runs", progress=False)
    json_path, md_path = mf.write_outputs(doc, tmp_path / "out")

    assert json_path == tmp_path / "out" / f"methods-fmnist-{doc['date']}.json"
    assert md_path == tmp_path / "out" / "methods-fmnist.md"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([json_path.name, md_path.name])
    loaded = json.loads(json_path.read_text())
    assert list(loaded["methods"]) == methods
    b = loaded["budget"]
    assert (b["epochs"], b["batch_size"], b["seed"]) == (1, 128, 0)
    assert (b["train_images"], b["train_images_available"], b["test_images"], b["test_images_available"]) == \
        (64, 64, 32, 32)  # the fixture's 64 train / 32 test images
    assert (b["optimizer"], b["lr"]) == ("adam", 2e-3)  # the fmnist_bnn recipe
    assert loaded["machine"]["torch_threads"] == 1 and loaded["machine"]["cpus"] >= 1

    expected_types = {"sign": (SignSTE, XnorWeight), "rsign": (RSign, MagnitudeAwareWeight)}
    md = md_path.read_text()
    for name in methods:
        r = loaded["methods"][name]
        # the accuracy the benchmark recorded is the one bnnc.evaluate computes for the saved model
        model = load_checkpoint(r["checkpoint"], mf.build_model(name))
        act_t, w_t = expected_types[name]
        convs = [m for m in model.modules() if hasattr(m, "input_quantizer")]
        assert len(convs) == 3
        assert all(type(c.input_quantizer) is act_t and type(c.weight_quantizer) is w_t for c in convs)
        ev = evaluate(model, "fashion-mnist", "test", data_path=tiny_fmnist, batch_size=7)
        assert ev["n"] == 32
        assert r["test_top1"] == ev["top1"]
        assert r["test_loss"] == pytest.approx(ev["loss"], rel=1e-5, abs=1e-6)
        # one batch of 64 < 128: the epoch's train loss is the single step's loss in steps.csv
        with open(Path(r["checkpoint"]).parent / "steps.csv", newline="") as f:
            steps = list(csv.DictReader(f))
        assert len(steps) == 1 and r["steps"] == 1
        assert r["train_loss"] == pytest.approx(float(steps[0]["loss"]), rel=1e-9)
        assert len(r["epoch_seconds"]) == 1 and 0 < r["epoch_seconds"][0] <= r["wall_seconds"]
        row = (f"| {name} | {r['activation_quantizer']} | {r['weight_quantizer']} | {r['test_top1']:.4f} | "
               f"{r['test_loss']:.4f} | {r['train_loss']:.4f} | {r['train_top1']:.4f} | "
               f"{r['mean_epoch_seconds']:.1f} |")
        assert row in md.splitlines()
    assert "1 epoch(s) on all 64 training images, batch 128, adam lr 0.002" in md
    assert "test top-1 on 32 of 32 test images" in md
    assert loaded["machine"]["cpu"] in md


def test_same_initial_weights_and_method_table(mf):
    torch.manual_seed(0)
    a = mf.build_model("adabin").state_dict()
    torch.manual_seed(0)
    e = mf.build_model("ede").state_dict()
    # the shared parameters (stem, latent conv weights, BN, classifier) start equal across methods
    shared = [k for k in a if k in e]
    assert any(k.startswith("features.0.weight") for k in shared)
    assert all(torch.equal(a[k], e[k]) for k in shared)
    assert set(mf.METHODS) == {"sign", "adabin", "ede", "rbnn", "fda", "rsign"}
    assert (mf.METHODS["ede"].activation, mf.METHODS["ede"].weight) == ("ede", "libra_pb")
    assert (mf.METHODS["rsign"].activation, mf.METHODS["rsign"].weight) == ("rsign", "magnitude_aware")


def test_bad_input(mf, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method.*'nope'.*known: sign"):
        mf.run_methods(["sign", "nope"], data_path=tmp_path)
    with pytest.raises(ValueError, match="epochs"):
        mf.run_methods(["sign"], epochs=0, data_path=tmp_path)
    rc = mf.main(["--methods", "sign", "--data-path", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "o"),
                  "--runs-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "missing" in err
    assert not (tmp_path / "o").exists()
