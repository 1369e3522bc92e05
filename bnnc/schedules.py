"""Per-epoch schedules of the quantizers' surrogate gradients (``../shared/spec/methods.md``).

Each schedule is a small, stateless object: ``schedule(epoch, epochs)`` returns the values a quantizer
uses during epoch ``epoch`` ∈ [0, epochs). Quantizers call it from ``on_epoch``; before the first call
they use the schedule's ``initial`` values (the reference codes' constructor defaults).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["LogTKSchedule", "EDESchedule", "RBNNSchedule", "FDASchedule", "log_up"]


def log_up(tmin: float, tmax: float, epoch: int, epochs: int) -> float:
    """t(e) = 10^( log10 Tmin + (log10 Tmax − log10 Tmin)·e/E ) (IR-Net/AdaBin ``Log_UP``, RBNN ``cpt_tk``).

    t(0) = Tmin; the last epoch E−1 gives Tmin·(Tmax/Tmin)^((E−1)/E) (Tmax itself is never reached)."""
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    lo, hi = math.log10(tmin), math.log10(tmax)
    return 10.0 ** (lo + (hi - lo) * epoch / epochs)


@dataclass(frozen=True)
class LogTKSchedule:
    """t grows log-linearly from Tmin to (almost) Tmax; k = max(1/t, 1).

    Returns ``(t, k)``. ``initial`` = (0.1, 10.0): the values the reference layers hold before the first
    update (methods.md §1.1, §3.2)."""

    tmin: float = 0.1
    tmax: float = 10.0

    initial = (0.1, 10.0)

    def __call__(self, epoch: int, epochs: int) -> tuple[float, float]:
        t = log_up(self.tmin, self.tmax, epoch, epochs)
        return t, max(1.0 / t, 1.0)


@dataclass(frozen=True)
class EDESchedule(LogTKSchedule):
    """IR-Net Error Decay Estimator schedule (methods.md §3.2): Tmin = 0.1, Tmax = 10 (paper, LU).
    IR-Net's CIFAR ResNet-20 1w1a trainer and AdaBin (§1.1) use Tmin = 1e−3: ``EDESchedule(1e-3, 10)``."""


@dataclass(frozen=True)
class RBNNSchedule(LogTKSchedule):
    """RBNN training-aware approximation schedule (methods.md §6.1 ``cpt_tk``): Tmin = 1e−2, Tmax = 10."""

    tmin: float = 1e-2
    tmax: float = 10.0


@dataclass(frozen=True)
class FDASchedule:
    """FDA-BNN schedule (methods.md §2.2, BiBench ``model_params_update``): returns ``(n, alpha)``,
    n = n0 + floor(n0·e/E) (9 → 17 for E ≥ 9 epochs; the paper's "to 2·n0 = 18" is the limit, never
    reached by this formula), alpha = 0.05·(1 + cos(π(e+1)/E)) (≈ 0.1 → exactly 0 at the last epoch).
    ``initial`` = (9, 0.1), the reference buffers' values before the first update."""

    n0: int = 9
    alpha0: float = 0.05

    @property
    def initial(self) -> tuple[int, float]:
        return self.n0, 2.0 * self.alpha0

    def __call__(self, epoch: int, epochs: int) -> tuple[int, float]:
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        n = self.n0 + (self.n0 * epoch) // epochs
        alpha = self.alpha0 * (1.0 + math.cos(math.pi * (epoch + 1) / epochs))
        if epoch + 1 == epochs:
            alpha = 0.0  # cos(π) = −1 exactly; keep the module off at the end whatever the rounding
        return n, alpha
