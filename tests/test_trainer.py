"""The trainer: recipe files and their schema, LR schedules and losses against closed forms, bit-identical
resume after a kill mid-epoch, DDP (2 processes) against 1 process, and `bnnc train --recipe` on tiny
CIFAR-format and image-folder data written here."""

import csv
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bnnc import models
from bnnc.cli import main
from bnnc.recipes import (LossSpec, OptimizerSpec, RecipeError, ScheduleSpec, list_recipes, load_recipe,
                          recipe_from_dict)
from bnnc.train import (classification_loss, distributional_loss, fit, load_checkpoint, make_optimizer,
                        make_scheduler, param_groups, save_checkpoint)

BASE = {"model": "fmnist_bnn", "dataset": "fashion-mnist", "epochs": 2, "batch_size": 16,
        "optimizer": {"name": "adam", "lr": 1e-3}}


# ------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("change, message", [
    ({"optimiser": {}}, "unknown key 'optimiser'"),
    ({"optimizer": {"name": "adam", "lr": 1e-3, "lrr": 1}}, "unknown key 'optimizer.lrr'"),
    ({"optimizer": {"name": "adam", "lr": "0.001"}}, "optimizer.lr must be a number, got str"),
    ({"optimizer": {"name": "adagrad", "lr": 1e-3}}, "optimizer.name must be one of 'sgd', 'adam', 'adamw'"),
    ({"epochs": 2.5}, "epochs must be an integer"),
    ({"amp": "yes"}, "amp must be true or false"),
    ({"schedule": {"name": "multistep"}}, "needs increasing schedule.milestones"),
    ({"schedule": {"warmup_steps": 10}}, "warmup_steps needs schedule.interval = 'step'"),
    ({"loss": {"name": "distributional"}}, "needs a \\[loss.teacher\\] table"),
    ({"loss": {"label_smoothing": 1.5}}, "label_smoothing must be in"),
    ({"stages": [{"name": "a"}, {"name": "b", "init_from": "c"}]}, "init_from 'c' is not an earlier stage"),
    ({"stages": [{"name": "a", "real_weights": 1}]}, "stages\\[0\\].real_weights must be true or false"),
    ({"published": {"top1": 50.0}}, "missing required key 'published.source'"),
])
def test_recipe_schema_errors_name_the_key(change, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({**BASE, **change}, path="r.toml")
    with pytest.raises(RecipeError, match="missing required key 'batch_size'"):
        recipe_from_dict({k: v for k, v in BASE.items() if k != "batch_size"})


def test_recipe_files_and_names(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text(textwrap.dedent("""
        model = "fmnist_bnn"
        dataset = "fashion-mnist"
        epochs = 3
        batch_size = 32
        [optimizer]
        name = "sgd"
        lr = 0.1
        weight_decay = 1e-4
        [[stages]]
        name = "step1"
        real_weights = true
        [[stages]]
        name = "step2"
        init_from = "step1"
        optimizer = { lr = 0.01 }
    """))
    r = load_recipe(good)
    assert r.name == "mine" and [s.name for s in r.stages] == ["step1", "step2"]
    assert r.stages[0].real_weights and r.stages[1].optimizer.lr == 0.01
    assert r.stages[1].optimizer.weight_decay == 1e-4 and r.stages[1].optimizer.name == "sgd"  # merged per key
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(RecipeError, match="not a valid TOML file"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="unknown recipe 'no_such_recipe'"):
        load_recipe("no_such_recipe")


def test_every_shipped_recipe_parses_and_names_a_registered_model():
    names = list_recipes()
    assert len(names) >= 15
    missing = []
    for name in names:
        r = load_recipe(name)
        assert r.published is not None and 0 < r.published.top1 <= 100 and r.published.source, name
        if r.model not in models.names():
            missing.append(f"{name} → {r.model}")
        for st in r.stages:
            t = st.loss.teacher
            if t is not None and not t.model.startswith("torchvision:") and t.model not in models.names():
                missing.append(f"{name} teacher → {t.model}")
    if missing:
        pytest.skip("recipes naming models that are not registered yet: " + "; ".join(missing))


def test_published_numbers_match_the_spec():
    # methods.md §9
    expect = {"adabin_resnet20_cifar10": 88.02, "rbnn_resnet20_1w1a_cifar10": 86.5, "irnet_resnet20_cifar10": 86.5,
              "reactnet18_imagenet": 65.9, "bireal18_imagenet": 56.4, "rbnn_resnet18_imagenet": 59.9,
              "irnet18_imagenet": 58.58, "fda_resnet20_cifar10": 86.20}
    for name, top1 in expect.items():
        assert load_recipe(name).published.top1 == top1, name
    ra = load_recipe("reactnet_a_imagenet")
    assert [s.optimizer.weight_decay for s in ra.stages] == [1e-5, 0.0]
    assert ra.stages[0].real_weights and ra.stages[1].init_from == "step1"
    assert ra.stages[0].loss.name == "distributional" and ra.stages[0].optimizer.weight_decay_rule == "reactnet"


# ------------------------------------------------------------------------------------------- LR and losses


def _lrs(spec: ScheduleSpec, lr: float, spe: int, epochs: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = make_scheduler(opt, spec, lr, spe, epochs)
    out = []
    for _ in range(spe * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_against_closed_forms():
    lr, spe, E = 0.1, 3, 10
    # cosine per epoch = torch's CosineAnnealingLR(T_max=E) stepped per epoch (AdaBin, methods.md §1.7)
    got = _lrs(ScheduleSpec("cosine", "epoch"), lr, spe, E)
    for s, v in enumerate(got):
        e = s // spe
        assert v == pytest.approx(lr * (1 + math.cos(math.pi * e / E)) / 2, abs=1e-12)
    # ReActNet: lr·(1 − e/E), at the start of each epoch
    got = _lrs(ScheduleSpec("linear", "epoch"), lr, spe, E)
    assert [got[e * spe] for e in range(E)] == pytest.approx([lr * (1 - e / E) for e in range(E)])
    # RBNN warm-up: lr·(e+1)/5 for e < 5, then cosine over E − 4 epochs
    got = _lrs(ScheduleSpec("cosine", "epoch", warmup_epochs=4, warmup_start_factor=0.2), lr, spe, E)
    for e in range(E):
        want = lr * (e + 1) / 5 if e < 5 else lr * (1 + math.cos(math.pi * (e - 4) / (E - 4))) / 2
        assert got[e * spe] == pytest.approx(want, abs=1e-12), e
    # mmcv linear warm-up over 4 steps from 0.25·lr, then steps ×0.1 at epochs 3 and 6 (IR-Net, LU)
    got = _lrs(ScheduleSpec("multistep", "step", milestones=(3, 6), warmup_steps=4, warmup_start_factor=0.25),
               lr, spe, E)
    for s, v in enumerate(got):
        regular = lr * 0.1 ** ((s >= 9) + (s >= 18))
        want = regular * (1 - 0.75 * (1 - s / 4)) if s < 4 else regular
        assert v == pytest.approx(want, abs=1e-12), s
    # per-step cosine with eta_min
    got = _lrs(ScheduleSpec("cosine", "step", eta_min=0.01), lr, spe, E)
    T = spe * E
    assert got == pytest.approx([0.01 + 0.09 * (1 + math.cos(math.pi * s / T)) / 2 for s in range(T)])


def test_label_smoothing_and_kd_losses_against_closed_forms():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 5))
    t = rng.standard_normal((6, 5)) * 2
    y = rng.integers(0, 5, 6)

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    eps, C = 0.1, 5
    ls = log_softmax(z)
    want_ce = np.mean(-(1 - eps) * ls[np.arange(6), y] - eps / C * ls.sum(1))
    got = classification_loss(LossSpec(label_smoothing=eps), torch.tensor(z), torch.tensor(y))
    assert float(got) == pytest.approx(want_ce, rel=1e-6)
    # distributional loss (methods.md §4.4): −(1/B) Σ_b Σ_c softmax(t)·log softmax(z)
    pt = np.exp(log_softmax(t))
    want_kd = np.mean(-(pt * ls).sum(1))
    assert float(distributional_loss(torch.tensor(z), torch.tensor(t))) == pytest.approx(want_kd, rel=1e-6)
    # = KL(p_T‖p_S) + H(p_T): zero KL when the student equals the teacher
    h = np.mean(-(pt * log_softmax(t)).sum(1))
    assert float(distributional_loss(torch.tensor(t), torch.tensor(t))) == pytest.approx(h, rel=1e-6)
    # temperature τ and hard-label mixing
    tau, w = 2.0, 0.3
    want = (1 - w) * tau ** 2 * np.mean(-(np.exp(log_softmax(t / tau)) * log_softmax(z / tau)).sum(1)) \
        + w * np.mean(-ls[np.arange(6), y])
    spec = LossSpec("distributional", temperature=tau, hard_label_weight=w, teacher=None)
    got = classification_loss(spec, torch.tensor(z), torch.tensor(y), torch.tensor(t))
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_weight_decay_rules():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    net.add_module("prelu", torch.nn.PReLU(4))

    def split(rule):
        groups = param_groups(net, OptimizerSpec("adam", 1e-3, weight_decay=1e-5, weight_decay_rule=rule))
        names = {id(p): n for n, p in net.named_parameters()}
        return {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in groups}

    assert split("all") == {1e-5: sorted(n for n, _ in net.named_parameters())}
    assert split("no_norm_bias") == {1e-5: ["0.weight", "3.weight"], 0.0: ["0.bias", "1.bias", "1.weight", "3.bias",
                                                                          "prelu.weight"]}
    # ReActNet: only 4-D parameters or names containing "conv"
    assert split("reactnet")[1e-5] == ["0.weight"]
    opt = make_optimizer(net, OptimizerSpec("sgd", 0.1, weight_decay=1e-4, nesterov=True, momentum=0.8))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.8


# ------------------------------------------------------------------------------------------- resume


def _state(path):
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def _steps(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_killed_mid_epoch_resumes_to_identical_weights(tiny_fmnist, tmp_path):
    # RBNN weights: lazy per-channel state, a per-epoch t/k schedule and a rotation update armed at each
    # epoch start and spent in the first forward, all of which the resume has to get right.
    recipe = recipe_from_dict({**BASE, "epochs": 2, "batch_size": 16, "model_kwargs": {"weight_quantizer": "rbnn"},
                               "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 1e-4},
                               "schedule": {"name": "cosine", "interval": "step"},
                               "loss": {"label_smoothing": 0.1}}, name="resume")
    kw = dict(data_path=tiny_fmnist, progress=False, save_every=3)
    full = fit(recipe, out=tmp_path / "full", **kw)  # 64 images / 16 = 4 steps per epoch, 8 steps

    class Killed(Exception):
        pass

    def kill_at_7(step):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        fit(recipe, out=tmp_path / "cut", step_hook=kill_at_7, **kw)
    ck = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (ck["resume"]["epoch"], ck["resume"]["step_in_epoch"], ck["resume"]["global_step"]) == (1, 2, 6)
    resumed = fit(recipe, out=tmp_path / "cut", resume=True, **kw)
    a, b = _state(tmp_path / "full" / "last.pt"), _state(tmp_path / "cut" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert drop(full["history"]) == drop(resumed["history"])
    assert _steps(tmp_path / "full" / "steps.csv") == _steps(tmp_path / "cut" / "steps.csv")
    assert len(_steps(tmp_path / "full" / "steps.csv")) == 9
    # the final checkpoint loads as a normal bnnc checkpoint
    net = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert isinstance(net, torch.nn.Module)
    # a finished run resumes to nothing more to do
    again = fit(recipe, out=tmp_path / "cut", resume=True, **kw)
    assert drop(again["history"]) == drop(full["history"])


# ------------------------------------------------------------------------------------------- DDP

DDP_SCRIPT = """
import json, sys
import torch
from torch import nn
from bnnc import models
from bnnc.nn import BinaryLinear
from bnnc.recipes import recipe_from_dict
from bnnc.train import fit

@models.register("ddp_test_mlp", models.get_recipe("fmnist_bnn"))
def ddp_test_mlp():  # no BatchNorm: per-rank batch statistics would differ from one process's
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Hardtanh(),
                         BinaryLinear(32, 24, weight_quantizer="xnor"), nn.Linear(24, 10))

torch.set_num_threads(1)
recipe = recipe_from_dict({"model": "ddp_test_mlp", "dataset": "fashion-mnist", "epochs": 2, "batch_size": 16,
                           "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                           "schedule": {"name": "cosine", "interval": "step"}}, name="ddp")
fit(recipe, out=sys.argv[2], data_path=sys.argv[1], progress=False)
"""


def test_ddp_two_processes_match_one_process(tiny_fmnist, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(script), str(tiny_fmnist), str(tmp_path / "one")], check=True, env=env,
                   timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tiny_fmnist), str(tmp_path / "two")], check=True, env=env, timeout=300)
    one, two = _steps(tmp_path / "one" / "steps.csv"), _steps(tmp_path / "two" / "steps.csv")
    assert len(one) == len(two) == 9  # header + 2 epochs × 4 steps
    for r1, r2 in zip(one[1:], two[1:]):
        assert r1[:3] == r2[:3]  # step, epoch, lr
        assert float(r1[3]) == pytest.approx(float(r2[3]), rel=1e-4, abs=1e-5)
    a, b = _state(tmp_path / "one" / "last.pt"), _state(tmp_path / "two" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_recipe_on_tiny_cifar(tmp_path, capsys):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 8)]:
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(v) for v in labels]}, f)
    out = tmp_path / "run"
    rc = main(["train", "--recipe", "adabin_resnet20_cifar10", "--data-path", str(tmp_path / "cifar"), "--out",
               str(out), "--epochs", "1", "--limit", "16", "--batch-size", "8"])
    assert rc == 0
    assert "test top-1" in capsys.readouterr().out
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["model"] == "adabin_resnet20" and ck["complete"] and ck["resume"]["global_step"] == 2
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["test_top1"]) <= 1.0
    assert (out / "metrics.json").is_file() and (out / "best.pt").is_file()
    assert main(["train", "--recipe", str(tmp_path / "nope.toml")]) == 1


