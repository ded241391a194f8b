"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (DP-SGD, DP-FedAvg).

The ledger also records Laplace releases (federated analytics), composed with the rest.

Thin, validated wrappers over Google's ``dp_accounting``: epsilon for a number of steps with the
RDP or PLD accountant, noise calibration for a target epsilon, and a serializable ledger of what
a run actually spent. Neighbouring datasets differ by adding or removing one record (or one node
for user-level DP), which is what Poisson sampling at rate ``sample_rate`` is analysed under.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import dp_accounting
from dp_accounting import pld, rdp

from shoal.errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "PLD_DISCRETIZATION",
    "Accountant",
    "LedgerEntry",
    "PrivacyLedger",
    "calibrate",
    "dp_sgd_event",
    "epsilon",
    "skellam_event",
    "skellam_noise_multiplier",
]

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
# The noise a ledger entry adds: Gaussian (noise_multiplier = std / L2 sensitivity) or Laplace
# (noise_multiplier = scale / L1 sensitivity, i.e. 1/epsilon of one pure-DP release) or
# Skellam on an integer-valued query (noise_multiplier = std / L2 sensitivity; see
# skellam_event).
Mechanism = Literal["gaussian", "laplace", "skellam"]
MECHANISMS: tuple[str, ...] = ("gaussian", "laplace", "skellam")

# Width of the privacy-loss grid for PLD. None (the default) chooses it per query, relative
# to the answer: see _pld_epsilon. A fixed width is a valid upper bound too (the accountant
# rounds pessimistically) but a fixed 1e-3 overstated epsilon up to 2x for small epsilons
# after many steps, and a fixed 1e-4 takes minutes where epsilon is in the thousands.
PLD_DISCRETIZATION: float | None = None

# Calibration gives up outside these noise multipliers: above, the target is unreachable for the
# accountant; below, it is so loose that calibrating is pointless (and PLD grids explode).
_MAX_NOISE_MULTIPLIER = 1e6
_MIN_NOISE_MULTIPLIER = 1e-2
# Below this the accountants' numerics (RDP's largest order, PLD's grid) dominate the answer.
_MIN_TARGET_EPSILON = 1e-2
# Aim a little inside the required 1% so float noise in the accountant cannot push us out.
_CALIBRATION_RTOL = 0.005


# ---------------------------------------------------------------------------------------------
# validation


def _check_accountant(accountant: str) -> Accountant:
    if accountant == "rdp":
        return "rdp"
    if accountant == "pld":
        return "pld"
    raise ConfigError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    except OverflowError:  # an int past float's range
        raise ConfigError(f"{name} must be a finite number, got an integer that large") from None
    if math.isnan(v):
        raise ConfigError(f"{name} must be a number, got NaN")
    return v


def _check_sample_rate(sample_rate: object) -> float:
    q = _number("sample_rate", sample_rate)
    if not 0.0 < q <= 1.0:
        raise ConfigError(
            f"sample_rate must be in (0, 1], got {sample_rate!r}; it is the expected batch size "
            f"divided by the dataset size (or nodes per round divided by the population)"
        )
    return q


def _check_noise_multiplier(noise_multiplier: object) -> float:
    z = _number("noise_multiplier", noise_multiplier)
    if not (z >= 0.0 and math.isfinite(z)):
        raise ConfigError(
            f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
    if z > MAX_NOISE_MULTIPLIER:
        # the accountants square it: 1e308 overflowed inside dp_accounting with a traceback
        raise ConfigError(
            f"noise_multiplier must be at most {MAX_NOISE_MULTIPLIER:g}, got {noise_multiplier!r}"
        )
    return z


MAX_NOISE_MULTIPLIER = 1e6  # far past any useful noise; keeps sigma**2 and its logs finite


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, float)):
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    return int(steps)


def _check_delta(delta: object) -> float:
    d = _number("delta", delta)
    if not 0.0 < d < 1.0:
        raise ConfigError(
            f"delta must be in (0, 1), got {delta!r}; use one well below 1/dataset size, e.g. 1e-5"
        )
    return d


def _check_epsilon(epsilon: object) -> float:
    e = _number("epsilon", epsilon)
    if not (e > 0.0 and math.isfinite(e)):
        raise ConfigError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    return e


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp_accounting logs a warning for every RDP order it drops at large sample rates; the
    # result is still a valid bound, so the noise would only alarm CLI users.
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


