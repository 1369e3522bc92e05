"""Operation counts (bnnc/opcount.py, `bnnc ops`): closed forms on a hand-built network, the published
ReActNet-A and Bi-Real-18 totals (methods.md §12)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bnnc
from bnnc.cli import main
from bnnc.nn import BinaryConv2d, BinaryLinear
from bnnc.opcount import count_ops


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)                      # real
        self.b1 = BinaryConv2d(8, 16, 3, padding=1)                                # binary
        self.w1a32 = BinaryConv2d(16, 16, 1, input_quantizer=None)                 # 1-bit weights, real inputs
        self.grouped = BinaryConv2d(16, 16, 3, padding=1, groups=4, input_quantizer="rsign")  # binary, grouped
        self.bfc = BinaryLinear(16, 10)                                            # binary dense
        self.fc = nn.Linear(10, 5)                                                 # real dense
        self.bn = nn.BatchNorm2d(16)                                               # not counted

    def forward(self, x):
        x = self.stem(x)
        x = self.bn(self.b1(x))
        x = self.w1a32(x)
        x = self.grouped(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.bfc(x))


@pytest.mark.parametrize("batch", [1, 2])
def test_closed_form_counts_on_a_hand_built_network(batch):
    net = Tiny().train()
    r = count_ops(net, (batch, 3, 16, 16))
    hw = 8 * 8  # 16×16 input, stride-2 stem
    want = {  # MACs = N·Cout·Hout·Wout·(Cin/groups)·kh·kw; dense N·out·in
        "stem": ("real", 8 * hw * 3 * 9),
        "b1": ("binary", 16 * hw * 8 * 9),
        "w1a32": ("real", 16 * hw * 16),
        "grouped": ("binary", 16 * hw * 4 * 9),
        "bfc": ("binary", 10 * 16),
        "fc": ("real", 5 * 10),
    }
    got = {row["name"]: (row["kind"], row["macs"]) for row in r["layers"]}
    assert got == {k: (kind, batch * macs) for k, (kind, macs) in want.items()}
    assert [row["name"] for row in r["layers"]] == list(want)  # execution order
    bops = batch * (16 * hw * 8 * 9 + 16 * hw * 4 * 9 + 160)
    flops = batch * (8 * hw * 27 + 16 * hw * 16 + 50)
    assert (r["bops"], r["flops"]) == (bops, flops)
    assert r["ops"] == pytest.approx(bops / 64 + flops, rel=1e-12)
    assert (r["binary_layers"], r["real_layers"]) == (3, 3)
    assert net.training  # mode restored


def test_bad_input_shapes_are_clear_errors():
    with pytest.raises(ValueError, match="positive"):
        count_ops(Tiny(), (1, 3, 0, 16))
    with pytest.raises(ValueError, match="does not run on input shape"):
        count_ops(Tiny(), (1, 5, 16, 16))


def test_reactnet_a_matches_the_published_ops():
    r = count_ops(bnnc.models.create("reactnet_a"), (1, 3, 224, 224))
    assert r["ops"] == pytest.approx(0.87e8, rel=0.03)        # README / paper: 0.87e8 OPs
    assert r["bops"] == pytest.approx(4.82e9, rel=0.005)      # methods.md §12 analytic count
    assert r["flops"] == pytest.approx(0.12e8, rel=0.05)
    assert r["binary_layers"] == 13 * 2 + 5                   # 3×3 + 1×1 per block, a second 1×1 in 5 blocks
    assert r["real_layers"] == 2                              # stem conv and fc


def test_bireal18_matches_the_published_ops():
    if "bireal18" not in bnnc.models.names():
        pytest.skip("bireal18 is not registered yet")
    r = count_ops(bnnc.models.create("bireal18"), (1, 3, 224, 224))
    assert r["ops"] == pytest.approx(1.63e8, rel=0.03)        # Bi-Real README / ReActNet README: 1.63e8


def test_cli_ops_json_table_and_errors(capsys):
    assert main(["ops", "--model", "reactnet_a", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == "reactnet_a" and r["input_shape"] == [1, 3, 224, 224]
    assert r["ops"] == pytest.approx(0.87e8, rel=0.03)
    assert main(["ops", "--model", "reactnet_a", "--input-size", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "feature.13.binary_pw" in out and "OPs = BOPs/64 + FLOPs" in out
    # 64×64 is (64/224)² of the work
    total = next(line for line in out.splitlines() if line.startswith("total:"))
    bops = float(total.split("BOPs ")[1].split(",")[0])
    assert bops == pytest.approx(r["bops"] * 4 / 49, rel=1e-3)
    assert main(["ops", "--model", "no_such_model"]) == 1
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["ops", "--model", "reactnet_a", "--input-size", "0", "64"]) == 1
    assert "--input-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ops", "--help"])
    assert "1w32a" in capsys.readouterr().out
