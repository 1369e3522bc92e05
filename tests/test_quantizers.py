"""Quantizers, schedules and learnable activations against closed forms restated from
``../shared/spec/methods.md`` (computed here in float64 NumPy, independently of the implementation)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bnnc import quantizers as Q
from bnnc.activations import LearnableBias, Maxout, RPReLU
from bnnc.quantizers import NotExportableError, get_activation_quantizer, get_weight_quantizer
from bnnc.schedules import EDESchedule, FDASchedule, RBNNSchedule

ADABIN_FIXTURE = Path("/work/shared/fixtures/adabin_resnet20_cifar10/model.th")

EDGES = [-1.5, -1.0, -0.999, -0.5, -1e-3, 0.0, 1e-3, 0.5, 0.999, 1.0, 1.5]


def _x(shape=(2, 3, 4, 4), seed=0, scale=1.0, edges=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if edges:
        flat = x.view(-1)
        flat[: len(EDGES)] = torch.tensor(EDGES)
    return x


def _grads(out, inputs, seed=1):
    """(upstream G, d(Σ G·out)/d inputs)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return g, torch.autograd.grad((out * g).sum(), inputs)


def _np(t):
    return t.detach().double().numpy()


def _sign(u):
    return np.where(u >= 0, 1.0, -1.0)


def _approx_sign_deriv(u):  # §5.1, piecewise as written there
    return np.where(u < -1, 0.0, np.where(u < 0, 2 + 2 * u, np.where(u < 1, 2 - 2 * u, 0.0)))


def _ede_deriv(u, t, k):  # §3.2
    return k * t * (1 - np.tanh(t * u) ** 2)


def _rbnn_deriv(u, t, k):  # §6.1
    return np.maximum(0.0, k * (math.sqrt(2) * t - t * t * np.abs(u)))


def _sine_deriv(u, n, omega=0.1):  # §2.1–2.2: Σ_{i=0}^{n} (n + 1 terms), 0 where |u| > 1
    total = sum(np.cos((2 * i + 1) * omega * u) for i in range(n + 1))
    return np.where(np.abs(u) > 1, 0.0, 4 * omega / math.pi * total)