# ---------------------------------------------------------------------------------------------
# events and epsilon


def _check_mechanism(mechanism: object, sample_rate: float) -> Mechanism:
    if mechanism == "gaussian":
        return "gaussian"
    if mechanism == "laplace":
        if sample_rate != 1.0:
            raise ConfigError("Laplace entries are accounted without sampling (sample_rate=1)")
        return "laplace"
    if mechanism == "skellam":
        if sample_rate != 1.0:
            raise ConfigError("Skellam entries are accounted without sampling (sample_rate=1)")
        return "skellam"
    raise ConfigError(f"mechanism must be 'gaussian', 'laplace' or 'skellam', got {mechanism!r}")


def skellam_event(noise_multiplier: float) -> dp_accounting.DpEvent:
    """One release of the symmetric Skellam mechanism on an integer-valued query: noise
    Poisson(mu) - Poisson(mu) per coordinate (variance 2 mu), ``noise_multiplier`` = its std
    over the query's L2 sensitivity D2.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning" (NeurIPS 2021, arXiv:2110.04995), Theorem 3.5: (alpha, eps(alpha))-RDP with
    eps(alpha) <= alpha D2^2 / (4 mu) + min(((2 alpha - 1) D2^2 + 6 D1) / (16 mu^2),
    3 D1 / (4 mu)). Taking the second branch of the min, and D1 <= D2^2 (every coordinate of
    an integer difference is 0 or at least 1 in size), with 2 mu = z^2 D2^2:
    eps(alpha) <= alpha / (2 z^2) + 3 / (2 z^2), i.e. (xi, rho)-zCDP with rho = 1/(2 z^2)
    (the Gaussian's) and xi = 3/(2 z^2), which dp_accounting's RDP accountant composes."""
    z = _check_noise_multiplier(noise_multiplier)
    return dp_accounting.ZCDpEvent(rho=1.0 / (2.0 * z * z), xi=3.0 / (2.0 * z * z))


def dp_sgd_event(
    *, sample_rate: float, noise_multiplier: float, steps: int, mechanism: Mechanism = "gaussian"
) -> dp_accounting.DpEvent:
    """The dp_accounting event for ``steps`` rounds of the Poisson-subsampled Gaussian mechanism
    (or, with ``mechanism="laplace"``, of the Laplace mechanism at scale/sensitivity z)."""
    q = _check_sample_rate(sample_rate)
    z = _check_noise_multiplier(noise_multiplier)
    t = _check_steps(steps)
    kind = _check_mechanism(mechanism, q)
    inner: dp_accounting.DpEvent
    if kind == "laplace":
        inner = dp_accounting.LaplaceDpEvent(z)
    elif kind == "skellam":
        inner = skellam_event(z)
    else:
        inner = dp_accounting.GaussianDpEvent(z)
    if q < 1.0:
        inner = dp_accounting.PoissonSampledDpEvent(q, inner)
    return dp_accounting.SelfComposedDpEvent(inner, t)


def _fresh_accountant(
    accountant: Accountant, pld_discretization: float | None
) -> dp_accounting.PrivacyAccountant:
    if accountant == "rdp":
        return rdp.RdpAccountant()
    return pld.PLDAccountant(value_discretization_interval=pld_discretization)


def _epsilon_of(
    entries: Iterable[tuple[float, float, int] | tuple[float, float, int, Mechanism]],
    delta: float,
    accountant: Accountant,
    pld_discretization: float | None,
) -> float:
    # Composition is commutative, so equal (q, z) pairs are merged: one self-composition of n
    # steps is far cheaper for PLD than n separate ones.
    merged: dict[tuple[float, float, Mechanism], int] = {}
    for entry in entries:
        q, z, t = entry[:3]
        mechanism: Mechanism = entry[3] if len(entry) > 3 else "gaussian"
        if z == 0.0:
            return math.inf
        merged[(q, z, mechanism)] = merged.get((q, z, mechanism), 0) + t
    if not merged:
        return 0.0
    events = [
        dp_sgd_event(sample_rate=q, noise_multiplier=z, steps=t, mechanism=m)
        for (q, z, m), t in merged.items()
    ]
    event = events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)
    if any(m == "skellam" for _, _, m in merged):
        accountant = "rdp"  # the Skellam bound is an RDP curve; PLD has no such event
    if accountant == "pld" and pld_discretization is None:
        return _pld_epsilon(event, sum(merged.values()), delta)
    return _compose(event, delta, accountant, pld_discretization)


