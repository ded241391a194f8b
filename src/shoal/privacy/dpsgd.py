"""DP-SGD for PyTorch models: per-example gradient clipping, Gaussian noise, accounting.

Per-example gradients come from torch.func (``vmap(grad(functional_call))``), which works for any
model without cross-example layers (no BatchNorm). Models built only from Linear and Conv2d layers
get a faster path that never materializes per-example gradients of Linear layers; it checks
itself against plain autograd on the first step and falls back to torch.func if they disagree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

from shoal.errors import ConfigError
from shoal.privacy.accounting import PrivacyLedger

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.func import functional_call, grad, vmap
    from torch.nn import grad as nn_grad
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "shoal.privacy.dpsgd needs PyTorch; install it with: pip install 'shoal[torch]'"
    ) from exc

__all__ = ["DPSGD", "poisson_batches"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Method = Literal["auto", "vmap", "ghost"]


def poisson_batches(
    n: int, *, sample_rate: float, steps: int, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Yield ``steps`` index tensors, each example included independently with ``sample_rate``.

    This is the sampling the accountants assume; fixed-size shuffled batches are only
    approximately covered by the same epsilon.
    """
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if not 0.0 < sample_rate <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    gen = generator if generator is not None else _secure_generator(None)
    for _ in range(steps):
        mask = torch.rand(n, generator=gen) < sample_rate
        yield mask.nonzero().squeeze(1)


def _secure_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        # DP noise must not be predictable: 63 bits from the OS, never a time-based seed.
        seed = int.from_bytes(os.urandom(8), "big") >> 1
    gen.manual_seed(int(seed))
    return gen


def _ghost_layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The (prefix, module) pairs of a model made only of plain Linear/Conv2d layers, else None."""
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        trainable = [p.requires_grad for p in own]
        if not any(trainable):
            continue
        if not all(trainable):
            return None
        plain_conv = (
            isinstance(module, nn.Conv2d)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
        if not (isinstance(module, nn.Linear) or plain_conv):
            return None
        layers.append((name, module))
    return layers


def _row_sq(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each example's slice (dimension 0 indexes examples)."""
    # vector_norm reduces without a temporary the size of ``t``, unlike t.pow(2).sum().
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1).square_()


class _Taps:
    """Inputs and outputs of Linear/Conv2d layers, recorded by forward hooks while active."""

    def __init__(self) -> None:
        self.active = False
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if not self.active:
                return
            if name in self.store:
                raise _SharedLayer(name)
            self.store[name] = (inputs[0].detach(), output)

        return record