def _standardize_backward(h, wh, sigma, ddof):
    """d/dw of Σ h·ŵ for ŵ = (w − mean)/σ per row, σ = sqrt(Σ(w − mean)²/(n − ddof))."""
    n = wh.shape[1]
    return (h - h.mean(1, keepdims=True) - wh * (h * wh).sum(1, keepdims=True) / (n - ddof)) / sigma


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(_np(a) if torch.is_tensor(a) else a, _np(b) if torch.is_tensor(b) else b,
                               rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- registry


def test_registered_names():
    assert set(Q.ACTIVATION_QUANTIZERS) == {"sign", "approx_sign", "ede", "rsign", "adabin", "fda", "rbnn", "bimlp"}
    assert set(Q.WEIGHT_QUANTIZERS) == {"sign", "xnor", "ede", "libra_pb", "adabin", "magnitude_aware", "fda",
                                        "rbnn", "bimlp"}
    for name, cls in Q.ACTIVATION_QUANTIZERS.items():
        assert isinstance(get_activation_quantizer(name), cls) and cls.name == name
    for name, cls in Q.WEIGHT_QUANTIZERS.items():
        assert isinstance(get_weight_quantizer(name), cls) and cls.name == name


# -------------------------------------------------------------------------------------------- schedules


def test_schedules_first_and_last_epoch():
    E = 400
    t, k = EDESchedule()(0, E)
    assert t == pytest.approx(0.1, rel=1e-12) and k == pytest.approx(10.0, rel=1e-12)
    t, k = EDESchedule()(E - 1, E)  # Tmin·(Tmax/Tmin)^((E−1)/E): never reaches Tmax
    assert t == pytest.approx(0.1 * 100 ** ((E - 1) / E), rel=1e-12) and k == 1.0
    t, k = EDESchedule(1e-3, 10)(0, E)
    assert t == pytest.approx(1e-3, rel=1e-12) and k == pytest.approx(1e3, rel=1e-12)
    t, k = EDESchedule()(E // 2, E)  # t = 1 in the middle of a 0.1 → 10 schedule
    assert t == pytest.approx(1.0, rel=1e-12) and k == pytest.approx(1.0, rel=1e-12)
    t, k = RBNNSchedule()(0, E)
    assert t == pytest.approx(1e-2, rel=1e-12) and k == pytest.approx(100.0, rel=1e-12)
    t, k = RBNNSchedule()(E - 1, E)
    assert t == pytest.approx(1e-2 * 1000 ** ((E - 1) / E), rel=1e-12) and k == 1.0
    assert EDESchedule().initial == (0.1, 10.0) and RBNNSchedule().initial == (0.1, 10.0)
    n, a = FDASchedule()(0, E)
    assert n == 9 and a == pytest.approx(0.05 * (1 + math.cos(math.pi / E)), rel=1e-12)
    n, a = FDASchedule()(E - 1, E)
    assert n == 9 + (9 * (E - 1)) // E == 17 and a == 0.0
    assert FDASchedule()(200, E)[0] == 13 and FDASchedule().initial == (9, pytest.approx(0.1))


# ----------------------------------------------------------------------------------- plain activations


def test_sign_ste_clipped():
    x = _x().requires_grad_()
    y = Q.SignSTE()(x)
    _close(y, _sign(_np(x)))
    g, (dx,) = _grads(y, [x])
    _close(dx, _np(g) * (np.abs(_np(x)) <= 1))


def test_approx_sign():
    x = _x().requires_grad_()
    y = Q.ApproxSign()(x)
    _close(y, _sign(_np(x)))
    assert y.view(-1)[EDGES.index(0.0)] == 1.0  # sign(0) = +1
    g, (dx,) = _grads(y, [x])
    _close(dx, _np(g) * _approx_sign_deriv(_np(x)))


@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_ede_and_its_schedule(kind):
    q = Q.EDESign() if kind == "activation" else Q.EDEWeight()
    E = 10
    for epoch, (t, k) in [(None, (0.1, 10.0)), (0, (0.1, 10.0)), (E - 1, (0.1 * 100 ** 0.9, 1.0))]:
        if epoch is not None:
            q.on_epoch(epoch, E)
        assert (q.t, q.k) == (pytest.approx(t, rel=1e-12), pytest.approx(k, rel=1e-12))
        x = _x(scale=2.0).requires_grad_()
        out = q(x) if kind == "activation" else q(x)[0]
        _close(out, _sign(_np(x)))
        g, (dx,) = _grads(out, [x])
        _close(dx, _np(g) * _ede_deriv(_np(x), t, k))


def test_rsign():
    c = 3
    q = Q.RSign()
    x = _x(scale=1.5)
    q(x)  # sizes the bias at the first forward
    assert q.bias.shape == (1, c, 1, 1)
    with torch.no_grad():
        q.bias.copy_(torch.tensor([0.3, -0.4, 0.0]).view(1, c, 1, 1))
    x[0, 0, 0, 0] = -0.3  # x + b = 0 exactly → +1
    x = x.requires_grad_()
    y = q(x)
    b = _np(q.bias)
    u = _np(x) + b
    _close(y, _sign(u))
    assert y[0, 0, 0, 0] == 1.0
    g, (dx, db) = _grads(y, [x, q.bias])
    _close(dx, _np(g) * _approx_sign_deriv(u))
    _close(db, (_np(g) * _approx_sign_deriv(u)).sum((0, 2, 3), keepdims=True))
    d = q.deploy(c)
    _close(d.threshold, -b.reshape(-1))


# ------------------------------------------------------------------------------------------------ AdaBin


@pytest.mark.parametrize("alpha,beta", [(0.7, 0.2), (1.0, 0.0), (-0.5, 0.3)])
def test_adabin_activation_forward_and_gradients(alpha, beta):
    q = Q.AdaBinActivation(alpha, beta)
    x = _x(scale=1.5)
    x.view(-1)[-3:] = torch.tensor([beta, beta + alpha, beta - alpha])  # u = 0, ±1
    x = x.requires_grad_()
    y = q(x)
    a, b = _np(q.alpha_a), _np(q.beta_a)
    xn = _np(x)
    u = (xn - b) / a
    s = _sign(u)
    _close(y, a * (s + b))  # the official α·(s + β)
    g, (dx, da, db) = _grads(y, [x, q.alpha_a, q.beta_a])
    fp = _approx_sign_deriv(u)
    gn = _np(g)
    _close(dx, gn * fp)
    _close(da, (gn * (s + b - u * fp)).sum())
    _close(db, (gn * (a - fp)).sum())


def _check_activation_deploy(q, x, channels):
    d = q.deploy(channels)
    assert d.threshold.shape == d.p.shape == d.q.shape == (channels,)
    view = (1, channels, 1, 1)
    s = torch.where(x >= d.threshold.view(view), 1.0, -1.0)
    mapped = d.p.view(view) * s + d.q.view(view)
    q.eval()
    with torch.no_grad():
        assert torch.equal(q(x), mapped)  # eval/export form = the deploy mapping, bit for bit
    q.train()
    _close(q(x.clone().requires_grad_()), mapped, 1e-6)  # the training value, up to float rounding
    return d


def test_adabin_activation_deploy_all_alpha_signs():
    c = 4
    for alpha, beta in [(0.7, 0.2), (-0.6, 0.25), (0.0, 0.4)]:
        q = Q.AdaBinActivation(alpha, beta)
        x = _x((3, c, 5, 5), seed=3)
        x.view(-1)[:4] = torch.tensor(beta)  # ties at the threshold
        d = _check_activation_deploy(q, x, c)
        assert torch.all(d.p >= 0)
        _close(d.p, np.full(c, abs(alpha)))
        _close(d.q, np.full(c, float(np.float32(alpha) * np.float32(beta))))


@pytest.mark.skipif(not ADABIN_FIXTURE.exists(), reason="AdaBin fixture checkpoint not available")
def test_adabin_checkpoint_values_and_deploy():
    ckpt = torch.load(ADABIN_FIXTURE, weights_only=True, map_location="cpu")
    sd = ckpt["state_dict"]
    prefixes = sorted(k[: -len("alpha_a")] for k in sd if k.endswith("binary_a.alpha_a"))
    assert len(prefixes) == 18  # all block convs of ResNet-20
    alphas = np.array([float(sd[p + "alpha_a"]) for p in prefixes])
    betas = np.array([float(sd[p + "beta_a"]) for p in prefixes])
    # methods.md §1.2: α_a ∈ [0.23, 1.08], β_a ∈ [−0.08, 0.82], given to two decimals
    assert round(alphas.min(), 2) == 0.23 and round(alphas.max(), 2) == 1.08
    assert round(betas.min(), 2) == -0.08 and round(betas.max(), 2) == 0.82
    assert np.all(alphas > 0)
    x = _x((2, 16, 4, 4), seed=5, scale=1.5)
    for p in prefixes:
        q = Q.AdaBinActivation()
        q.load_state_dict({"alpha_a": sd[p + "alpha_a"], "beta_a": sd[p + "beta_a"]})
        a, b = float(sd[p + "alpha_a"]), float(sd[p + "beta_a"])
        with torch.no_grad():
            q.train()
            _close(q(x), a * (_sign(_np(x) - b) + b), 1e-6)  # α·(s + β), threshold at β
        _check_activation_deploy(q, x, 16)


def test_adabin_weight_forward_gradients_and_deploy():
    q = Q.AdaBinWeight()
    assert (q.t, q.k) == (0.1, 10.0)
    q.on_epoch(0, 400)
    assert q.t == pytest.approx(1e-3) and q.k == pytest.approx(1e3)
    q.on_epoch(399, 400)
    t, k = q.t, q.k
    assert t == pytest.approx(1e-3 * 1e4 ** (399 / 400), rel=1e-12) and k == 1.0
    w = (_x((4, 3, 3, 3), seed=7, edges=False) * 0.1 + 0.02).requires_grad_()
    s, r, tt = q(w)
    wn = _np(w).reshape(4, -1)
    beta = wn.mean(1, keepdims=True)
    alpha = np.sqrt(((wn - beta) ** 2).mean(1, keepdims=True))  # population std
    wh = (wn - beta) / alpha
    _close(s.reshape(4, -1), _sign(wh))
    _close(r, alpha.ravel())
    _close(tt, beta.ravel())
    wb = r.view(-1, 1, 1, 1) * s + tt.view(-1, 1, 1, 1)
    g, (dw,) = _grads(wb, [w])
    gn = _np(g).reshape(4, -1)
    h = gn * alpha * _ede_deriv(wh, t, k)
    expect = (_standardize_backward(h, wh, alpha, 0) + (gn * _sign(wh)).sum(1, keepdims=True) * wh / wh.shape[1]
              + gn.sum(1, keepdims=True) / wh.shape[1])
    _close(dw.reshape(4, -1), expect, 1e-4)


# ------------------------------------------------------------------------------------------------ IR-Net


def test_libra_pb():
    q = Q.LibraPBWeight()
    q.on_epoch(3, 10)
    t, k = q.t, q.k
    assert t == pytest.approx(0.1 * 100 ** 0.3, rel=1e-12)
    w = (_x((5, 2, 3, 3), seed=11, edges=False) * 0.05 - 0.01).requires_grad_()
    s, r, tt = q(w)
    assert tt is None
    wn = _np(w).reshape(5, -1)
    c = wn - wn.mean(1, keepdims=True)
    sigma = c.std(1, ddof=1, keepdims=True)  # torch.std: unbiased
    wh = c / sigma
    scale = 2.0 ** np.round(np.log2(np.abs(wh).mean(1)))
    _close(s.reshape(5, -1), _sign(wh))
    _close(r, scale)
    assert set(np.log2(_np(r)).tolist()) <= set(range(-4, 5))  # powers of two
    g, (dw,) = _grads(r.view(-1, 1, 1, 1) * s, [w])
    h = _np(g).reshape(5, -1) * scale[:, None] * _ede_deriv(wh, t, k)  # scale detached
    _close(dw.reshape(5, -1), _standardize_backward(h, wh, sigma, 1), 1e-4)


def test_magnitude_aware_weight():
    w = _x((4, 3, 3, 3), seed=12, scale=0.8).requires_grad_()
    s, r, t = Q.MagnitudeAwareWeight()(w)
    wn = _np(w).reshape(4, -1)
    m = np.abs(wn).mean(1)
    _close(s.reshape(4, -1), _sign(wn))
    _close(r, m)
    g, (dw,) = _grads(r.view(-1, 1, 1, 1) * s, [w])
    _close(dw.reshape(4, -1), _np(g).reshape(4, -1) * m[:, None] * (np.abs(wn) <= 1))  # magnitude-aware


def test_xnor_weight_gradient_through_alpha():
    w = _x((3, 2, 3, 3), seed=13, scale=0.8).requires_grad_()
    s, r, _ = Q.XnorWeight()(w)
    wn = _np(w).reshape(3, -1)
    g, (dw,) = _grads(r.view(-1, 1, 1, 1) * s, [w])
    gn = _np(g).reshape(3, -1)
    n = wn.shape[1]
    expect = gn * np.abs(wn).mean(1, keepdims=True) * (np.abs(wn) <= 1) + (gn * _sign(wn)).sum(1, keepdims=True) * \
        np.sign(wn) / n
    _close(dw.reshape(3, -1), expect)


# --------------------------------------------------------------------------------------------------- FDA


def test_fda_activation_backward_is_truncated_sine_series():
    q = Q.FDASign()
    for epoch, E in [(399, 400), (0, 1)]:  # last epoch: n = 17, α = 0 (no noise path)
        q.on_epoch(epoch, E)
        assert q.alpha == 0.0
        x = _x(scale=1.2).requires_grad_()
        y = q(x)
        _close(y, _sign(_np(x)))
        g, (dx,) = _grads(y, [x])
        _close(dx, _np(g) * _sine_deriv(_np(x), q.n))
    assert q.n == 9


def test_fda_weight_noise_path_and_scale():
    q = Q.FDAWeight()
    q.on_epoch(0, 4)
    n, a = q.n, q.alpha
    assert n == 9 and a == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    w = _x((3, 128, 1, 1), seed=21, scale=0.7).requires_grad_()  # d = 128 → hidden d/64 = 2
    s, r, t = q(w)
    assert q.noise.w1.shape == (2, 128) and q.noise.w2.shape == (128, 2)
    wn = _np(w).reshape(3, -1)
    _close(s.reshape(3, -1), _sign(wn), 0)  # forward exactly ±1 despite the noise module
    _close(r, np.full(3, np.abs(wn).mean()))
    g, (dw, dw1, dw2) = _grads(s, [w, q.noise.w1, q.noise.w2])
    G = _np(g).reshape(3, -1)
    W1, W2 = _np(q.noise.w1), _np(q.noise.w2)
    z = wn @ W1.T
    back = (G @ W2) * (z > 0)
    expect = G * _sine_deriv(wn, n) + a * (back @ W1 + 0.1 * np.cos(wn) * G)
    _close(dw.reshape(3, -1), expect)
    _close(dw2, a * G.T @ np.maximum(z, 0))
    _close(dw1, a * back.T @ wn)


def test_fda_activation_noise_over_channels():
    q = Q.FDASign()
    q.on_epoch(1, 4)
    a = q.alpha
    x = _x((2, 64, 2, 2), seed=22).requires_grad_()
    y = q(x)
    _close(y, _sign(_np(x)), 0)
    g, (dx,) = _grads(y, [x])
    rows = _np(x).transpose(0, 2, 3, 1).reshape(-1, 64)
    G = _np(g).transpose(0, 2, 3, 1).reshape(-1, 64)
    W1, W2 = _np(q.noise.w1), _np(q.noise.w2)
    assert W1.shape == (1, 64)
    expect = G * _sine_deriv(rows, q.n) + a * (((G @ W2) * (rows @ W1.T > 0)) @ W1 + 0.1 * np.cos(rows) * G)
    _close(dx.permute(0, 2, 3, 1).reshape(-1, 64), expect)


# -------------------------------------------------------------------------------------------------- RBNN


def _rbnn(seed=0, shape=(4, 2, 3, 3)):
    torch.manual_seed(seed)
    q = Q.RBNNWeight()
    w = _x(shape, seed=seed + 100, edges=False) * 0.1
    return q, w


def test_rbnn_weight_forward_and_gradients():
    assert Q.rbnn_ab(144) == (12, 12) and Q.rbnn_ab(288) == (16, 18) and Q.rbnn_ab(1152) == (32, 36)
    assert Q.rbnn_ab(18) == (3, 6) and Q.rbnn_ab(128) == (8, 16)
    q, w = _rbnn()
    q.on_epoch(2, 10)
    q.update_pending = False  # gradients here; rotation updates tested below
    t, k = q.t, q.k
    assert t == pytest.approx(1e-2 * 1e3 ** 0.2, rel=1e-12) and k == pytest.approx(1 / t)
    q(w)  # sizes R1 (3×3), R2 (6×6), alpha = mean|W|, θ = π/2
    assert q.R1.shape == (3, 3) and q.R2.shape == (6, 6) and q.rotate.shape == (4, 1, 1, 1)
    _close(q.alpha.view(-1), np.abs(_np(w)).reshape(4, -1).mean(1))
    _close(q.rotate.view(-1), np.full(4, math.pi / 2), 1e-6)
    with torch.no_grad():
        q.rotate.copy_(torch.tensor([0.3, 1.0, -0.7, 2.5]).view(4, 1, 1, 1))
    w = w.requires_grad_()
    s, r, tt = q(w)
    assert tt is None
    wn = _np(w).reshape(4, -1)
    c = wn - wn.mean(1, keepdims=True)
    sigma = c.std(1, ddof=1, keepdims=True)
    w2 = c / sigma
    R1, R2, th = _np(q.R1), _np(q.R2), _np(q.rotate).reshape(4, 1)
    wrot = np.stack([R1.T @ xo.reshape(3, 6) @ R2 for xo in w2]).reshape(4, -1)
    w3 = w2 + np.abs(np.sin(th)) * (wrot - w2)
    _close(s.reshape(4, -1), _sign(w3))
    _close(r, _np(q.alpha).ravel())
    g, (dw, dalpha, dth) = _grads(r.view(-1, 1, 1, 1) * s, [w, q.alpha, q.rotate])
    G = _np(g).reshape(4, -1)
    h = G * _np(q.alpha).reshape(4, 1) * _rbnn_deriv(w3, t, k)
    _close(dalpha.view(-1), (G * _sign(w3)).sum(1))
    _close(dth.view(-1), (h * (wrot - w2)).sum(1) * np.sign(np.sin(th.ravel())) * np.cos(th.ravel()), 1e-4)
    _close(dw.reshape(4, -1), _standardize_backward(h * (1 - np.abs(np.sin(th))), w2, sigma, 1), 1e-4)


def test_rbnn_rotation_update_lowers_angular_bias():
    q, w = _rbnn(seed=1, shape=(8, 4, 3, 3))  # N = 36 → 6×6
    q(w)  # init, no update armed
    x = q.standardized(w)

    def mean_angle():
        wr = (q.R1.t() @ x @ q.R2).reshape(8, -1)
        cos = wr.abs().sum(1) / (wr.norm(dim=1) * math.sqrt(wr.shape[1]))  # cos∠(w, sign w)
        return torch.arccos(cos).mean().item(), wr.abs().sum().item()

    before, l1_before = mean_angle()
    r1 = q.R1.clone()
    # the spec's alternating rounds (§6.1 step 3), in float64 NumPy from the same start
    X, R1, R2 = _np(x), _np(q.R1), _np(q.R2)
    objective = []
    for _ in range(3):
        B = np.sign(np.einsum("ji,ojk,kl->oil", R1, X, R2))  # B_o = sign(R1ᵀ X_o R2)
        objective.append((B * np.einsum("ji,ojk,kl->oil", R1, X, R2)).sum())
        U1, _, V1t = np.linalg.svd(sum(B[o] @ R2.T @ X[o].T for o in range(8)))  # D1 = U1 S1 V1ᵀ
        R1 = V1t.T @ U1.T
        objective.append((B * np.einsum("ji,ojk,kl->oil", R1, X, R2)).sum())
        U2, _, V2t = np.linalg.svd(sum(X[o].T @ R1 @ B[o] for o in range(8)))  # D2 = U2 S2 V2ᵀ
        R2 = U2 @ V2t
        objective.append((B * np.einsum("ji,ojk,kl->oil", R1, X, R2)).sum())
    assert all(b >= a - 1e-9 for a, b in zip(objective, objective[1:]))  # tr(Bᵀ R1ᵀ X R2) never decreases
    q.eval()
    q.on_epoch(0, 10)
    q(w)  # eval: no update
    assert torch.equal(q.R1, r1)
    q.train()
    q(w)  # first training forward of the epoch: update
    after, l1_after = mean_angle()
    assert after < before - 1e-3 and l1_after > l1_before
    _close(q.R1, R1, 1e-4)
    _close(q.R2, R2, 1e-4)
    eye6 = torch.eye(6)
    _close(q.R1 @ q.R1.t(), eye6, 1e-5)
    _close(q.R2 @ q.R2.t(), eye6, 1e-5)
    r1, r2 = q.R1.clone(), q.R2.clone()
    q(w)  # same epoch: no second update
    assert torch.equal(q.R1, r1) and torch.equal(q.R2, r2)
    q2 = Q.RBNNWeight(rotation_update=2)
    q2.on_epoch(1, 10)
    assert not q2.update_pending
    q2.on_epoch(2, 10)
    assert q2.update_pending


def test_rbnn_state_dict_round_trip_and_lazy_optimizer():
    q, w = _rbnn(seed=2)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)  # built before the parameters are sized
    s, r, _ = q(w.requires_grad_())
    (r.view(-1, 1, 1, 1) * s).sum().backward()
    before = q.alpha.detach().clone()
    opt.step()
    assert not torch.equal(q.alpha, before)
    fresh = Q.RBNNWeight()
    fresh.load_state_dict(q.state_dict())
    (s1, r1, t1), (s2, r2, t2) = fresh(w), q(w)
    assert torch.equal(s1, s2) and torch.equal(r1, r2) and t1 is t2 is None


def test_rbnn_activation():
    q = Q.RBNNActivation()
    q.on_epoch(0, 10)  # t = 0.01 → t' = max(t, 1) = 1, k = 1
    for epoch in (0, 9):
        q.on_epoch(epoch, 10)
        tp = max(q.t, 1.0)
        x = (_x((2, 3, 3, 3), seed=31 + epoch) + 0.5).requires_grad_()
        y = q(x)
        xn = _np(x).reshape(2, -1)
        c = xn - xn.mean(1, keepdims=True)
        sigma = c.std(1, ddof=1, keepdims=True)
        a2 = c / sigma
        _close(y.reshape(2, -1), _sign(a2))
        g, (dx,) = _grads(y, [x])
        h = _np(g).reshape(2, -1) * _rbnn_deriv(a2, tp, 1.0)
        _close(dx.reshape(2, -1), _standardize_backward(h, a2, sigma, 1), 1e-4)
    d = q.deploy(3)  # export: sign(x − per-sample mean) = SignBinarize(T = 0) after centering
    assert d.center and torch.equal(d.threshold, torch.zeros(3)) and torch.equal(d.p, torch.ones(3))
    assert torch.equal(d.q, torch.zeros(3))


# ------------------------------------------------------------------------------------------------- BiMLP


def test_bimlp_ternary_activation():
    q = Q.BiMLPActivation()
    x = torch.tensor([-1.5, -1.0, -0.6, -0.5, -0.4, 0.0, 0.4, 0.5, 0.6, 1.0, 1.5]).view(1, 11).requires_grad_()
    y = q(x)
    _close(y.view(-1), [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1])  # rint: halves to even
    g, (dx,) = _grads(y, [x])
    _close(dx, _np(g) * (np.abs(_np(x)) <= 1))
    terms = q.deploy(11).terms()  # ternary = ½·sign(x ≥ T₁) + ½·sign(x ≥ T₂), rint's ties included
    xs = x.detach().view(-1)
    mapped = sum(p * torch.where(xs >= t, 1.0, -1.0) + qq for t, p, qq in terms)
    _close(mapped, [-1, -1, -1, 0, 0, 0, 0, 0, 1, 1, 1])


def test_bimlp_weight():
    w = _x((4, 6, 1, 1), seed=41, scale=2.0).requires_grad_()
    s, r, t = Q.BiMLPWeight()(w)
    wn = _np(w).reshape(4, -1)
    _close(s.reshape(4, -1), _sign(wn))
    _close(r, np.abs(wn).mean(1))
    g, (dw,) = _grads(r.view(-1, 1, 1, 1) * s, [w])
    _close(dw, _np(g))  # identity STE through the whole op
    with pytest.raises(ValueError, match="1×1"):
        Q.BiMLPWeight()(torch.randn(4, 1, 1, 7))


# ------------------------------------------------------------------------------------------------ deploy


@pytest.mark.parametrize("name", ["sign", "approx_sign", "ede", "rsign", "adabin", "fda"])
def test_activation_deploy_matches_forward(name):
    c = 5
    q = get_activation_quantizer(name)
    x = _x((3, c, 4, 4), seed=51, scale=1.5)
    q(x)
    with torch.no_grad():
        for p in q.parameters():  # nontrivial learned values
            if p.numel() == c:
                p.copy_(torch.linspace(-0.5, 0.5, c).view(p.shape))
        if name == "adabin":
            q.alpha_a.fill_(0.6), q.beta_a.fill_(-0.3)
    d = q.deploy(c)
    x.view(-1)[: c * 16: 16] = d.threshold  # exact ties in each channel
    _check_activation_deploy(q, x, c)


def test_activation_without_a_deploy_mapping_is_not_exportable():
    class Custom(Q.ActivationQuantizer):
        def forward(self, x):
            return x.sign()

    with pytest.raises(NotExportableError, match="Custom does not declare a deploy mapping"):
        Custom().deploy(4)


@pytest.mark.parametrize("name", sorted(Q.WEIGHT_QUANTIZERS))
def test_weight_deploy_matches_training_forward(name):
    torch.manual_seed(0)
    q = get_weight_quantizer(name)
    q.on_epoch(1, 5)
    if name == "rbnn":
        q.update_pending = False
    w = _x((6, 8, 1, 1) if name == "bimlp" else (6, 4, 3, 3), seed=61, scale=0.3).requires_grad_()
    s, r, t = q(w)
    o = w.shape[0]
    wb = s * (1 if r is None else r.view(o, 1, 1, 1)) + (0 if t is None else t.view(o, 1, 1, 1))
    sd, rd, td = q.deploy(w)
    assert not (sd.requires_grad or rd.requires_grad or td.requires_grad)
    assert set(sd.unique().tolist()) <= {-1.0, 1.0} and rd.shape == td.shape == (o,)
    _close(rd.view(o, 1, 1, 1) * sd + td.view(o, 1, 1, 1), wb, 1e-6)
    if name != "adabin":
        assert torch.all(td == 0)


def test_weight_sign_of_zero_is_plus_one():
    w = torch.zeros(2, 1, 1, 1)
    for name in ("sign", "ede", "magnitude_aware", "fda"):
        assert torch.all(get_weight_quantizer(name)(w)[0] == 1)


# ------------------------------------------------------------------------------------------- activations


def test_maxout():
    m = Maxout(3)
    with torch.no_grad():
        m.pos_scale.copy_(torch.tensor([1.0, 0.5, 2.0]))
        m.neg_scale.copy_(torch.tensor([0.25, -0.1, 0.0]))
    x = _x((2, 3, 2, 2), seed=71).requires_grad_()
    y = m(x)
    p, n, xn = _np(m.pos_scale).reshape(1, 3, 1, 1), _np(m.neg_scale).reshape(1, 3, 1, 1), _np(x)
    _close(y, p * np.maximum(xn, 0) - n * np.maximum(-xn, 0))
    g, (dx, dp, dn) = _grads(y, [x, m.pos_scale, m.neg_scale])
    gn = _np(g)
    _close(dx, gn * np.where(xn > 0, p, np.where(xn < 0, n, 0)))
    _close(dp, (gn * np.maximum(xn, 0)).sum((0, 2, 3)))
    _close(dn, -(gn * np.maximum(-xn, 0)).sum((0, 2, 3)))
    assert torch.equal(Maxout(4).neg_scale, torch.full((4,), 0.25))


def test_rprelu_and_learnable_bias():
    m = RPReLU(3)
    with torch.no_grad():
        m.bias1.bias.copy_(torch.tensor([0.2, -0.1, 0.0]).view(1, 3, 1, 1))
        m.bias2.bias.copy_(torch.tensor([-0.3, 0.4, 0.1]).view(1, 3, 1, 1))
        m.prelu.weight.copy_(torch.tensor([0.25, 0.5, -0.2]))
    x = _x((2, 3, 2, 2), seed=72)
    gamma, zeta = -np.array([0.2, -0.1, 0.0]).reshape(1, 3, 1, 1), np.array([-0.3, 0.4, 0.1]).reshape(1, 3, 1, 1)
    beta = np.array([0.25, 0.5, -0.2]).reshape(1, 3, 1, 1)
    xn = _np(x)
    _close(m(x), np.where(xn > gamma, xn - gamma + zeta, beta * (xn - gamma) + zeta))
    lb = LearnableBias(3)
    assert lb.bias.shape == (1, 3, 1, 1) and torch.equal(lb(x), x)
    _close(m(torch.zeros(5, 3)), np.broadcast_to(np.where(0 > gamma, -gamma, beta * -gamma) + zeta, (1, 3, 1, 1))
           .reshape(1, 3).repeat(5, 0))


# ------------------------------------------------------------------------------------------- integration


def test_lazy_rsign_with_optimizer_and_state_dict():
    q = Q.RSign()
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    x = _x((2, 4, 3, 3), seed=81, scale=0.5)
    q(x).sum().backward()
    opt.step()
    assert q.bias.shape == (1, 4, 1, 1) and torch.any(q.bias != 0)
    fresh = Q.RSign()
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


@pytest.mark.parametrize("aq,wq", [("adabin", "adabin"), ("rsign", "magnitude_aware"), ("ede", "libra_pb"),
                                   ("fda", "fda"), ("rbnn", "rbnn")])
def test_binary_conv_with_method_quantizers(aq, wq):
    from bnnc.nn import BinaryConv2d

    torch.manual_seed(0)
    layer = BinaryConv2d(3, 4, 3, padding=1, input_quantizer=aq, weight_quantizer=wq)
    for m in layer.modules():
        if isinstance(m, (Q.ActivationQuantizer, Q.WeightQuantizer)):
            m.on_epoch(0, 3)
    x = _x((2, 3, 5, 5), seed=91).requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    with torch.no_grad():
        a = layer.input_quantizer(x)
        s, r, t = layer.weight_quantizer(layer.weight)
        wb = s * (1 if r is None else r.view(-1, 1, 1, 1)) + (0 if t is None else t.view(-1, 1, 1, 1))
        _close(layer(x), torch.nn.functional.conv2d(a, wb, padding=1), 1e-5)


# ------------------------------------------------------------------------- AdaBin training path (issue #7)


def test_sign_at_least_zero_is_where_ge_zero():
    tiny = torch.finfo(torch.float32).smallest_normal
    sub = torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)).item()  # the smallest subnormal
    d = torch.tensor([float("nan"), 0.0, -0.0, float("inf"), -float("inf"), sub, -sub, tiny, -tiny, 1.0, -3.5])
    d = torch.cat([d, torch.randn(1000, generator=torch.Generator().manual_seed(3))])
    want = torch.where(d >= 0, 1.0, -1.0)  # SignBinarize / weight_sign semantics
    assert torch.equal(Q._sign_at_least_zero_(d.clone()), want)