def _compose(
    event: dp_accounting.DpEvent, delta: float, accountant: Accountant, width: float | None
) -> float:
    acc = _fresh_accountant(accountant, width)
    with _quiet_absl():
        acc.compose(event)
        eps = float(acc.get_epsilon(delta))
    return max(eps, 0.0)


# The adaptive PLD grid: its width is a fraction of epsilon itself, smaller the more steps are
# composed (each step's pessimistic rounding adds up). Measured against dp-accounting on a
# grid 10x finer over q in {0.001..0.5}, z in {0.5..5}, steps in {1, 100, 10^4}, delta in
# {1e-5, 1e-6}: within 0.8% everywhere (tests/privacy/test_pld_tightness.py,
# benchmarks/pld_accuracy.py).
_PLD_RELATIVE_WIDTH = 0.01
_PLD_MIN_WIDTH = 1e-8
_PLD_MAX_WIDTH = 0.1


def pld_relative_width(steps: int) -> float:
    """The adaptive grid's width as a fraction of epsilon, for ``steps`` composed steps."""
    return min(_PLD_RELATIVE_WIDTH, 0.1 * max(steps, 1) ** -0.75)


def _pld_epsilon(event: dp_accounting.DpEvent, steps: int, delta: float) -> float:
    """PLD epsilon on a grid whose width is ``pld_relative_width(steps)`` times epsilon.

    The RDP epsilon (cheap, and never below the PLD one) sizes the first grid; the answer
    then sizes the next, until the width stops shrinking by more than a third.
    """
    relative = pld_relative_width(steps)

    def width_for(eps: float) -> float:
        return min(max(eps * relative, _PLD_MIN_WIDTH), _PLD_MAX_WIDTH)

    width = width_for(_compose(event, delta, "rdp", None))
    eps = _compose(event, delta, "pld", width)
    for _ in range(4):
        finer = width_for(eps)
        if finer >= width / 1.5:
            break
        width = finer
        eps = _compose(event, delta, "pld", width)
    return eps


def epsilon(
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: Accountant = "rdp",
    pld_discretization: float | None = PLD_DISCRETIZATION,
) -> float:
    """Epsilon at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps.

    ``accountant="rdp"`` is fast and slightly loose; ``"pld"`` (privacy loss distributions) is
    tighter, typically 5-10% lower, and slower. ``noise_multiplier=0`` gives ``math.inf``.
    PLD's grid adapts to the answer unless ``pld_discretization`` fixes its width; either way
    the result is an upper bound, and the adaptive one is within 1% of a fine grid's.
    """
    q = _check_sample_rate(sample_rate)
    z = _check_noise_multiplier(noise_multiplier)
    t = _check_steps(steps)
    d = _check_delta(delta)
    acc = _check_accountant(accountant)
    return _epsilon_of([(q, z, t)], d, acc, _check_discretization(pld_discretization))


def _check_discretization(width: float | None) -> float | None:
    if width is None:
        return None  # adaptive
    w = _number("pld_discretization", width)
    if not 0.0 < w <= 0.1:
        raise ConfigError(f"pld_discretization must be in (0, 0.1], got {width!r}")
    return w


# ---------------------------------------------------------------------------------------------
# calibration