def test_cli_two_step_kd_recipe_on_image_folder(tmp_path, capsys):
    """Two stages (real weights, then binary from step 1) with a distillation teacher, on PNG/JPEG folders."""
    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    for split, n in (("train", 4), ("val", 2)):
        for c in ("cat", "dog", "eel"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (40, 36, 3)).astype(np.uint8))
                img.save(root / split / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    teacher = models.create("adabin_resnet20", num_classes=3)
    save_checkpoint(teacher, tmp_path / "teacher.pt")
    recipe = tmp_path / "two_step.toml"
    recipe.write_text(textwrap.dedent(f"""
        model = "adabin_resnet20"
        model_kwargs = {{ num_classes = 3 }}
        dataset = "folder"
        input_size = 32
        epochs = 1
        batch_size = 4
        [published]
        top1 = 50.0
        source = "test"
        [optimizer]
        name = "adam"
        lr = 1e-3
        weight_decay_rule = "reactnet"
        [schedule]
        name = "linear"
        [loss]
        name = "distributional"
        [loss.teacher]
        model = "adabin_resnet20"
        model_kwargs = {{ num_classes = 3 }}
        checkpoint = "{tmp_path / 'teacher.pt'}"
        [[stages]]
        name = "step1"
        real_weights = true
        optimizer = {{ weight_decay = 1e-5 }}
        [[stages]]
        name = "step2"
        init_from = "step1"
    """))
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(recipe), "--data-path", str(root), "--out", str(out)]) == 0
    s1 = torch.load(out / "step1" / "last.pt", weights_only=True)
    s2 = torch.load(out / "step2" / "last.pt", weights_only=True)
    assert s1["real_weights"] and not s2["real_weights"] and s1["complete"] and s2["complete"]
    assert s1["resume"]["global_step"] == 3  # 12 images / batch 4
    assert "step2: initialised from step1" in capsys.readouterr().out
    net = load_checkpoint(out / "step2" / "last.pt")  # the last stage's model is the zoo model, binary weights
    assert net.linear.weight.shape == (3, 64)
    assert type(net.layer1[0].conv1.weight_quantizer).__name__ != "RealWeight"