@pytest.mark.parametrize("alpha,beta", [(0.7, 0.2), (-0.5, 0.3), (1.3, -0.0)])
def test_adabin_activation_training_decision_next_to_the_threshold(alpha, beta):
    """In training the ±1 decision is the deploy form's, also one ulp away from the threshold."""
    q = Q.AdaBinActivation(alpha, beta)
    thr = q.deploy(1).threshold[0]
    near = [torch.nextafter(thr, torch.tensor(-math.inf)), thr, torch.nextafter(thr, torch.tensor(math.inf))]
    x = torch.cat([torch.stack(near), _x((40,), seed=4)]).reshape(1, -1, 1, 1).requires_grad_()
    y = q(x)
    xn = _np(x)
    a32, b32 = float(np.float32(alpha)), float(np.float32(beta))
    s = np.where(xn >= b32, 1.0, -1.0) if alpha > 0 else np.where(xn <= b32, 1.0, -1.0)  # sign((x − β)/α)
    np.testing.assert_array_equal(_np(y), (np.float32(a32) * (s.astype(np.float32) + np.float32(b32))))
    q.eval()
    with torch.no_grad():
        _close(q(x), y, 1e-6)


def _adabin_conv_reference(x, weight, alpha_a, beta_a, t, k, stride, padding, groups):
    """AdaBin conv in float64 from the spec's formulas (§1.1–1.2), gradients by autograd through the
    surrogates' primitives: ApproxSign F(u) = −1, 2u + u², 2u − u², 1 (F' = max(0, 2 − 2|u|)) and EDE
    k·tanh(t·u) (derivative k·t·(1 − tanh²(t·u))), each with the exact sign as its forward value."""
    u = (x - beta_a) / alpha_a
    f = torch.where(u < -1, -1.0, torch.where(u < 0, 2 * u + u * u, torch.where(u < 1, 2 * u - u * u, 1.0)))
    s_a = f + (torch.where(u >= 0, 1.0, -1.0).double() - f).detach()
    a = alpha_a * (s_a + beta_a)
    flat = weight.reshape(weight.shape[0], -1)
    beta_w = flat.mean(1, keepdim=True)
    alpha_w = ((flat - beta_w) ** 2).mean(1, keepdim=True).sqrt()
    wh = (flat - beta_w) / alpha_w
    e = k * torch.tanh(t * wh)
    s_w = e + (torch.where(wh >= 0, 1.0, -1.0).double() - e).detach()
    wb = (alpha_w * s_w + beta_w).reshape(weight.shape)
    return torch.nn.functional.conv2d(a, wb, None, stride, padding, 1, groups)


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 2), (1, 0, 1)])
def test_adabin_binary_conv_training_values_and_gradients(stride, padding, groups):
    """The training path (one conv with W_b = α_w·s + β_w) against the float64 spec reference; without
    gradients the layer computes the export op's arithmetic, bit for bit."""
    from bnnc.nn import BinaryConv2d
    from bnnc.ops import export as ops

    torch.manual_seed(0)
    layer = BinaryConv2d(4, 6, 3, stride=stride, padding=padding, groups=groups, input_quantizer="adabin",
                         weight_quantizer="adabin")
    with torch.no_grad():
        layer.weight.mul_(0.5).add_(0.03)
        layer.input_quantizer.alpha_a.fill_(0.8)
        layer.input_quantizer.beta_a.fill_(0.15)
    layer.weight_quantizer.on_epoch(3, 10)
    t, k = layer.weight_quantizer.t, layer.weight_quantizer.k
    x = _x((2, 4, 7, 7), seed=21, scale=1.2).requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(22))
    params = [x, layer.weight, layer.input_quantizer.alpha_a, layer.input_quantizer.beta_a]
    grads = torch.autograd.grad((y * g).sum(), params)

    ref_in = [p.detach().double().requires_grad_() for p in params]
    y_ref = _adabin_conv_reference(*ref_in, t, k, stride, padding, groups)
    ref_grads = torch.autograd.grad((y_ref * g.double()).sum(), ref_in)
    _close(y, y_ref, 1e-5)
    for got, want in zip(grads, ref_grads):
        scale = float(want.abs().max())
        np.testing.assert_allclose(_np(got), _np(want), rtol=1e-4, atol=1e-5 * scale)

    with torch.no_grad():
        y_eval = layer(x)
        a = layer.input_quantizer(x)
        ws, r, tt = layer.weight_quantizer.deploy(layer.weight)
        want = ops.binary_conv2d(a, ws, r, tt, [stride] * 2, [padding] * 2, [1, 1], groups)
    assert torch.equal(y_eval, want)
    _close(y_eval, y, 1e-5)