def calibrate(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    pld_discretization: float | None = PLD_DISCRETIZATION,
) -> float:
    """Smallest noise multiplier whose epsilon at ``delta`` is at most ``epsilon`` (within 1%).

    The result's epsilon (by the same accountant and ``pld_discretization``) lies in
    ``[0.99 * epsilon, epsilon]``. Found by bracketing and then regula falsi in log space; epsilon
    is decreasing in the noise multiplier. Targets below 0.01 are refused: there the
    accountants' numerical limits, not the mechanism, decide the answer.
    """
    target = _check_epsilon(epsilon)
    d = _check_delta(delta)
    q = _check_sample_rate(sample_rate)
    t = _check_steps(steps)
    acc = _check_accountant(accountant)
    width = _check_discretization(pld_discretization)
    if target < _MIN_TARGET_EPSILON:
        raise ConfigError(
            f"epsilon={target:g} is below {_MIN_TARGET_EPSILON:g}, which the accountants cannot "
            f"resolve reliably; ask for epsilon >= {_MIN_TARGET_EPSILON:g}"
        )
    if acc == "pld" and width is not None and width > target * 0.002:
        raise ConfigError(
            f"pld_discretization={width:g} is too coarse to calibrate epsilon={target:g} "
            f"within 1%; use at most {target * 0.002:g}"
        )

    def eps_at(z: float) -> float:
        return _epsilon_of([(q, z, t)], d, acc, width)

    if acc == "pld":
        # RDP is an upper bound on the PLD epsilon, so its answer is a valid upper bracket and
        # costs a few cheap RDP calls instead of several slow PLD ones.
        hi = calibrate(epsilon=target, delta=d, sample_rate=q, steps=t, accountant="rdp")
        shrink = 0.85
    else:
        hi, shrink = 1.0, 0.5
    eps_hi = eps_at(hi)
    while eps_hi > target:
        hi *= 2.0
        if hi > _MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"epsilon={target:g} at delta={d:g} cannot be reached with the {acc.upper()} "
                f"accountant for {t} steps at sample rate {q:g}, even with noise multiplier "
                f"{_MAX_NOISE_MULTIPLIER:g}; ask for a larger epsilon or delta"
                + (", or try accountant='pld'" if acc == "rdp" else "")
            )
        eps_hi = eps_at(hi)
    lo = hi * shrink
    eps_lo = eps_at(lo)
    while eps_lo <= target:
        hi, eps_hi = lo, eps_lo
        lo *= shrink
        if lo < _MIN_NOISE_MULTIPLIER:
            raise ConfigError(
                f"epsilon={target:g} is so large that {t} steps at sample rate {q:g} need a "
                f"noise multiplier below {_MIN_NOISE_MULTIPLIER:g}; such a guarantee is "
                f"meaningless, choose a smaller epsilon (values of 1-10 are usual)"
            )
        eps_lo = eps_at(lo)
    # Invariant: eps(lo) > target >= eps(hi). Epsilon is close to a power law in the noise
    # multiplier, so regula falsi on (log z, log eps) converges in a few steps; the Illinois
    # modification keeps it from stalling on one side, and a geometric midpoint is the fallback.
    a, b = math.log(lo), math.log(hi)
    fa = math.log(eps_lo / target)
    fb = math.log(eps_hi / target) if eps_hi > 0 else -math.inf
    side = 0
    for _ in range(200):
        if eps_hi >= (1.0 - _CALIBRATION_RTOL) * target or hi - lo <= 1e-9 * hi:
            break
        c = (a * fb - b * fa) / (fb - fa) if math.isfinite(fa) and math.isfinite(fb) else a
        if not a < c < b:
            c = 0.5 * (a + b)
        mid = math.exp(c)
        eps_mid = eps_at(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
            b, fb = c, (math.log(eps_mid / target) if eps_mid > 0 else -math.inf)
            if side == -1:
                fa /= 2.0
            side = -1
        else:
            lo = mid
            a, fa = c, math.log(eps_mid / target)
            if side == 1:
                fb /= 2.0
            side = 1
    return hi


# ---------------------------------------------------------------------------------------------
# ledger


@dataclass(frozen=True)
class LedgerEntry:
    """``steps`` consecutive subsampled-Gaussian steps at one (sample_rate, noise_multiplier),
    or ``steps`` Laplace releases at scale/sensitivity ``noise_multiplier``."""

    sample_rate: float
    noise_multiplier: float
    steps: int
    mechanism: Mechanism = "gaussian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", _check_sample_rate(self.sample_rate))
        object.__setattr__(self, "noise_multiplier", _check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "steps", _check_steps(self.steps))
        object.__setattr__(self, "mechanism", _check_mechanism(self.mechanism, self.sample_rate))

    @property
    def key(self) -> tuple[float, float, int, Mechanism]:
        return (self.sample_rate, self.noise_multiplier, self.steps, self.mechanism)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
        }
        if self.mechanism != "gaussian":  # ledgers written before Laplace entries stay valid
            out["mechanism"] = self.mechanism
        return out


def _entries_from(data: object, where: str) -> list[LedgerEntry]:
    if not isinstance(data, list):
        raise ConfigError(f"{where}: 'entries' must be a list, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, Mapping) or set(item) - {"mechanism"} != {
            "sample_rate",
            "noise_multiplier",
            "steps",
        }:
            raise ConfigError(
                f"{where}: entry {i} must have exactly the keys sample_rate, "
                f"noise_multiplier, steps (and optionally mechanism); got {item!r}"
            )
        out.append(
            LedgerEntry(
                sample_rate=item["sample_rate"],
                noise_multiplier=item["noise_multiplier"],
                steps=item["steps"],
                mechanism=item.get("mechanism", "gaussian"),
            )
        )
    return out