class DPSGD:
    """Differentially private SGD (Abadi et al. 2016) on a PyTorch model.

    Each step clips every example's gradient to L2 norm ``clip_norm``, sums them, adds
    N(0, (noise_multiplier * clip_norm)^2) noise, divides by the expected ``batch_size`` and
    takes an SGD step (with optional momentum). Batches should be Poisson samples at
    ``batch_size / dataset_size`` (see ``poisson_batches``); every step is recorded in
    ``ledger`` for accounting.

    ``loss_fn(output, target)`` is applied to one example at a time (a batch of one) and must
    return a scalar; the default is cross-entropy. ``method``: ``"vmap"`` (torch.func, any
    model), ``"ghost"`` (Linear/Conv2d models only) or ``"auto"`` (ghost when the model allows
    and it matches plain autograd on the first batch). ``seed`` is for tests only; by default
    the noise generator is seeded from ``os.urandom``. ``close()`` removes the hooks from
    ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        clip_norm: float,
        noise_multiplier: float,
        batch_size: int,
        dataset_size: int,
        momentum: float = 0.0,
        loss_fn: LossFn | None = None,
        method: Method = "auto",
        seed: int | None = None,
        ledger: PrivacyLedger | None = None,
        normalizer: float | None = None,
    ) -> None:
        if normalizer is not None and not (math.isfinite(normalizer) and normalizer > 0):
            raise ConfigError(f"normalizer must be a finite number > 0, got {normalizer!r}")
        # The noised sum is divided by this: the expected batch, or in distributed DP the
        # whole federation's expected batch.
        self.normalizer = float(normalizer) if normalizer is not None else float(batch_size)
        for name, value in (("lr", lr), ("clip_norm", clip_norm)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if int(dataset_size) != dataset_size or dataset_size < batch_size:
            raise ConfigError(
                f"dataset_size must be an int >= batch_size={batch_size}, got {dataset_size!r}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum!r}")
        if method not in ("auto", "vmap", "ghost"):
            raise ConfigError(f"method must be 'auto', 'vmap' or 'ghost', got {method!r}")
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise ConfigError(
                    f"layer {name or 'model'} is {type(module).__name__}, which mixes examples "
                    f"in a batch and breaks per-example clipping; use GroupNorm or LayerNorm"
                )
        self.model = model
        self.lr = float(lr)
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.batch_size = int(batch_size)
        self.dataset_size = int(dataset_size)
        self.sample_rate = self.batch_size / self.dataset_size
        self.momentum = float(momentum)
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self._loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self._default_loss = loss_fn is None
        self._gen = _secure_generator(seed)
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._params:
            raise ConfigError("the model has no trainable parameters")
        dtypes = {p.dtype for p in self._params.values()}
        self._noise_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
        self._numel = sum(p.numel() for p in self._params.values())
        self._param_list: list[torch.Tensor] = list(self._params.values())
        self._noise_buf = torch.empty(self._numel, dtype=self._noise_dtype)
        self._noise_views: list[torch.Tensor] = []
        offset = 0
        for p in self._param_list:
            self._noise_views.append(self._noise_buf[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        self._velocity: dict[str, torch.Tensor] = {}
        self._scratch: dict[tuple[str, str], torch.Tensor] = {}

        layers = _ghost_layers(model)
        if method == "ghost" and layers is None:
            raise ConfigError(
                "method='ghost' supports only models whose trainable layers are nn.Linear and "
                "nn.Conv2d (groups=1, numeric zero padding); use method='vmap'"
            )
        self._ghost_layers = layers if method != "vmap" else None
        self._ghost_modules = dict(self._ghost_layers or [])
        self._ghost_keys = {
            name: (f"{name}.weight", f"{name}.bias") if name else ("weight", "bias")
            for name in self._ghost_modules
        }
        self._taps = _Taps()
        self._handles = [
            module.register_forward_hook(self._taps.hook(name))
            for name, module in (self._ghost_layers or [])
        ]
        # 'auto' checks the fast path against plain autograd once before trusting it.
        self._verify_ghost = method == "auto" and self._ghost_layers is not None
        self.method: Literal["vmap", "ghost"] = "ghost" if self._ghost_layers else "vmap"
        self._per_example_grads = self._build_vmap()

    def close(self) -> None:
        """Remove the forward hooks this optimizer put on the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._ghost_layers = None
        self.method = "vmap"

    # -- torch.func path ---------------------------------------------------------------------

    def _build_vmap(self) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
        model, loss_fn = self.model, self._loss_fn

        def one(
            params: dict[str, torch.Tensor],
            buffers: dict[str, torch.Tensor],
            x: torch.Tensor,
            y: torch.Tensor,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            loss = loss_fn(out, y.unsqueeze(0))
            return loss, loss.detach()

        return vmap(grad(one, has_aux=True), in_dims=(None, None, 0, 0), randomness="different")

    def _vmap_norms_and_grads(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        params = {n: p.detach() for n, p in self._params.items()}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        grads, losses = self._per_example_grads(params, buffers, x, y)
        sq = sum(_row_sq(g) for g in grads.values())
        assert isinstance(sq, torch.Tensor)
        return grads, sq, losses

    def _vmap_clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        grads, sq, losses = self._vmap_norms_and_grads(x, y)
        factor = self._clip_factors(sq)
        summed = {
            n: torch.tensordot(factor.to(g.dtype), g, dims=([0], [0])) for n, g in grads.items()
        }
        return summed, losses

    def _clip_factors(self, sq_norms: torch.Tensor) -> torch.Tensor:
        # min(1, C/||g||); a zero gradient gives rsqrt = inf, clamped to a factor of 1.
        return (torch.rsqrt(sq_norms) * self.clip_norm).clamp_(max=1.0)

    # -- Linear/Conv2d path --------------------------------------------------------------------

    def _buffer(
        self, key: tuple[str, str], shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """A reused scratch tensor of ``shape`` (a view of one sized for the largest batch).

        Allocating megabyte temporaries every step makes the allocator return memory to the
        OS and fault it back in, which costs more than the arithmetic on small models.
        """
        buf = self._scratch.get(key)
        if (
            buf is None
            or buf.dtype != dtype
            or buf.shape[1:] != shape[1:]
            or buf.shape[0] < shape[0]
        ):
            rows = max(shape[0], self.batch_size + 4 * math.isqrt(self.batch_size) + 4)
            buf = torch.empty((rows, *shape[1:]), dtype=dtype)
            self._scratch[key] = buf
        return buf[: shape[0]]

    def _unfold(self, name: str, act: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
        """``F.unfold`` of a conv layer's input, written into a reused buffer."""
        b, c, h, w = act.shape
        kh, kw = module.kernel_size
        # _ghost_layers admits only numeric padding, so every entry here is an int.
        ph, pw = (int(v) for v in module.padding)
        (dh, dw), (sh, sw) = module.dilation, module.stride
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = self._buffer((name, "cols"), (b, c * kh * kw, oh * ow), act.dtype)
        torch.ops.aten.im2col.out(act, [kh, kw], [dh, dw], [ph, pw], [sh, sw], out=out)
        return out

    def _per_example_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._default_loss:
            return F.cross_entropy(out, y, reduction="none")
        # The loss is defined on a batch of one (as in the vmap path); vmap over output rows
        # evaluates exactly that without a Python loop.
        loss_fn = self._loss_fn
        return vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)

    def _ghost_clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        assert self._ghost_layers is not None
        taps = self._taps
        taps.store = {}
        taps.active = True
        try:
            out = self.model(x)
        finally:
            taps.active = False
        store, taps.store = taps.store, {}
        losses = self._per_example_losses(out, y)
        names = [n for n, _ in self._ghost_layers if n in store]
        # Gradients w.r.t. the layer outputs only: autograd then skips the weight-gradient
        # products, which are formed below already clipped and summed.
        backprops = torch.autograd.grad(
            losses.sum(), [store[n][1] for n in names], allow_unused=True
        )
        modules = self._ghost_modules
        b_size = x.shape[0]
        sq = torch.zeros(b_size, dtype=out.dtype)
        # (name, module, kind, tensor a, tensor b, per-example bias grads or None)
        work: list[tuple[str, nn.Module, str, torch.Tensor, torch.Tensor, torch.Tensor | None]]
        work = []
        for name, grad_out in zip(names, backprops):
            if grad_out is None:
                continue
            module = modules[name]
            act = store[name][0]
            if isinstance(module, nn.Conv2d):
                cols = self._unfold(name, act, module)  # (B, C_in*kh*kw, L)
                g3 = grad_out.reshape(b_size, grad_out.shape[1], -1)  # (B, C_out, L)
                positions, k, c_out = g3.shape[2], cols.shape[1], g3.shape[1]
                if positions * (k + c_out) < c_out * k:
                    # Few output positions: the norm from two small Gram matrices (Li et al.
                    # 2022, "ghost clipping") costs less than the per-example gradients.
                    gram_a = torch.bmm(cols.transpose(1, 2), cols)
                    gram_g = torch.bmm(g3.transpose(1, 2), g3)
                    sq += torch.linalg.vecdot(gram_a.flatten(1), gram_g.flatten(1))
                    work.append((name, module, "conv_ghost", act, grad_out, g3.sum(2)))
                else:
                    per_ex = self._buffer((name, "per_ex"), (b_size, c_out, k), cols.dtype)
                    torch.bmm(g3, cols.transpose(1, 2), out=per_ex)
                    sq += _row_sq(per_ex)
                    work.append((name, module, "per_ex", per_ex, g3, g3.sum(2)))
            elif act.dim() == 2:
                # For one example the weight gradient is the outer product g a^T, whose norm
                # is ||g|| ||a||: no per-example matrix is needed.
                a_sq = _row_sq(act)
                if module.bias is not None:
                    a_sq.add_(1.0)
                sq.addcmul_(a_sq, _row_sq(grad_out))
                work.append((name, module, "outer", act, grad_out, None))
                continue
            else:
                a3 = act.reshape(b_size, -1, act.shape[-1])
                g3 = grad_out.reshape(b_size, -1, grad_out.shape[-1])
                per_ex = self._buffer(
                    (name, "per_ex"), (b_size, g3.shape[2], a3.shape[2]), a3.dtype
                )
                torch.bmm(g3.transpose(1, 2), a3, out=per_ex)  # (B, out, in)
                sq += _row_sq(per_ex)
                work.append((name, module, "per_ex", per_ex, g3, g3.sum(1)))
            bias_ex = work[-1][5]
            if module.bias is not None and bias_ex is not None:
                sq += _row_sq(bias_ex)
        factor = self._clip_factors(sq)
        summed: dict[str, torch.Tensor] = {}
        for name, module, kind, first, second, bias_ex in work:
            weight_key, bias_key = self._ghost_keys[name]
            f = factor if factor.dtype == first.dtype else factor.to(first.dtype)
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            if kind == "outer":
                scaled = second * f.unsqueeze(1)
                summed[weight_key] = scaled.t().mm(first)
                if module.bias is not None:
                    summed[bias_key] = scaled.sum(0)
                continue
            if kind == "conv_ghost":
                assert isinstance(module, nn.Conv2d)
                # The weighted sum is an ordinary conv weight-gradient with scaled output grads.
                summed[weight_key] = nn_grad.conv2d_weight(
                    first,
                    weight.shape,
                    second * f.view(-1, 1, 1, 1),
                    stride=module.stride,
                    padding=module.padding,
                    dilation=module.dilation,
                )
            else:
                summed[weight_key] = torch.tensordot(f, first, dims=1).reshape(weight.shape)
            if module.bias is not None and bias_ex is not None:
                summed[bias_key] = torch.tensordot(f, bias_ex, dims=1)
        for name, p in self._params.items():
            if name not in summed:  # a layer the forward pass did not use
                summed[name] = torch.zeros_like(p)
        return summed, sq, losses.detach()

    def _check_ghost(self, x: torch.Tensor, y: torch.Tensor, *, examples: int = 3) -> bool:
        """Whether the fast path matches plain autograd, one example at a time, on a few examples.

        This catches what the layer hooks cannot see, such as a parameter also used outside its
        layer's forward. Plain autograd rather than torch.func keeps the first step cheap.
        """
        xs, ys = x[:examples], y[:examples]
        params = list(self._params.values())
        # Eval mode switches dropout off, so both computations see the same function.
        self.model.eval()
        try:
            ghost, sq_ghost, _ = self._ghost_clipped_sum(xs, ys)
            per_example = []
            for i in range(xs.shape[0]):
                loss = self._loss_fn(self.model(xs[i : i + 1]), ys[i : i + 1])
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                per_example.append(
                    [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
                )
        except _SharedLayer:
            return False
        finally:
            self.model.train()
        sq = torch.stack([sum(g.pow(2).sum() for g in grads) for grads in per_example])  # type: ignore[misc]
        if not torch.allclose(sq_ghost, sq.to(sq_ghost.dtype), rtol=1e-3, atol=1e-12):
            return False
        factor = self._clip_factors(sq)
        for j, (name, p) in enumerate(self._params.items()):
            ref = sum(f * grads[j] for f, grads in zip(factor, per_example))
            assert isinstance(ref, torch.Tensor)
            err = float((ghost[name] - ref).norm())
            if err > 1e-3 * float(ref.norm()) + 1e-12 * (1 + float(p.detach().norm())):
                return False
        return True

    # -- the step ------------------------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DP-SGD step on the batch ``(x, y)``; returns the batch's mean loss before the step.

        An empty batch (possible under Poisson sampling) still adds noise and counts as a step.
        """
        if x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"x has {x.shape[0]} examples but y has {y.shape[0]}; pass matching batches"
            )
        if not self.model.training:
            self.model.train()
        n = int(x.shape[0])
        if n == 0:
            summed = {name: torch.zeros_like(p) for name, p in self._params.items()}
            mean_loss = float("nan")
        else:
            if self._verify_ghost:
                self._verify_ghost = False
                if not self._check_ghost(x, y):
                    self.close()
            if self._ghost_layers is not None:
                try:
                    summed, _, losses = self._ghost_clipped_sum(x, y)
                except _SharedLayer as exc:
                    raise ConfigError(
                        f"layer {exc.args[0]!r} runs more than once per forward pass; "
                        f"use method='vmap' for models that share layers"
                    ) from None
            else:
                summed, losses = self._vmap_clipped_sum(x, y)
            mean_loss = float(losses.mean())
        self._apply(summed)
        self.ledger.record(
            sample_rate=self.sample_rate, noise_multiplier=self.noise_multiplier, steps=1
        )
        return mean_loss

    @torch.no_grad()
    def _apply(self, summed: dict[str, torch.Tensor]) -> None:
        std = self.noise_multiplier * self.clip_norm
        scale = 1.0 / self.normalizer
        params = self._param_list
        grads = [
            g if g.dtype == p.dtype else g.to(p.dtype)
            for g, p in zip((summed[name] for name in self._params), params)
        ]
        noises: list[torch.Tensor] = []
        if std > 0:
            # One draw for all parameters into a reused buffer: fewer calls, and the noise
            # stream does not depend on how the model splits its parameters.
            torch.randn(self._numel, generator=self._gen, out=self._noise_buf)
            noises = [
                v if v.dtype == p.dtype else v.to(p.dtype)
                for v, p in zip(self._noise_views, params)
            ]
        if self.momentum == 0.0:
            # Foreach kernels: one call per operation for all parameters, like torch.optim.
            torch._foreach_add_(params, grads, alpha=-self.lr * scale)
            if noises:
                torch._foreach_add_(params, noises, alpha=-self.lr * std * scale)
            return
        torch._foreach_mul_(grads, scale)
        if noises:
            torch._foreach_add_(grads, noises, alpha=std * scale)
        for name, update in zip(self._params, grads):
            buf = self._velocity.get(name)
            if buf is None:
                self._velocity[name] = update
            else:
                buf.mul_(self.momentum).add_(update)
        torch._foreach_add_(params, [self._velocity[n] for n in self._params], alpha=-self.lr)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (all recorded steps) at ``delta``."""
        return self.ledger.epsilon(delta)


class _SharedLayer(Exception):
    """Raised inside the fast path when one layer runs twice in a forward pass."""
