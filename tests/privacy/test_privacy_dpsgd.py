"""Tests of DP-SGD for PyTorch: per-example clipping against a plain loop, noise, accounting."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from shoal.errors import ConfigError  # noqa: E402
from shoal.privacy import epsilon  # noqa: E402
from shoal.privacy.dpsgd import DPSGD, poisson_batches  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # Tiny models on a shared 2-core machine: intra-op threads only add contention.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class SeqModel(nn.Module):
    """Linear layers on (batch, time, features) input: the fast path's sequence case."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).tanh().mean(1))


class Shared(nn.Module):
    """One layer applied twice: per-layer hooks cannot see per-example gradients correctly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc(x)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


def cnn_few_positions() -> nn.Module:
    # The second conv has 4 output positions and 72-wide patches: the Gram-matrix norm path.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 16, 3),
        nn.Flatten(),
        nn.Linear(16 * 2 * 2, 3),
    )


def layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (6,)),
    "cnn": (cnn, (1, 7, 7)),
    "cnn_gram": (cnn_few_positions, (1, 4, 4)),
    "seq": (SeqModel, (7, 5)),
    "shared": (Shared, (4,)),
    "layernorm": (layernorm, (6,)),
}


def _batch(shape: tuple[int, ...], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 3, (n,), generator=g)
    if shape == (4,):
        y = y.clamp(max=3)
    return x, y


def _reference_clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    loss_fn: Callable[..., torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per-example gradients by a plain loop, clipped and summed: the definition of DP-SGD."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for n in total:
            total[n] += grads[n] * scale
    model.zero_grad()
    return total


def _make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CASES[name][0]().double()


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["auto", "vmap", "ghost"])
@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_step_equals_clipped_per_example_sgd(name: str, method: str, clip: float) -> None:
    ghost_ok = name in ("mlp", "cnn", "cnn_gram", "seq")
    model = _make(name)
    if method == "ghost" and name == "layernorm":
        with pytest.raises(ConfigError, match="method='vmap'"):
            DPSGD(
                model,
                lr=0.1,
                clip_norm=1,
                noise_multiplier=0,
                batch_size=8,
                dataset_size=80,
                method="ghost",
            )
        return
    x, y = _batch(CASES[name][1], 9, seed=1)
    reference_model = _make(name)
    expected = _reference_clipped_sum(reference_model, x, y, clip, nn.functional.cross_entropy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DPSGD(
        model, lr=0.3, clip_norm=clip, noise_multiplier=0.0, batch_size=8, dataset_size=80,
        method=method,  # type: ignore[arg-type]
    )  # fmt: skip
    if method == "ghost" and name == "shared":
        with pytest.raises(ConfigError, match="more than once"):
            opt.step(x, y)
        return
    opt.step(x, y)
    assert opt.method == ("ghost" if ghost_ok and method != "vmap" else "vmap")
    for n, p in model.named_parameters():
        want = before[n] - 0.3 * expected[n] / 8
        torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)
    opt.close()


@pytest.mark.parametrize("method", ["vmap", "ghost"])
def test_custom_loss_function(method: str) -> None:
    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean()

    model, ref = _make("mlp"), _make("mlp")
    x, _ = _batch((6,), 6, seed=2)
    y = torch.randn(6, 3, dtype=torch.float64)
    expected = _reference_clipped_sum(ref, x, y, 0.2, mse)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DPSGD(
        model, lr=1.0, clip_norm=0.2, noise_multiplier=0, batch_size=6, dataset_size=60,
        loss_fn=mse, method=method,  # type: ignore[arg-type]
    )  # fmt: skip
    opt.step(x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - expected[n] / 6, rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 12),
    clip=st.floats(1e-3, 10.0),
    scale=st.floats(0.1, 100.0),
    seed=st.integers(0, 2**16),
)
def test_clipping_bounds_each_examples_contribution(
    n: int, clip: float, scale: float, seed: int
) -> None:
    # With no noise, the update is lr/B times a sum of n vectors of norm <= clip.
    model = _make("mlp", seed=seed % 7)
    x, y = _batch((6,), n, seed)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = DPSGD(model, lr=1.0, clip_norm=clip, noise_multiplier=0, batch_size=4, dataset_size=40)
    opt.step(x * scale, y)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) * 4 <= n * clip * (1 + 1e-9)


def test_noise_has_the_intended_std() -> None:
    torch.manual_seed(0)
    model = nn.Linear(100, 100).double()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    lr, clip, z, b = 0.5, 2.0, 1.3, 16
    opt = DPSGD(
        model, lr=lr, clip_norm=clip, noise_multiplier=z, batch_size=b, dataset_size=1600, seed=42
    )
    # An empty Poisson batch: the update is pure noise, -lr * N(0, (z*clip)^2) / b.
    opt.step(torch.zeros(0, 100, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    noise = ((before - after) / lr * b).numpy()
    assert noise.size == 10_100
    assert stats.kstest(noise, "norm", args=(0.0, z * clip)).pvalue > 1e-3
    n = noise.size
    chi2 = (n - 1) * noise.var(ddof=1) / (z * clip) ** 2
    assert 2 * min(stats.chi2.cdf(chi2, n - 1), stats.chi2.sf(chi2, n - 1)) > 1e-3
    # ... and the same variance test rejects noise 5% off in std.
    chi2_off = (n - 1) * noise.var(ddof=1) / (1.05 * z * clip) ** 2
    assert stats.chi2.cdf(chi2_off, n - 1) < 1e-6
    assert opt.ledger.steps == 1


def test_seeded_runs_repeat_and_default_runs_differ() -> None:
    x, y = _batch((6,), 8, seed=3)

    def run(seed: int | None) -> torch.Tensor:
        model = _make("mlp")
        opt = DPSGD(
            model, lr=0.1, clip_norm=1, noise_multiplier=1, batch_size=8, dataset_size=80, seed=seed
        )
        for _ in range(3):
            opt.step(x, y)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(None), run(None))


def test_steps_are_accounted() -> None:
    model = _make("mlp")
    opt = DPSGD(
        model, lr=0.1, clip_norm=1.0, noise_multiplier=1.1, batch_size=10, dataset_size=1000
    )
    x, y = _batch((6,), 10, seed=4)
    for _ in range(5):
        opt.step(x, y)
    assert opt.ledger.steps == 5
    assert opt.sample_rate == 0.01
    assert opt.epsilon(1e-5) == pytest.approx(
        epsilon(sample_rate=0.01, noise_multiplier=1.1, steps=5, delta=1e-5)
    )


def test_momentum_matches_heavy_ball() -> None:
    model, ref = _make("mlp"), _make("mlp")
    x, y = _batch((6,), 5, seed=5)
    opt = DPSGD(
        model,
        lr=0.1,
        clip_norm=0.5,
        noise_multiplier=0,
        batch_size=5,
        dataset_size=50,
        momentum=0.9,
    )
    p0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    g1 = _reference_clipped_sum(ref, x, y, 0.5, nn.functional.cross_entropy)
    opt.step(x, y)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.sub_(0.1 * g1[n] / 5)
    g2 = _reference_clipped_sum(ref, x, y, 0.5, nn.functional.cross_entropy)
    opt.step(x, y)
    for n, p in model.named_parameters():
        v = 0.9 * g1[n] / 5 + g2[n] / 5
        want = p0[n] - 0.1 * g1[n] / 5 - 0.1 * v
        torch.testing.assert_close(p.detach(), want, rtol=1e-9, atol=1e-12)


def test_dropout_models_keep_the_fast_path() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    opt = DPSGD(
        model, lr=0.1, clip_norm=1, noise_multiplier=1, batch_size=8, dataset_size=80, seed=0
    )
    x, y = _batch((6,), 8, seed=6)
    loss = opt.step(x, y)
    assert opt.method == "ghost" and math.isfinite(loss)


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        DPSGD(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), lr=0.1, clip_norm=1,
              noise_multiplier=1, batch_size=2, dataset_size=10)  # fmt: skip
    model = mlp()
    for bad in ({"lr": 0.0}, {"clip_norm": -1.0}, {"noise_multiplier": -0.5}, {"batch_size": 0},
                {"dataset_size": 1}, {"momentum": 1.0}, {"method": "opacus"}):  # fmt: skip
        kwargs = {
            "lr": 0.1,
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "batch_size": 4,
            "dataset_size": 40,
        }
        with pytest.raises(ConfigError):
            DPSGD(model, **{**kwargs, **bad})  # type: ignore[arg-type]
    opt = DPSGD(model, lr=0.1, clip_norm=1, noise_multiplier=1, batch_size=4, dataset_size=40)
    with pytest.raises(ConfigError, match="examples"):
        opt.step(torch.zeros(3, 6), torch.zeros(2, dtype=torch.long))


def test_poisson_batches_have_the_expected_size() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in poisson_batches(1000, sample_rate=0.05, steps=400, generator=g)]
    assert len(sizes) == 400
    assert abs(np.mean(sizes) - 50) < 1.5
    assert np.std(sizes) == pytest.approx(math.sqrt(1000 * 0.05 * 0.95), rel=0.15)
    batch = next(poisson_batches(10, sample_rate=1.0, steps=1))
    assert batch.tolist() == list(range(10))
    with pytest.raises(ConfigError):
        next(poisson_batches(10, sample_rate=0.0, steps=1))


def test_learns_digits_under_dp() -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = DPSGD(
        model,
        lr=1.0,
        clip_norm=1.0,
        noise_multiplier=0.8,
        batch_size=64,
        dataset_size=len(x),
        seed=0,
    )
    g = torch.Generator().manual_seed(0)
    for idx in poisson_batches(len(x), sample_rate=opt.sample_rate, steps=150, generator=g):
        opt.step(x[idx], y[idx])
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy > 0.8
    assert 0 < opt.epsilon(1e-5) < 10


class Tied(nn.Module):
    """Uses its layer's weight a second time outside the layer: invisible to forward hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + 0.5 * x @ self.fc.weight.t()


def test_auto_falls_back_when_the_fast_path_would_be_wrong() -> None:
    torch.manual_seed(0)
    model = Tied().double()
    ref = Tied().double()
    ref.load_state_dict(model.state_dict())
    x, y = _batch((4,), 6, seed=7)
    expected = _reference_clipped_sum(ref, x, y, 0.1, nn.functional.cross_entropy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = DPSGD(model, lr=1.0, clip_norm=0.1, noise_multiplier=0, batch_size=6, dataset_size=60)
    assert opt.method == "ghost"  # the structure qualifies ...
    opt.step(x, y)
    assert opt.method == "vmap"  # ... but the first-step check caught the hidden reuse
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - expected[n] / 6, rtol=1e-9, atol=1e-12)