class PrivacyLedger:
    """What a run actually spent: (sample_rate, noise_multiplier, steps) per round, and its epsilon.

    Consecutive rounds with the same parameters are merged into one entry, so a ledger of a
    long run stays small. Thread-safe. ``to_dict``/``from_dict`` give a JSON-ready form.
    """

    FORMAT = "shoal.privacy.ledger/1"

    def __init__(
        self,
        *,
        accountant: Accountant = "rdp",
        entries: Iterable[LedgerEntry] = (),
        pld_discretization: float | None = PLD_DISCRETIZATION,
    ) -> None:
        self._accountant = _check_accountant(accountant)
        self._width = _check_discretization(pld_discretization)
        self._entries: list[LedgerEntry] = []
        self._lock = threading.Lock()
        for e in entries:
            self._append(e)

    @property
    def accountant(self) -> Accountant:
        return self._accountant

    @property
    def pld_discretization(self) -> float | None:
        """The PLD grid's fixed width, or None for the adaptive grid."""
        return self._width

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        with self._lock:
            return tuple(self._entries)

    @property
    def steps(self) -> int:
        """Total number of recorded steps (rounds)."""
        with self._lock:
            return sum(e.steps for e in self._entries)

    def _append(self, entry: LedgerEntry) -> None:
        last = self._entries[-1] if self._entries else None
        if (
            last is not None
            and last.sample_rate == entry.sample_rate
            and last.noise_multiplier == entry.noise_multiplier
            and last.mechanism == entry.mechanism
        ):
            self._entries[-1] = LedgerEntry(
                sample_rate=last.sample_rate,
                noise_multiplier=last.noise_multiplier,
                steps=last.steps + entry.steps,
                mechanism=last.mechanism,
            )
        else:
            self._entries.append(entry)

    def record(
        self,
        *,
        sample_rate: float,
        noise_multiplier: float,
        steps: int = 1,
        mechanism: Mechanism = "gaussian",
    ) -> None:
        """Record ``steps`` rounds run at the given sample rate and noise multiplier."""
        entry = LedgerEntry(
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            mechanism=mechanism,
        )
        with self._lock:
            self._append(entry)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0.0 for an empty ledger)."""
        d = _check_delta(delta)
        entries = self.entries
        return _epsilon_of(
            (e.key for e in entries),
            d,
            self._accountant,
            self._width,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "accountant": self._accountant,
            "pld_discretization": self._width,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        if not isinstance(data, Mapping) or data.get("format") != cls.FORMAT:
            raise ConfigError(
                f"not a privacy ledger: expected a dict with format {cls.FORMAT!r}, "
                f"got {data!r:.200}"
            )
        return cls(
            accountant=data.get("accountant", "rdp"),
            entries=_entries_from(data.get("entries"), "privacy ledger"),
            pld_discretization=data.get("pld_discretization", PLD_DISCRETIZATION),
        )

    def __repr__(self) -> str:
        return f"PrivacyLedger(accountant={self._accountant!r}, entries={list(self.entries)!r})"


def skellam_noise_multiplier(*, epsilon: float, delta: float) -> float:
    """The Skellam noise multiplier z (std / L2 sensitivity) of one (epsilon, delta)-DP
    release, from skellam_event's (xi, rho)-zCDP with the conversion of Bun and Steinke
    (2016, Prop. 1.3): epsilon = xi + rho + 2 sqrt(rho ln(1/delta)). With c = 1/(2 z^2),
    xi + rho = 4c, so sqrt(c) solves 4t^2 + 2 sqrt(L) t - epsilon = 0, L = ln(1/delta).
    dp_accounting's RDP conversion is tighter, so a ledger reads at most epsilon."""
    eps = _check_epsilon(epsilon)
    log_term = math.log(1.0 / _check_delta(delta))  # Skellam is not pure DP: delta > 0
    t = (-2.0 * math.sqrt(log_term) + math.sqrt(4.0 * log_term + 16.0 * eps)) / 8.0
    return 1.0 / (math.sqrt(2.0) * t)
