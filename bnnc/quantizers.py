"""Quantizers: small modules handed to binary layers by name or as objects (as in larq).

A quantizer owns three things: its forward value, its surrogate gradient, and its deploy mapping onto
an affine image of ±1 (``../shared/spec/deploy.md`` §3).

Activation quantizers (``ActivationQuantizer``):
    ``forward(x)`` → a_b = p·s + q with s = +1 ⇔ x ≥ threshold (per channel), surrogate gradient in training.
    ``deploy(channels)`` → ``ActivationDeploy(threshold, p, q[, center])``, each a float tensor of shape
    [C] (or [K, C]: a sum of K thresholded signs, e.g. BiMLP's ternary levels), ``center=True`` when the
    sign is taken of x minus its per-sample mean (RBNN); raises ``NotExportableError`` when the quantizer
    has no such mapping.

Weight quantizers (``WeightQuantizer``):
    ``forward(w)`` → ``(s, r, t)``: s = ±1 tensor shaped like w (sign(0) = +1) carrying the surrogate
    gradient; r and t per output channel [O] (or None for 1 and 0). The binarized weight is
    w_b[o] = r[o]·s[o] + t[o]; the layer computes conv(a, s)·r + conv(a, 1)·t, the order of the kernels.
    ``deploy(w)`` → the same triple, detached, for export.

Both may implement ``on_epoch(epoch, epochs)``: schedules (EDE t/k, …) the trainer calls at the start
of every epoch.

Registered names (formulas in ``../shared/spec/methods.md``; each class docstring states its own):
    activations: sign, approx_sign, ede, rsign, adabin, fda, rbnn (per-sample mean threshold), bimlp (ternary)
    weights:     sign, xnor, ede, libra_pb, adabin (t ≠ 0), magnitude_aware, fda, rbnn, bimlp (1×1 only)
Quantizers with per-channel state made by name (rsign, rbnn, fda's noise module) size it at the first
forward, in place, so an optimizer built before that keeps owning the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BnncError
from .ops import export as ops
from .schedules import EDESchedule, FDASchedule, RBNNSchedule

__all__ = [
    "ActivationDeploy",
    "ActivationQuantizer",
    "WeightQuantizer",
    "NotExportableError",
    "SignSTE",
    "SignWeight",
    "XnorWeight",
    "ApproxSign",
    "EDESign",
    "RSign",
    "AdaBinActivation",
    "FDASign",
    "RBNNActivation",
    "BiMLPActivation",
    "EDEWeight",
    "LibraPBWeight",
    "AdaBinWeight",
    "MagnitudeAwareWeight",
    "FDAWeight",
    "RBNNWeight",
    "BiMLPWeight",
    "approx_sign_grad",
    "ede_grad",
    "rbnn_grad",
    "fda_grad",
    "rbnn_ab",
    "ACTIVATION_QUANTIZERS",
    "WEIGHT_QUANTIZERS",
    "get_activation_quantizer",
    "get_weight_quantizer",
    "ste",
]


class NotExportableError(BnncError):
    """A quantizer whose semantics the ``ai.bnnc`` op set cannot express (yet)."""


@dataclass
class ActivationDeploy:
    """The deploy mapping of an activation quantizer (docs/ops.md, "Activation mappings"):

        a = Σ_k (p[k, c]·s_k + q[k, c]),  s_k = +1 ⇔ u ≥ threshold[k, c] else −1,

    with u = x, or with ``center`` u = x − mean(x) over (C, H, W) of each sample, the mean computed in
    float64 and u rounded back to float32 (``center_per_sample``). Tensors are [C] (one term, K = 1: an
    affine image of a thresholded sign, the common case) or [K, C] (K terms: BiMLP's ternary levels are
    K = 2 signs at thresholds just above ½ and at −½, each with p = ½)."""

    threshold: torch.Tensor  # [C] or [K, C]: s_k = +1 ⇔ u ≥ threshold[k]
    p: torch.Tensor  # [C] or [K, C]
    q: torch.Tensor  # [C] or [K, C]
    center: bool = False  # u = x − per-sample mean over (C, H, W) (RBNN)

    def terms(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """[(threshold, p, q)] per term, each [C] float32 (detached copies)."""
        ts = [v.detach().float() for v in (self.threshold, self.p, self.q)]
        shape = ts[0].shape
        if any(v.shape != shape for v in ts) or len(shape) not in (1, 2):
            raise ValueError(f"ActivationDeploy tensors must share one shape [C] or [K, C], got "
                             f"{[tuple(v.shape) for v in ts]}")
        if len(shape) == 1:
            return [tuple(v.clone() for v in ts)]
        return [tuple(v[k].clone() for v in ts) for k in range(shape[0])]


def center_per_sample(x: torch.Tensor) -> torch.Tensor:
    """x − mean(x) over all axes but the batch axis, per sample, computed in float64 and rounded to x's dtype.

    RBNN binarizes at the per-sample mean. In float64 the sum of float32 activations is exact in most
    practical cases (and then every runtime's ReduceMean gives the same, correctly rounded mean), so an
    activation equal to its sample mean is a tie (+1) on PyTorch, ONNX Runtime and TVM alike; a float32
    mean would depend on each runtime's summation order. The export form is
    Cast(double) → ReduceMean(axes 1…) → Sub → Cast(float), the same computation."""
    xd = x.double()
    dims = tuple(range(1, x.dim()))
    return (xd - xd.mean(dims, keepdim=True)).to(x.dtype)


def ste(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Forward ``value``, backward through ``surrogate``."""
    return surrogate + (value - surrogate).detach()


def _use_plain_forward() -> bool:
    return torch.compiler.is_exporting() or not torch.is_grad_enabled()


class ActivationQuantizer(nn.Module):
    name = "base"

    def deploy(self, channels: int) -> ActivationDeploy:
        raise NotExportableError(f"{type(self).__name__} does not declare a deploy mapping")

    def on_epoch(self, epoch: int, epochs: int) -> None:
        pass


class WeightQuantizer(nn.Module):
    name = "base"

    def deploy(self, w: torch.Tensor):
        with torch.no_grad():
            s, r, t = self.forward(w.detach())
        o = w.shape[0]
        r = torch.ones(o) if r is None else r.detach().reshape(o).clone()
        t = torch.zeros(o) if t is None else t.detach().reshape(o).clone()
        return ops.weight_sign(s).clone(), r, t

    def on_epoch(self, epoch: int, epochs: int) -> None:
        pass


class SignSTE(ActivationQuantizer):
    """``sign``: s = +1 if x ≥ 0 else −1; backward is the clipped straight-through estimator
    (∂s/∂x = 1 for |x| ≤ 1, else 0), as in BinaryNet and every seed method's baseline."""

    name = "sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        s = ops.sign_binarize(x, t)
        if _use_plain_forward():
            return s
        return ste(s, x.clamp(-1.0, 1.0))

    def deploy(self, channels: int) -> ActivationDeploy:
        return ActivationDeploy(torch.zeros(channels), torch.ones(channels), torch.zeros(channels))


class SignWeight(WeightQuantizer):
    """``sign``: w_b = sign(w), clipped straight-through gradient, no scale."""

    name = "sign"

    def forward(self, w: torch.Tensor):
        return ste(ops.weight_sign(w), w.clamp(-1.0, 1.0)), None, None


class XnorWeight(WeightQuantizer):
    """``xnor``: w_b = α_o·sign(w), α_o = mean |w_o| per output channel (XNOR-Net); the gradient
    flows through α as well as through the clipped straight-through estimator."""

    name = "xnor"

    def forward(self, w: torch.Tensor):
        alpha = w.abs().mean(dim=tuple(range(1, w.dim())))
        return ste(ops.weight_sign(w), w.clamp(-1.0, 1.0)), alpha, None


# ------------------------------------------------------------------------------------ seed-method quantizers
#
# Formulas: ../shared/spec/methods.md (section numbers below). Common pattern: the forward value is an exact
# ±1 decision (bnnc convention: +1 ⇔ u ≥ 0, deploy.md §2), and in training the backward is replaced by the
# method's surrogate derivative g(u) through ``_Surrogate``. In eval / export (``_use_plain_forward``) the
# exportable activation quantizers compute exactly their deploy mapping p·SignBinarize(x, threshold) + q.


class _Surrogate(torch.autograd.Function):
    """Forward: ``value`` (a ±1 tensor computed by the caller from u); backward: grad · derivative(u)."""

    @staticmethod
    def forward(ctx, u, value, derivative):
        ctx.save_for_backward(u)
        ctx.derivative = derivative
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * ctx.derivative(u), None, None


def _binary(u: torch.Tensor, derivative, value: torch.Tensor | None = None) -> torch.Tensor:
    """±1 (+1 ⇔ u ≥ 0, or ``value``) with surrogate derivative ``derivative(u)`` in training."""
    if value is None:
        value = ops.weight_sign(u.detach())
    if _use_plain_forward():
        return value
    return _Surrogate.apply(u, value.detach(), derivative)


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel [C] (or scalar) tensor shaped to broadcast along axis 1 of x."""
    if t.dim() == 0:
        return t
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


def _threshold_sign(x: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """+1 where x ≥ threshold[c] (axis 1; None: 0) else −1, through the ``SignBinarize`` op (its value only:
    inputs are detached in training; in eval / export the graph is the same as ``SignSTE``'s)."""
    if threshold is None:
        threshold = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    elif threshold.dim() == 0:
        threshold = threshold.expand(x.shape[1]).contiguous()
    if not _use_plain_forward():
        x, threshold = x.detach(), threshold.detach()
    return ops.sign_binarize(x, threshold)


def approx_sign_grad(u: torch.Tensor) -> torch.Tensor:
    """Bi-Real ApproxSign derivative (§5.1): 2 − 2|u| for |u| < 1, else 0
    (= 2 + 2u on [−1, 0), 2 − 2u on [0, 1))."""
    return (2.0 - 2.0 * u.abs()).clamp_min(0.0)


def ede_grad(t: float, k: float):
    """IR-Net EDE derivative (§3.2): k·t·(1 − tanh²(t·u))."""

    def g(u):
        return k * t * (1.0 - torch.tanh(t * u) ** 2)

    return g


def rbnn_grad(t: float, k: float):
    """RBNN training-aware approximation (§6.1): k·max(0, √2·t − t²·|u|)."""

    def g(u):
        return (k * (math.sqrt(2.0) * t - t * t * u.abs())).clamp_min(0.0)

    return g


def fda_grad(n: int, omega: float, clip: float | None = 1.0):
    """FDA sine-series derivative (§2.1–2.2): ŝ_n'(u) = (4ω/π)·Σ_{i=0}^{n} cos((2i+1)·ω·u) (n + 1 terms),
    set to 0 where |u| > clip (BiBench; ``clip=None`` keeps the plain series)."""

    def g(u):
        total = torch.zeros_like(u)
        for i in range(n + 1):
            total = total + torch.cos((2 * i + 1) * omega * u)
        out = (4.0 * omega / math.pi) * total
        if clip is not None:
            out = torch.where(u.abs() > clip, torch.zeros_like(out), out)
        return out

    return g


def _clip_grad(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() <= 1.0).to(u.dtype)


def _per_channel(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


class _LazyShapes:
    """Mixin for per-channel parameters / buffers of quantizers made by name (``table[name]()``), whose
    sizes are only known at the first forward. They are registered empty (numel 0); ``_materialize``
    fills them in place (``.data``), so an optimizer built before the first forward keeps owning the same
    Parameter objects (their optimizer state is created at the first step, after the first forward);
    ``load_state_dict`` sizes them from the checkpoint first."""

    _lazy_names: tuple[str, ...] = ()

    def _materialize(self, name: str, value: torch.Tensor) -> None:
        cur = getattr(self, name)
        with torch.no_grad():
            cur.data = value.detach().to(device=cur.device, dtype=cur.dtype).clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in self._lazy_names:
            key = prefix + name
            cur = getattr(self, name)
            if key in state_dict and cur.numel() == 0 and state_dict[key].numel() > 0:
                cur.data = torch.empty(state_dict[key].shape, dtype=cur.dtype, device=cur.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _TKSchedule:
    """(t, k) held as plain floats (not saved, as in the references), advanced by ``on_epoch``."""

    def _init_schedule(self, schedule):
        self.schedule = schedule
        self.t, self.k = schedule.initial

    def on_epoch(self, epoch: int, epochs: int) -> None:
        self.t, self.k = self.schedule(epoch, epochs)


def _unit_deploy(channels: int) -> ActivationDeploy:
    return ActivationDeploy(torch.zeros(channels), torch.ones(channels), torch.zeros(channels))


# ---------------------------------------------------------------------------------------------- activations


class ApproxSign(ActivationQuantizer):
    """``approx_sign`` (Bi-Real, §5.1): s = +1 if x ≥ 0 else −1; backward through the piecewise
    polynomial F(x) = −1, 2x + x², 2x − x², 1, i.e. ∂s/∂x = max(0, 2 − 2|x|). Deploy: (0, 1, 0)."""

    name = "approx_sign"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = _threshold_sign(x)
        return _binary(x, approx_sign_grad, value)

    def deploy(self, channels: int) -> ActivationDeploy:
        return _unit_deploy(channels)


class EDESign(_TKSchedule, ActivationQuantizer):
    """``ede`` (IR-Net, §3.2): s = +1 if x ≥ 0 else −1; backward k·t·(1 − tanh²(t·x)) with the
    log-linear t schedule (``EDESchedule``: Tmin 0.1, Tmax 10; t = 0.1, k = 10 before the first epoch).
    Deploy: (0, 1, 0)."""

    name = "ede"

    def __init__(self, schedule: EDESchedule | None = None):
        super().__init__()
        self._init_schedule(schedule or EDESchedule())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = _threshold_sign(x)
        return _binary(x, ede_grad(self.t, self.k), value)

    def deploy(self, channels: int) -> ActivationDeploy:
        return _unit_deploy(channels)


class RSign(_LazyShapes, ActivationQuantizer):
    """``rsign`` (ReActNet, §4.1): s = sign(x + b_c) with a learnable per-channel ``bias`` b (shape
    (1, C, 1, 1), init 0; sized at the first forward unless ``channels`` is given); backward ApproxSign at
    u = x + b (∂s/∂x = ∂s/∂b = max(0, 2 − 2|x + b|)). Deploy: threshold −b (x + b ≥ 0 ⇔ x ≥ −b, exact
    in floating point too), p = 1, q = 0."""

    name = "rsign"
    _lazy_names = ("bias",)

    def __init__(self, channels: int | None = None):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1) if channels else torch.zeros(0))

    def _ensure(self, channels: int) -> None:
        if self.bias.numel() == 0:
            self._materialize("bias", torch.zeros(1, channels, 1, 1))
        elif self.bias.numel() != channels:
            raise ValueError(f"rsign has {self.bias.numel()} channels, input has {channels}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._ensure(x.shape[1])
        b = self.bias.reshape(-1)
        value = _threshold_sign(x, -b)
        if _use_plain_forward():
            return value
        return _binary(x + _view(b, x), approx_sign_grad, value)

    def deploy(self, channels: int) -> ActivationDeploy:
        self._ensure(channels)
        return ActivationDeploy(-self.bias.detach().reshape(-1).clone(), torch.ones(channels), torch.zeros(channels))


class _AdaBinActivationFn(torch.autograd.Function):
    """AdaBin's activation in one autograd node (training speed): out = α·(s + β) with s = sign(u),
    u = (x − β)/α, decided as in the deploy form (s' = +1 ⇔ x ≥ threshold, flipped for α < 0), and the
    gradients of §1.2 with the ApproxSign derivative F'(u).

    Written for speed on CPU (issue #7), with no boolean tensors (``torch.where`` and bool → float casts
    are several times slower than float arithmetic there): s' = sign(sign(x − threshold) + ½)
    (``_sign_at_least_zero_``). The parameter gradients are sums split so that only ∂out/∂x = g·F'(u)
    is a new full-size tensor:
    Σ g·(s + β − u·F') = Σ g·s + β·Σ g − Σ (g·F')·u and Σ g·(α − F') = α·Σ g − Σ g·F'."""

    @staticmethod
    def forward(ctx, x, alpha, beta, threshold):
        s = _sign_at_least_zero_(torch.sub(x, threshold))  # +1 ⇔ x ≥ threshold
        if alpha < 0:
            s.neg_()
        ctx.save_for_backward(x, s, alpha, beta)
        return torch.add(s, beta).mul_(alpha)

    @staticmethod
    def backward(ctx, grad):
        x, s, alpha, beta = ctx.saved_tensors
        need_x, need_alpha, need_beta = ctx.needs_input_grad[:3]
        u = torch.sub(x, beta).div_(alpha)
        fp = u.abs().mul_(-2.0).add_(2.0).clamp_min_(0.0)  # approx_sign_grad(u), in place
        gx = fp.mul_(grad)
        grad_alpha = grad_beta = None
        if need_alpha or need_beta:
            gsum = grad.sum()
            gxsum = gx.sum()
            if need_alpha:
                grad_alpha = (torch.dot(grad.reshape(-1), s.reshape(-1)) + beta * gsum
                              - torch.dot(gx.reshape(-1), u.reshape(-1))).reshape(alpha.shape)
            if need_beta:
                grad_beta = (alpha * gsum - gxsum).reshape(beta.shape)
        return gx if need_x else None, grad_alpha, grad_beta, None


class AdaBinActivation(ActivationQuantizer):
    """``adabin`` (AdaBin, §1.2), the OFFICIAL output form:

        u = (x − β)/α,  s = sign(u) (+1 ⇔ u ≥ 0),  out = α·(s + β)   (binary set {α(β − 1), α(β + 1)})

    with learnable scalars ``alpha_a`` (init 1) and ``beta_a`` (init 0), names as in the reference
    checkpoints. Backward: ApproxSign at u, so ∂out/∂x = F'(u), ∂out/∂α = s + β − u·F'(u),
    ∂out/∂β = α − F'(u).

    Deploy (threshold, p, q) = (β, α, α·β) for α > 0. For α < 0, s = +1 ⇔ x ≤ β, so the mapping is
    expressed with the flipped sign s' = +1 ⇔ x > β, i.e. threshold nextafter(β, +∞), p = −α, q = α·β
    (exact in floating point). For α = 0 the output is 0: p = q = 0. In eval / export the quantizer
    computes p·SignBinarize(x, threshold) + q, equal to the training value α·(s + β) up to float rounding.
    """

    name = "adabin"

    def __init__(self, alpha: float = 1.0, beta: float = 0.0):
        super().__init__()
        self.alpha_a = nn.Parameter(torch.tensor(float(alpha)))
        self.beta_a = nn.Parameter(torch.tensor(float(beta)))

    def _mapping(self):
        a, b = self.alpha_a.detach(), self.beta_a.detach()
        threshold = torch.where(a < 0, torch.nextafter(b, torch.full_like(b, math.inf)), b)
        return threshold, a.abs(), a * b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold, p, q = self._mapping()
        if _use_plain_forward():
            return p * _threshold_sign(x, threshold) + q  # s' = +1 ⇔ x ≥ threshold
        return _AdaBinActivationFn.apply(x, self.alpha_a, self.beta_a, threshold)

    def deploy(self, channels: int) -> ActivationDeploy:
        threshold, p, q = self._mapping()
        return ActivationDeploy(threshold.expand(channels).clone(), p.expand(channels).clone(),
                                q.expand(channels).clone())


class _NoiseAdaptation(_LazyShapes, nn.Module):
    """FDA noise adaptation module (§2.1–2.2): ê(t) = ReLU(t·W1ᵀ)·W2ᵀ + a·sin(t) over the last axis of t
    (d features, hidden d // k, at least 1), no biases; W1, W2 zero-mean (nn.Linear's default uniform)
    init, sized at the first call."""

    _lazy_names = ("w1", "w2")

    def __init__(self, k: int = 64, a: float = 0.1):
        super().__init__()
        self.k, self.a = k, a
        self.w1 = nn.Parameter(torch.zeros(0))
        self.w2 = nn.Parameter(torch.zeros(0))

    def _ensure(self, d: int) -> None:
        if self.w1.numel() == 0:
            h = max(d // self.k, 1)
            self._materialize("w1", torch.empty(h, d).uniform_(-1.0 / math.sqrt(d), 1.0 / math.sqrt(d)))
            self._materialize("w2", torch.empty(d, h).uniform_(-1.0 / math.sqrt(h), 1.0 / math.sqrt(h)))
        elif self.w1.shape[1] != d:
            raise ValueError(f"noise adaptation module has d = {self.w1.shape[1]}, input has {d}")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        self._ensure(t.shape[-1])
        return torch.relu(t @ self.w1.t()) @ self.w2.t() + self.a * torch.sin(t)


def _fda_binary(u: torch.Tensor, noise: _NoiseAdaptation, n: int, alpha: float, omega: float, clip: float | None,
                channels_last: bool) -> torch.Tensor:
    """sign(u) forward; backward ŝ_n'(u)·1_{|u|≤clip} + α·∂ê/∂u, with ê applied to the rows of u: over axis 1
    at each position (``channels_last``: activations) or over each output channel's flattened weights."""
    s = _binary(u, fda_grad(n, omega, clip))
    if alpha != 0.0 and not _use_plain_forward():
        if channels_last:
            e = noise(u.movedim(1, -1))
            e = e - e.detach()
            e = e.movedim(-1, 1)
        else:
            e = noise(_per_channel(u))
            e = (e - e.detach()).reshape(u.shape)
        s = s + alpha * e  # exactly 0 in the forward, α·ê in the backward
    return s


class FDASign(ActivationQuantizer):
    """``fda`` (FDA-BNN, §2): forward s = sign(x) (+1 ⇔ x ≥ 0); backward through the truncated sine
    series ŝ_n'(x) = (4ω/π)·Σ_{i=0}^{n} cos((2i+1)ωx) (0 for |x| > 1, BiBench; ω = 0.1) plus
    α·∂ê/∂x of the noise adaptation module ê applied over channels at each position (d = C, k = 64).
    Schedule (``FDASchedule``): n = 9 + ⌊9e/E⌋, α = 0.05·(1 + cos(π(e+1)/E)) → 0 (n = 9, α = 0.1 before
    the first epoch). The noise path enters the backward only (forward exactly ±1, as in the paper), so the
    module vanishes at inference. Deploy: (0, 1, 0)."""

    name = "fda"

    def __init__(self, schedule: FDASchedule | None = None, omega: float = 0.1, clip: float | None = 1.0,
                 noise_k: int = 64, noise_a: float = 0.1):
        super().__init__()
        self.schedule = schedule or FDASchedule()
        self.n, self.alpha = self.schedule.initial
        self.omega, self.clip = omega, clip
        self.noise = _NoiseAdaptation(noise_k, noise_a)

    def on_epoch(self, epoch: int, epochs: int) -> None:
        self.n, self.alpha = self.schedule(epoch, epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_plain_forward():
            return _threshold_sign(x)
        return _fda_binary(x, self.noise, self.n, self.alpha, self.omega, self.clip, channels_last=True)

    def deploy(self, channels: int) -> ActivationDeploy:
        return _unit_deploy(channels)


class RBNNActivation(_TKSchedule, ActivationQuantizer):
    """``rbnn`` (RBNN, §6.1): Ã = (x − mean_b x)/std_b(x − mean) over (C, H, W) of each sample b
    (unbiased std), s = sign(Ã); backward max(0, √2·t' − t'²·|Ã|) with t' = max(t, 1), k = 1
    (``RBNNSchedule``), chained through the standardisation.

    The value is decided as s = +1 ⇔ x − mean_b x ≥ 0 (the std > 0 only rescales; ``center_per_sample``:
    mean in float64, so a value equal to its sample mean is a tie, +1, on every runtime; a constant sample
    gives +1 where the reference's 0/0 gives NaN). Deploy: (0, 1, 0) with ``center=True``; the export form is
    x − ReduceMean(x) → SignBinarize(T = 0) (docs/ops.md)."""

    name = "rbnn"

    def __init__(self, schedule: RBNNSchedule | None = None):
        super().__init__()
        self._init_schedule(schedule or RBNNSchedule())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = _threshold_sign(center_per_sample(x.detach() if not _use_plain_forward() else x))
        if _use_plain_forward():
            return value
        dims = tuple(range(1, x.dim()))
        c = x - x.mean(dims, keepdim=True)
        a2 = c / c.std(dims, keepdim=True)
        return _binary(a2, rbnn_grad(max(self.t, 1.0), 1.0), value)

    def deploy(self, channels: int) -> ActivationDeploy:
        return ActivationDeploy(torch.zeros(channels), torch.ones(channels), torch.zeros(channels), center=True)


class BiMLPActivation(ActivationQuantizer):
    """``bimlp`` (BiMLP release, §7.1, DoReFa with nbit 1): a = rint(clip(x, −1, 1)) ∈ {−1, 0, +1}
    (round half to even: |x| ≤ 0.5 → 0), backward the gradient of clip (1 for |x| ≤ 1). TERNARY, as in
    the released MindSpore code (an upstream oddity).

    Deploy: two terms, a = ½·s₁ + ½·s₂ with s₁ = +1 ⇔ x ≥ nextafter(½, +∞) (i.e. x > ½) and s₂ = +1 ⇔
    x ≥ −½: x > ½ → +1, −½ ≤ x ≤ ½ → 0, x < −½ → −1, exactly rint's ties (rint(±½) = 0). A binary layer
    exports it as two binary convs sharing the weights, added, then scaled by ½ (docs/ops.md)."""

    name = "bimlp"

    #: s₁'s threshold: the smallest float32 above ½ (s₁ = +1 ⇔ x > ½)
    UPPER = float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.clamp(-1.0, 1.0)
        value = torch.round(c.detach())
        if _use_plain_forward():
            return value
        return ste(value, c)

    def deploy(self, channels: int) -> ActivationDeploy:
        t = torch.tensor([[self.UPPER], [-0.5]]).expand(2, channels)
        return ActivationDeploy(t.clone(), torch.full((2, channels), 0.5), torch.zeros(2, channels))


# -------------------------------------------------------------------------------------------------- weights


class EDEWeight(_TKSchedule, WeightQuantizer):
    """``ede``: s = sign(w) with the EDE backward k·t·(1 − tanh²(t·w)) (§3.2), no scale."""

    name = "ede"

    def __init__(self, schedule: EDESchedule | None = None):
        super().__init__()
        self._init_schedule(schedule or EDESchedule())

    def forward(self, w: torch.Tensor):
        return _binary(w, ede_grad(self.t, self.k)), None, None


class LibraPBWeight(_TKSchedule, WeightQuantizer):
    """``libra_pb`` (IR-Net, §3.1): per output channel Ŵ = (W − mean)/std(W − mean) (unbiased std, not
    detached), s = sign(Ŵ) with the EDE backward at Ŵ, r = 2^round(log2 mean|Ŵ|) (detached power of two,
    computed as the reference does: round(ln m / ln 2)), t = 0."""

    name = "libra_pb"

    def __init__(self, schedule: EDESchedule | None = None):
        super().__init__()
        self._init_schedule(schedule or EDESchedule())

    def forward(self, w: torch.Tensor):
        flat = _per_channel(w)
        c = flat - flat.mean(1, keepdim=True)
        wh = c / c.std(1, keepdim=True)
        m = wh.detach().abs().mean(1)
        r = torch.pow(torch.full_like(m, 2.0), torch.round(torch.log(m) / math.log(2)))
        return _binary(wh, ede_grad(self.t, self.k)).reshape(w.shape), r, None


_sign_at_least_zero_ = ops.sign_at_least_zero_  # one definition, with the ops (bnnc/ops/export.py)


def _adabin_equalize(flat: torch.Tensor):
    """AdaBin's equalization of [O, n] weights: (s = sign(Ŵ), α, β, Ŵ), α and β shaped [O, 1]."""
    beta = flat.mean(1, keepdim=True)
    c = flat - beta
    alpha = torch.sqrt((c ** 2).sum(1, keepdim=True) / flat.shape[1])
    wh = c / alpha
    return _sign_at_least_zero_(wh.clone()), alpha, beta, wh


class _AdaBinWeightFn(torch.autograd.Function):
    """AdaBin's weight equalization in one autograd node (training speed; a few dozen small autograd ops
    otherwise, which cost as much as a 64-channel conv on CPU). Backward, closed form with n = row length,
    h = ∂L/∂s·EDE'(Ŵ) and ∂α/∂W = Ŵ/n, ∂β/∂W = 1/n:

        ∂L/∂W = (h − mean(h) − Ŵ·mean(h·Ŵ))/α + ∂L/∂α·Ŵ/n + ∂L/∂β/n   (per row)."""

    @staticmethod
    def forward(ctx, flat, t, k):
        s, alpha, beta, wh = _adabin_equalize(flat)
        ctx.save_for_backward(wh, alpha)
        ctx.tk = (t, k)
        return s, alpha, beta

    @staticmethod
    def backward(ctx, g_s, g_alpha, g_beta):
        wh, alpha = ctx.saved_tensors
        t, k = ctx.tk
        n = wh.shape[1]
        h = g_s * ede_grad(t, k)(wh)
        dw = (h - h.mean(1, keepdim=True) - wh * (h * wh).mean(1, keepdim=True)) / alpha
        return dw + (g_alpha * wh + g_beta) / n, None, None


class AdaBinWeight(_TKSchedule, WeightQuantizer):
    """``adabin`` (AdaBin, §1.1): per output channel β = mean(W_o), α = population std (ddof 0),
    Ŵ = (W − β)/α, s = sign(Ŵ) with the EDE backward at Ŵ; r = α, t = β (W_b = α·s + β), neither
    detached. Schedule ``EDESchedule(1e-3, 10)`` (EC ``--progressive``; t = 0.1, k = 10 before the first
    epoch). Note: n is Cin/groups·kh·kw here; the reference divides by in_channels·kh·kw, which differs
    for grouped convs."""

    name = "adabin"

    def __init__(self, schedule: EDESchedule | None = None):
        super().__init__()
        self._init_schedule(schedule or EDESchedule(1e-3, 10.0))

    def forward(self, w: torch.Tensor):
        flat = _per_channel(w)
        if _use_plain_forward():
            s, alpha, beta, _ = _adabin_equalize(flat)
        else:
            s, alpha, beta = _AdaBinWeightFn.apply(flat, self.t, self.k)
        return s.reshape(w.shape), alpha.reshape(-1), beta.reshape(-1)


class MagnitudeAwareWeight(WeightQuantizer):
    """``magnitude_aware`` (Bi-Real §5.2 / ReActNet ``HardBinaryConv`` §4.1): W_b = mean_o|W|·sign(W), scale
    detached, clipped STE. Since the layer multiplies the ±1 conv by r, ∂L/∂W = ∂L/∂W_b·mean_o|W|·1_{|W|≤1}:
    the paper's magnitude-aware gradient."""

    name = "magnitude_aware"

    def forward(self, w: torch.Tensor):
        r = _per_channel(w).detach().abs().mean(1)
        return ste(ops.weight_sign(w), w.clamp(-1.0, 1.0)), r, None


class FDAWeight(WeightQuantizer):
    """``fda`` (FDA-BNN, §2): s = sign(W), backward ŝ_n'(W)·1_{|W|≤1} + α·∂ê/∂W with the weight noise
    module over each output channel's flattened weights (d = Cin·kh·kw, k = 64), schedule as ``FDASign``.
    Scale r (detached): ``scale="layer"`` mean|W| over the whole tensor (DoReFa, the MindSpore release,
    default), ``"channel"`` per output channel (BiBench), ``None`` no scale."""

    name = "fda"

    def __init__(self, schedule: FDASchedule | None = None, omega: float = 0.1, clip: float | None = 1.0,
                 scale: str | None = "layer", noise_k: int = 64, noise_a: float = 0.1):
        super().__init__()
        if scale not in ("layer", "channel", None):
            raise ValueError(f"scale must be 'layer', 'channel' or None, got {scale!r}")
        self.schedule = schedule or FDASchedule()
        self.n, self.alpha = self.schedule.initial
        self.omega, self.clip, self.scale = omega, clip, scale
        self.noise = _NoiseAdaptation(noise_k, noise_a)

    def on_epoch(self, epoch: int, epochs: int) -> None:
        self.n, self.alpha = self.schedule(epoch, epochs)

    def forward(self, w: torch.Tensor):
        s = _fda_binary(w, self.noise, self.n, self.alpha, self.omega, self.clip, channels_last=False)
        o = w.shape[0]
        if self.scale == "layer":
            r = w.detach().abs().mean().expand(o)
        elif self.scale == "channel":
            r = _per_channel(w).detach().abs().mean(1)
        else:
            r = None
        return s, r, None


def rbnn_ab(n: int) -> tuple[int, int]:
    """RBNN ``get_ab``: a = the largest divisor of n with a ≤ √n, b = n / a."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal n×n matrix (QR of a Gaussian with the sign fix; as scipy's ortho_group)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class RBNNWeight(_LazyShapes, _TKSchedule, WeightQuantizer):
    """``rbnn`` (RBNN, §6.1–6.2). Per layer, N = Cin·kh·kw = a·b (``rbnn_ab``):

        W̃ = (W − mean_o)/std_o (unbiased),  X_o = W̃_o as a×b,  W_rot = R1ᵀ X R2,
        w3 = W̃ + |sin θ_o|·(stop_grad(W_rot) − W̃),  s = sign(w3),  r = alpha_o, t = 0.

    Backward k·max(0, √2·t − t²|w3|) (``RBNNSchedule``). Buffers ``R1`` (a×a), ``R2`` (b×b) random
    orthogonal at init, parameters ``alpha`` (O,1,1) init mean_o|W| and ``rotate`` θ (O,1,1,1) init π/2
    (reference names and shapes), all sized at the first forward. The rotations are not trained by SGD:
    ``on_epoch(e, E)`` arms an update (when e % rotation_update == 0) that runs during the first training
    forward of the epoch (3 alternating rounds, ``update_rotation``)."""

    name = "rbnn"
    _lazy_names = ("R1", "R2", "alpha", "rotate")

    def __init__(self, schedule: RBNNSchedule | None = None, rotation_update: int = 1):
        super().__init__()
        self._init_schedule(schedule or RBNNSchedule())
        self.rotation_update = rotation_update
        self.register_buffer("R1", torch.zeros(0))
        self.register_buffer("R2", torch.zeros(0))
        self.alpha = nn.Parameter(torch.zeros(0))
        self.rotate = nn.Parameter(torch.zeros(0))
        self.update_pending = False

    def on_epoch(self, epoch: int, epochs: int) -> None:
        super().on_epoch(epoch, epochs)
        self.update_pending = epoch % self.rotation_update == 0

    def _ensure(self, w: torch.Tensor) -> None:
        o, n = w.shape[0], w[0].numel()
        a, b = rbnn_ab(n)
        if self.R1.numel() == 0:
            self._materialize("R1", _random_orthogonal(a))
        if self.R2.numel() == 0:
            self._materialize("R2", _random_orthogonal(b))
        if self.alpha.numel() == 0:
            self._materialize("alpha", _per_channel(w).detach().abs().mean(1).reshape(o, 1, 1))
        if self.rotate.numel() == 0:
            self._materialize("rotate", torch.full((o, 1, 1, 1), math.pi / 2))
        if self.R1.shape != (a, a) or self.R2.shape != (b, b) or self.alpha.numel() != o:
            raise ValueError(f"rbnn state (R1 {tuple(self.R1.shape)}, R2 {tuple(self.R2.shape)}, alpha "
                             f"{self.alpha.numel()}) does not fit a weight of shape {tuple(w.shape)}")

    def standardized(self, w: torch.Tensor) -> torch.Tensor:
        """W̃ as [O, a, b]."""
        flat = _per_channel(w)
        c = flat - flat.mean(1, keepdim=True)
        return (c / c.std(1, keepdim=True)).reshape(w.shape[0], self.R1.shape[0], self.R2.shape[0])

    @torch.no_grad()
    def update_rotation(self, x: torch.Tensor, rounds: int = 3) -> None:
        """Alternating updates on X [O, a, b] (detached): B = sign(R1ᵀ X R2);
        R1 ← V1·U1ᵀ with U1 S1 V1ᵀ = SVD(Σ_o B_o R2ᵀ X_oᵀ);
        R2 ← U2·V2ᵀ with U2 S2 V2ᵀ = SVD(Σ_o X_oᵀ R1 B_o)   (R1 already updated; 3 rounds, as RB)."""
        x = x.detach()
        r1, r2 = self.R1.clone(), self.R2.clone()
        for _ in range(rounds):
            b = torch.sign(r1.t() @ x @ r2)
            u1, _, v1h = torch.linalg.svd((b @ r2.t() @ x.transpose(1, 2)).sum(0))
            r1 = v1h.t() @ u1.t()
            u2, _, v2h = torch.linalg.svd((x.transpose(1, 2) @ r1 @ b).sum(0))
            r2 = u2 @ v2h
        self.R1.copy_(r1)
        self.R2.copy_(r2)

    def forward(self, w: torch.Tensor):
        self._ensure(w)
        o = w.shape[0]
        x = self.standardized(w)
        if (self.update_pending and self.training and torch.is_grad_enabled()
                and not torch.compiler.is_exporting()):
            self.update_rotation(x)
            self.update_pending = False
        with torch.no_grad():
            w_rot = self.R1.t() @ x.detach() @ self.R2
        w3 = x + torch.sin(self.rotate).abs().reshape(o, 1, 1) * (w_rot - x)
        s = _binary(w3, rbnn_grad(self.t, self.k)).reshape(w.shape)
        return s, self.alpha.reshape(o), None


class BiMLPWeight(WeightQuantizer):
    """``bimlp`` (BiMLP ``XnorM``, §7.1): W_b = sign(W)·mean(|W|, axis 1 (input channels)), identity STE
    for the whole op (∂L/∂W = ∂L/∂W_b; the scale is detached). The scale is per (o, kh, kw); the (s, r, t)
    interface has one r per output channel, so only kh = kw = 1 kernels are accepted (for BiMLP's
    depthwise 1×7 / 7×1 convs XnorM gives W_b = W: keep those real-valued)."""

    name = "bimlp"

    def forward(self, w: torch.Tensor):
        if w[0, 0].numel() != 1:
            raise ValueError("bimlp weights need 1×1 kernels (XnorM scales per (out-channel, kh, kw))")
        o = w.shape[0]
        r = w.detach().abs().mean(1).reshape(o)
        rv = r.reshape((o,) + (1,) * (w.dim() - 1))
        identity = torch.where(rv > 0, w / torch.where(rv > 0, rv, torch.ones_like(rv)), w)
        return ste(ops.weight_sign(w), identity), r, None


ACTIVATION_QUANTIZERS: dict[str, type] = {
    "sign": SignSTE,
    "approx_sign": ApproxSign,
    "ede": EDESign,
    "rsign": RSign,
    "adabin": AdaBinActivation,
    "fda": FDASign,
    "rbnn": RBNNActivation,
    "bimlp": BiMLPActivation,
}
WEIGHT_QUANTIZERS: dict[str, type] = {
    "sign": SignWeight,
    "xnor": XnorWeight,
    "ede": EDEWeight,
    "libra_pb": LibraPBWeight,
    "adabin": AdaBinWeight,
    "magnitude_aware": MagnitudeAwareWeight,
    "fda": FDAWeight,
    "rbnn": RBNNWeight,
    "bimlp": BiMLPWeight,
}


def _resolve(spec, table, kind):
    if spec is None or isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        try:
            return table[spec]()
        except KeyError:
            raise ValueError(f"unknown {kind} quantizer {spec!r}; known: {sorted(table)}") from None
    raise TypeError(f"{kind} quantizer must be a name, a module or None, got {type(spec).__name__}")


def get_activation_quantizer(spec):
    return _resolve(spec, ACTIVATION_QUANTIZERS, "input")


def get_weight_quantizer(spec):
    q = _resolve(spec, WEIGHT_QUANTIZERS, "weight")
    if q is None:
        raise ValueError("a binary layer needs a weight quantizer")
    return q
