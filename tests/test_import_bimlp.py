"""BiMLP MindSpore checkpoints (methods.md §7, §10): a .ckpt written here in the real wire format (sliced
tensor, CRC trailer, optimizer entries) with the parameter names and shapes listed in the spec imports
strictly, every value lands where it belongs, and a block computes what the MindSpore code computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnnc.checkpoints import import_checkpoint
from bnnc.errors import ModelFormatError

from .conftest import write_ms_ckpt

DIMS = (64, 128, 320, 512)
LAYERS = {"bimlp_s": (2, 2, 4, 2), "bimlp_m": (2, 3, 10, 3)}
MS_TO_TORCH = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}


def ms_shapes(name: str) -> dict[str, tuple]:
    """MindSpore parameter names → shapes of BiMLP_S / BiMLP_M, from methods.md §10.3 and §7.3–7.4
    (BatchNorm: gamma/beta/moving_mean/moving_variance; GroupNorm(1, C) of BiMLP_M: gamma/beta)."""
    group = name == "bimlp_m"
    s: dict[str, tuple] = {}

    def bn(p, c):
        for leaf in ("gamma", "beta", "moving_mean", "moving_variance"):
            s[f"{p}.{leaf}"] = (c,)

    def norm(p, c):  # the outer norms: GroupNorm in BiMLP_M
        if group:
            s[f"{p}.gamma"] = (c,)
            s[f"{p}.beta"] = (c,)
        else:
            bn(p, c)

    def move(p, c):
        s[f"{p}.bias"] = (1, c, 1, 1)

    def rprelu(p, c):
        move(f"{p}.move1", c)
        s[f"{p}.act.w"] = (1, c, 1, 1)
        move(f"{p}.move2", c)

    def mlp(p, ci, ch, co):
        move(f"{p}.move1", ci)
        s[f"{p}.fc1.weight"] = (ch, ci, 1, 1)
        bn(f"{p}.norm0", ch)
        bn(f"{p}.norm1", ch)
        rprelu(f"{p}.act1", ch)
        rprelu(f"{p}.act2", ch)
        move(f"{p}.move2", ch)
        s[f"{p}.fc2.weight"] = (co, ch, 1, 1)
        bn(f"{p}.norm2", co)
        rprelu(f"{p}.act3", co)

    s["patch_embed.proj.weight"] = (64, 3, 7, 7)
    s["patch_embed.proj.bias"] = (64,)
    norm("patch_embed.norm", 64)
    rprelu("patch_embed.act", 64)
    for stage, (c, n) in enumerate(zip(DIMS, LAYERS[name])):
        for j in range(n):
            p = f"network.{2 * stage}.{j}"
            norm(f"{p}.norm1", c)
            norm(f"{p}.norm2", c)
            s[f"{p}.weight"] = (2,)
            move(f"{p}.move_h", c)
            move(f"{p}.move_w", c)
            s[f"{p}.sfc_h.weight"] = (c, 1, 1, 7)
            s[f"{p}.sfc_w.weight"] = (c, 1, 7, 1)
            bn(f"{p}.norm_h", c)
            bn(f"{p}.norm_w", c)
            rprelu(f"{p}.act1", c)
            rprelu(f"{p}.act2", c)
            a = f"{p}.attn"
            for conv in ("fc_h", "fc_w", "fc_c", "proj", "theta_h_conv", "theta_w_conv"):
                s[f"{a}.{conv}.weight"] = (c, c, 1, 1)
            s[f"{a}.tfc_h.weight"] = (c, 2, 1, 7)
            s[f"{a}.tfc_w.weight"] = (c, 2, 7, 1)
            for m in ("fch", "fcw", "fcc", "proj", "thetah", "thetaw"):
                move(f"{a}.move_{m}", c)
            move(f"{a}.move_tfch", 2 * c)
            move(f"{a}.move_tfcw", 2 * c)
            for b in ("fc_h_bn", "fc_w_bn", "theta_h_bn", "theta_w_bn", "norm_c", "norm_h", "norm_w", "norm_proj"):
                bn(f"{a}.{b}", c)
            for r in ("fc_h_act", "fc_w_act", "theta_h_act", "theta_w_act", "act_c", "act_h", "act_w", "act_proj"):
                rprelu(f"{a}.{r}", c)
            mlp(f"{a}.reweight", c, c // 4, 3 * c)
            mlp(f"{p}.mlp", c, 4 * c, c)
        if stage < 3:
            p, d = f"network.{2 * stage + 1}", DIMS[stage + 1]
            s[f"{p}.proj.weight"] = (d, c, 1, 1)
            s[f"{p}.proj.bias"] = (d,)
            norm(f"{p}.norm", d)
            rprelu(f"{p}.act", d)
    norm("norm", 512)
    s["head.weight"] = (1000, 512)
    s["head.bias"] = (1000,)
    return s


def ms_values(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in ms_shapes(name).items():
        if k.endswith(("moving_variance", "gamma")):
            v = rng.uniform(0.5, 1.5, shape)
        elif k.endswith(".weight") and len(shape) == 1:  # the block's branch weights (w0, w1)
            v = rng.uniform(0.1, 0.4, shape)
        else:
            v = rng.normal(0, 0.3, shape)
        out[k] = v.astype(np.float32)
    return out


def write_bimlp_ckpt(path, values, sliced="head.weight"):
    entries = [(k, v, "Float32", list(v.shape)) for k, v in values.items()]
    first = next(iter(values))
    entries += [  # what ModelCheckpoint adds with a Momentum optimizer, and bookkeeping
        (f"moments.{first}", np.zeros_like(values[first]), "Float32", list(values[first].shape)),
        ("learning_rate", np.array([0.1], np.float32), "Float32", [1]),
        ("global_step", np.array([1000], np.int32), "Int32", [1]),
    ]
    return write_ms_ckpt(path, entries, crc=True, slices={sliced: 1 << 16})


def torch_name(ms_name: str) -> str:
    owner, _, leaf = ms_name.rpartition(".")
    return f"{owner}.{MS_TO_TORCH.get(leaf, leaf)}"


def _check_import(tmp_path, name):
    values = ms_values(name)
    path = write_bimlp_ckpt(tmp_path / f"{name}.ckpt", values)
    net = import_checkpoint(path, model=name)
    sd = net.state_dict()
    for k, v in values.items():
        got = sd[torch_name(k)]
        assert tuple(got.shape) == v.shape, k
        assert torch.equal(got, torch.from_numpy(v)), k
    n_params = sum(v.size for k, v in values.items() if not k.endswith(("moving_mean", "moving_variance")))
    assert sum(p.numel() for p in net.parameters()) == n_params
    return net, values


def test_bimlp_s_mindspore_ckpt_imports_strictly(tmp_path):
    net, _ = _check_import(tmp_path, "bimlp_s")
    assert not net.training
    with torch.no_grad():
        assert torch.isfinite(net(torch.randn(1, 3, 64, 64))).all()


@pytest.mark.slow
def test_bimlp_m_mindspore_ckpt_imports_strictly(tmp_path):
    _check_import(tmp_path, "bimlp_m")


def test_bimlp_s_missing_and_foreign_keys_are_named(tmp_path):
    values = ms_values("bimlp_s")
    del values["network.4.3.attn.reweight.fc2.weight"]
    values["network.4.3.attn.reweight.fc3.weight"] = np.zeros((960, 80, 1, 1), np.float32)
    values["network.1.proj.weight"] = np.zeros((128, 64, 3, 3), np.float32)
    path = write_bimlp_ckpt(tmp_path / "bad.ckpt", values)
    with pytest.raises(ModelFormatError) as e:
        import_checkpoint(path, model="bimlp_s")
    msg = str(e.value)
    for key in ("network.4.3.attn.reweight.fc2.weight", "network.4.3.attn.reweight.fc3.weight",
                "network.1.proj.weight"):
        assert key in msg


# ------------------------------------------------------------- a block, as the MindSpore code computes it


def ms_wave_block(x, e, p, c):
    """methods.md §7.1–7.2 / research/cv/BiMLP/src/bimlp.py in functional torch ops on MindSpore-named values
    (BiMLP_S: BatchNorm everywhere), inference mode."""
    def bn(t, q):
        return F.batch_norm(t, e[q + ".moving_mean"], e[q + ".moving_variance"], e[q + ".gamma"], e[q + ".beta"],
                            False, 0.0, 1e-5)

    def move(t, q):
        return t + e[q + ".bias"]

    def rprelu(t, q):  # MindSpore prelu: max part + w · min part
        t = move(t, q + ".move1")
        return move(t.clamp(min=0) + e[q + ".act.w"] * t.clamp(max=0), q + ".move2")

    def qconv(t, q, groups=1, pad=0):  # dorefa_a nbit 1 + XnorM
        w = e[q + ".weight"]
        wb = torch.sign(w) * w.abs().mean(1, keepdim=True)
        return F.conv2d(torch.round(t.clamp(-1, 1)), wb, None, 1, pad, 1, groups)

    def reduce4(t):
        return (t[:, ::4] + t[:, 1::4] + t[:, 2::4] + t[:, 3::4]) / 4.0

    def mlp(t, q, cin, ch, cout):
        inp = t.repeat(1, 4, 1, 1) if ch // cin == 4 else reduce4(t)
        inp = rprelu(bn(inp, q + ".norm0"), q + ".act1")
        t = rprelu(bn(qconv(move(t, q + ".move1"), q + ".fc1"), q + ".norm1") + inp, q + ".act2")
        inp = t.repeat(1, 12, 1, 1) if cout // ch == 12 else reduce4(t)
        return rprelu(bn(qconv(move(t, q + ".move2"), q + ".fc2"), q + ".norm2") + inp, q + ".act3")

    def unit(t, mv, conv, norm, act):
        t = move(t, mv)
        return rprelu(bn(qconv(t, conv), norm) + t, act)

    def patm(u, a):
        th_h = unit(u, a + ".move_thetah", a + ".theta_h_conv", a + ".theta_h_bn", a + ".theta_h_act")
        th_w = unit(u, a + ".move_thetaw", a + ".theta_w_conv", a + ".theta_w_bn", a + ".theta_w_act")
        x_h = unit(u, a + ".move_fch", a + ".fc_h", a + ".fc_h_bn", a + ".fc_h_act")
        x_w = unit(u, a + ".move_fcw", a + ".fc_w", a + ".fc_w_bn", a + ".fc_w_act")
        x_h = move(torch.cat([x_h * torch.cos(th_h), x_h * torch.sin(th_h)], 1), a + ".move_tfch")
        x_w = move(torch.cat([x_w * torch.cos(th_w), x_w * torch.sin(th_w)], 1), a + ".move_tfcw")
        h = rprelu(bn(qconv(x_h, a + ".tfc_h", c, (0, 3)), a + ".norm_h") + (x_h[:, ::2] + x_h[:, 1::2]) / 2,
                   a + ".act_h")
        w = rprelu(bn(qconv(x_w, a + ".tfc_w", c, (3, 0)), a + ".norm_w") + (x_w[:, ::2] + x_w[:, 1::2]) / 2,
                   a + ".act_w")
        cc = unit(u, a + ".move_fcc", a + ".fc_c", a + ".norm_c", a + ".act_c")
        g = (h + w + cc + u).mean((2, 3), keepdim=True)
        g = mlp(g, a + ".reweight", c, c // 4, 3 * c).reshape(u.shape[0], c, 3).permute(2, 0, 1).softmax(0)
        v = h * g[0][..., None, None] + w * g[1][..., None, None] + cc * g[2][..., None, None] + u
        return unit(v, a + ".move_proj", a + ".proj", a + ".norm_proj", a + ".act_proj")

    x = x + patm(bn(x, p + ".norm1"), p + ".attn")
    mid = bn(x, p + ".norm2")
    a = mlp(mid, p + ".mlp", c, 4 * c, c)
    mh, mw = move(mid, p + ".move_h"), move(mid, p + ".move_w")
    b = rprelu(bn(qconv(mh, p + ".sfc_h", c, (0, 3)), p + ".norm_h") + mh, p + ".act1")
    cw = rprelu(bn(qconv(mw, p + ".sfc_w", c, (3, 0)), p + ".norm_w") + mw, p + ".act2")
    wt = e[p + ".weight"]
    return x + wt[0] * b + wt[1] * cw + (1 - wt[0] - wt[1]) * a


def test_imported_block_computes_what_mindspore_computes(tmp_path):
    net, values = _check_import(tmp_path, "bimlp_s")
    e = {k: torch.from_numpy(v).double() for k, v in values.items()}
    x = torch.randn(2, 128, 9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        want = ms_wave_block(x, e, "network.2.1", 128)
        got = net.network[2][1].double()(x)
    assert (got - want).abs().max() <= 1e-9 * max(1.0, want.abs().max().item())
    assert (want - x).abs().max() > 0.1  # the block does something
