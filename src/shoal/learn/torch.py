"""PyTorch modules as federated models (the ``shoal[torch]`` extra).

:class:`TorchModel` turns a module's ``state_dict`` into named NumPy weights and trains it by
minibatch SGD or Adam, with FedProx's proximal term and SCAFFOLD's correction added to the
gradients. Registers the ``mlp`` and ``cnn`` models with the model registry.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
    from torch.nn import functional as F
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "shoal.learn.torch needs PyTorch, which is not installed: pip install 'shoal[torch]'"
    ) from exc

from shoal.errors import ConfigError, DataError
from shoal.learn.model import FitConfig, FitResult, Model, Weights
from shoal.learn.registry import register_model

__all__ = ["TorchModel", "cnn_module", "load_pretrained", "mlp_module"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "nll": F.nll_loss}
_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("step", "exp_avg", "exp_avg_sq")}
_EVAL_BATCH = 1024

# Torch's global generator drives dropout and module initialization. Fits and builds hold
# this lock while they seed and use it (restoring it afterwards), so runs with several
# worker threads stay reproducible and the caller's own torch RNG is left untouched.
_GLOBAL_RNG = threading.RLock()


class TorchModel:
    """A ``torch.nn.Module`` behind the :class:`~shoal.learn.model.Model` contract.

    ``module_factory`` builds the network (called once per instance, under ``seed``, so
    every instance starts from the same weights). Weights are the module's ``state_dict``
    (parameters and buffers, by their state-dict names) as NumPy arrays: floating tensors
    keep their float dtype, integer buffers (BatchNorm's batch counter) become float64.

    ``token_inputs=True`` feeds ``x`` to the module as integer token ids (for modules that
    embed them, like ``shoal.learn.text_models``) instead of floats, and adds ``perplexity``
    (``exp`` of the mean cross-entropy) to :meth:`evaluate`.

    ``fit`` runs ``config.epochs`` epochs (or ``config.max_steps`` minibatches) of the
    chosen optimizer, with minibatch order and the torch RNG seeded from ``rng``. The
    optimizer starts afresh every fit unless :meth:`load_optimizer_state` gave it the
    state a node kept from its last round (see :meth:`optimizer_state`): one adapter
    trains many nodes in turn, so it cannot keep per-node moments itself.
    """

    supports_dp = True  # fit honours FitConfig.dp through shoal.privacy.dpsgd

    def __init__(
        self,
        module_factory: Callable[[], nn.Module],
        *,
        loss: str | LossFn = "cross_entropy",
        optimizer: str = "sgd",
        momentum: float = 0.0,
        device: str = "cpu",
        seed: int = 0,
        token_inputs: bool = False,
    ) -> None:
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ConfigError(
                    f"unknown loss {loss!r}; choose one of {sorted(_LOSSES)} or pass a function "
                    "(outputs, targets) -> mean loss"
                )
            self._loss_fn = _LOSSES[loss]
        elif callable(loss):
            self._loss_fn = loss
        else:
            raise ConfigError(f"loss must be a name or a function, got {type(loss).__name__}")
        if optimizer not in _SLOTS:
            raise ConfigError(f"unknown optimizer {optimizer!r}; choose 'sgd' or 'adam'")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must lie in [0, 1), got {momentum}")
        if momentum and optimizer != "sgd":
            raise ConfigError("momentum applies to optimizer='sgd' only (Adam has its betas)")
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"bad torch device {device!r}: {exc}") from None
        self.module_factory = module_factory
        self.loss = loss
        self.optimizer = optimizer
        self.momentum = float(momentum)
        self.seed = int(seed)
        self.token_inputs = bool(token_inputs)
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            module = module_factory()
        if not isinstance(module, nn.Module):
            raise ConfigError(
                f"module_factory must return a torch.nn.Module, got {type(module).__name__}"
            )
        self.module = module.to(self.device)
        self._pending_state: Weights | None = None
        self._last_state: Weights = {}

    def __repr__(self) -> str:
        return f"TorchModel({type(self.module).__name__}, optimizer={self.optimizer!r})"

    def clone(self) -> TorchModel:
        return TorchModel(
            self.module_factory,
            loss=self.loss,
            optimizer=self.optimizer,
            momentum=self.momentum,
            device=str(self.device),
            seed=self.seed,
            token_inputs=self.token_inputs,
        )

    # --------------------------------------------------------------- weights

    def get_weights(self, names: Collection[str] | None = None) -> Weights:
        """The state dict as NumPy arrays (only ``names``, when given)."""
        out: Weights = {}
        for name, tensor in self.module.state_dict().items():
            if names is not None and name not in names:
                continue
            value = tensor.detach().to("cpu")
            if value.dtype in (torch.float16, torch.bfloat16):
                value = value.float()
            elif not value.is_floating_point():
                value = value.double()
            out[name] = value.numpy().copy()
        return out

    def set_weights(self, weights: Mapping[str, np.ndarray], *, partial: bool = False) -> None:
        """Load ``weights``; every state-dict entry unless ``partial`` (then only those given:
        a frozen backbone is not copied again every round)."""
        state = self.module.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise ConfigError(
                f"weights {unknown} are not in this module's state_dict; it has {sorted(state)}"
            )
        if partial:
            state = {name: state[name] for name in weights}
        for name, tensor in state.items():
            value = weights.get(name)
            if value is None or tuple(np.shape(value)) != tuple(tensor.shape):
                raise ConfigError(
                    f"weights[{name!r}] must have shape {tuple(tensor.shape)}, got "
                    f"{'nothing' if value is None else tuple(np.shape(value))}; was it built "
                    "for another architecture?"
                )
        with torch.no_grad():
            for name, tensor in state.items():
                array = np.asarray(weights[name])
                if not tensor.is_floating_point():
                    array = np.rint(array)
                if tensor.device.type == "cpu" and tensor.is_contiguous() and _numpy_dtype(tensor):
                    # One copy, cast on the way, straight into the tensor's memory (the
                    # state dict's tensors share it with the module).
                    np.copyto(tensor.numpy(), array, casting="unsafe")
                else:
                    tensor.copy_(torch.tensor(array))

    # ------------------------------------------------------ optimizer state

    def optimizer_state(self) -> Weights:
        """The optimizer's state after the last fit, as ``<slot>/<parameter>`` arrays.

        Slots are ``momentum_buffer`` for SGD with momentum and ``step``, ``exp_avg``,
        ``exp_avg_sq`` for Adam; plain SGD has none (an empty dict).
        """
        return {k: v.copy() for k, v in self._last_state.items()}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray] | None) -> None:
        """Have the next fit (only) resume from ``state``; ``None`` means a fresh optimizer."""
        if state is None or len(state) == 0:
            self._pending_state = None
            return
        params = dict(self.module.named_parameters())
        slots = _SLOTS[self.optimizer]
        checked: Weights = {}
        for key, value in state.items():
            slot, _, name = key.partition("/")
            if slot not in slots or name not in params:
                raise ConfigError(
                    f"optimizer state {key!r} does not fit a {self.optimizer} optimizer of "
                    f"this module; expected '<slot>/<parameter>' with slot in {slots}"
                )
            shape = () if slot == "step" else tuple(params[name].shape)
            if tuple(np.shape(value)) != shape:
                raise ConfigError(
                    f"optimizer state {key!r} must have shape {shape}, got {np.shape(value)}"
                )
            checked[key] = np.array(value)
        self._pending_state = checked

    def _make_optimizer(
        self, named: list[tuple[str, nn.Parameter]], lr: float, pending: Weights | None
    ) -> torch.optim.Optimizer:
        params = [p for _, p in named]
        opt: torch.optim.Optimizer
        if self.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr)
        else:
            opt = torch.optim.SGD(params, lr=lr, momentum=self.momentum)
        if pending:
            state_dict = opt.state_dict()
            per_param: dict[int, dict[str, torch.Tensor]] = {}
            for index, (name, param) in enumerate(named):
                for slot in _SLOTS[self.optimizer]:
                    value = pending.get(f"{slot}/{name}")
                    if value is None:
                        continue
                    dtype = torch.float32 if slot == "step" else param.dtype
                    per_param.setdefault(index, {})[slot] = torch.tensor(value, dtype=dtype)
            for index, slots in per_param.items():
                if self.optimizer == "adam" and len(slots) != len(_SLOTS["adam"]):
                    raise ConfigError(
                        f"Adam state for {named[index][0]!r} needs all of {_SLOTS['adam']}"
                    )
            state_dict["state"] = per_param
            opt.load_state_dict(state_dict)
        return opt

    def _export_state(
        self, opt: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]
    ) -> Weights:
        out: Weights = {}
        for index, slots in opt.state_dict()["state"].items():
            name = named[index][0]
            for slot, value in slots.items():
                if isinstance(value, torch.Tensor):
                    out[f"{slot}/{name}"] = value.detach().to("cpu").numpy().copy()
        return out

    # ------------------------------------------------------------ training

    def _tensors(self, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.asarray(data.x)
        y = np.asarray(data.y)
        if len(y) == 0:
            raise DataError("the data set is empty; a node needs at least one example")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"x has {x.shape[0]} rows but y has {y.shape[0]} labels")
        if y.dtype.kind not in "iu" or y.min() < 0:
            raise DataError("labels must be non-negative integer class ids")
        if self.token_inputs:
            return self._token_tensors(x, y), torch.tensor(y.astype(np.int64)).to(self.device)
        dtype = next(
            (p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32
        )
        # torch.tensor copies: shoal's arrays are often read-only views, which
        # torch.as_tensor would share (and warn about).
        xt = torch.tensor(x).to(self.device, dtype=dtype)
        yt = torch.tensor(y.astype(np.int64)).to(self.device)
        return xt, yt

    def _token_tensors(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        # Token ids stay integers in their own (often uint8) dtype: the module embeds them,
        # and a float copy of a corpus' windows would be 4-8 times its size.
        if x.dtype.kind not in "iu":
            raise DataError(
                f"this model embeds token ids and needs integer inputs, got dtype {x.dtype}; "
                "load text with shoal.data.load_play"
            )
        embedding = next((m for m in self.module.modules() if isinstance(m, nn.Embedding)), None)
        if (
            embedding is not None
            and x.size
            and (x.min() < 0 or x.max() >= embedding.num_embeddings)
        ):
            raise DataError(
                f"token ids must lie in 0..{embedding.num_embeddings - 1} (the model's "
                f"vocabulary of {embedding.num_embeddings}), got {int(x.min())}..{int(x.max())}; "
                "build the model with the data's vocabulary size"
            )
        if x.dtype not in (np.uint8, np.int16, np.int32, np.int64):
            x = x.astype(np.int64)
        return torch.tensor(np.ascontiguousarray(x)).to(self.device)

    def fit(self, data: Any, *, config: FitConfig, rng: np.random.Generator) -> FitResult:
        # Taken before anything can fail, so one node's state never reaches another's fit.
        pending, self._pending_state = self._pending_state, None
        self._last_state = {}
        x, y = self._tensors(data)
        if config.dp is not None:
            return self._fit_dp(x, y, config, rng)
        n = len(y)
        named = [(k, p) for k, p in self.module.named_parameters() if p.requires_grad]
        params = dict(named)

        # FedProx's and SCAFFOLD's terms (shoal.learn.hooks), as tensors once per fit.
        def as_tensor(name: str, value: np.ndarray) -> Any:
            # Buffers and frozen parameters get no gradient, so no term either.
            return _tensor_for({name: value}, name, params[name]) if name in params else value

        hooks = [hook.to(as_tensor) for hook in config.hooks]
        seed = int(rng.integers(2**62))
        order_gen = torch.Generator().manual_seed(seed)
        opt = self._make_optimizer(named, config.lr, pending)
        self.module.train()
        steps = 0
        losses: list[float] = []
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            for _ in range(config.epochs):
                order = torch.randperm(n, generator=order_gen).to(self.device)
                for start in range(0, n, config.batch_size):
                    idx = order[start : start + config.batch_size]
                    opt.zero_grad(set_to_none=False)
                    out = self.module(x[idx])
                    if steps == 0:
                        self._check_outputs(out, y)
                    loss = self._loss_fn(out, y[idx])
                    loss.backward()
                    if hooks:
                        with torch.no_grad():
                            for name, p in named:
                                if p.grad is None:
                                    p.grad = torch.zeros_like(p)
                                for hook in hooks:
                                    p.grad.add_(hook.term(name, p))
                    opt.step()
                    if config.track_loss:  # float() waits for the value: only when asked
                        losses.append(float(loss.detach()))
                    steps += 1
                    if config.max_steps is not None and steps >= config.max_steps:
                        break
                if config.max_steps is not None and steps >= config.max_steps:
                    break
        self._last_state = self._export_state(opt, named)
        recent = losses[-max(1, math.ceil(n / config.batch_size)) :]
        mean_loss = float(np.mean(recent)) if recent else float("nan")
        return FitResult(examples=n, steps=steps, loss=mean_loss)

    def _fit_dp(
        self, x: torch.Tensor, y: torch.Tensor, config: FitConfig, rng: np.random.Generator
    ) -> FitResult:
        """DP-SGD (shoal.privacy.dpsgd): Poisson batches of the node's own examples,
        per-example clipping, Gaussian noise from OS entropy, plain SGD steps."""
        from shoal.privacy.dpsgd import DPSGD, poisson_batches

        dp = config.dp
        assert dp is not None
        if config.hooks:
            raise ConfigError("DP-SGD training does not combine with FedProx or SCAFFOLD")
        n = len(y)
        expected = dp.normalizer or dp.sample_rate * n
        engine = DPSGD(
            self.module,
            lr=config.lr,
            clip_norm=dp.clip,
            noise_multiplier=dp.noise_multiplier,
            batch_size=max(1, min(n, round(dp.sample_rate * n))),
            dataset_size=n,
            loss_fn=self._loss_fn,
            normalizer=expected,
        )
        sampler = torch.Generator().manual_seed(int(rng.integers(2**62)))
        losses = []
        try:
            for index in poisson_batches(
                n, sample_rate=dp.sample_rate, steps=dp.steps, generator=sampler
            ):
                losses.append(engine.step(x[index], y[index]))
        finally:
            engine.close()
        finite = [v for v in losses if v == v]
        return FitResult(
            examples=n, steps=dp.steps, loss=float(np.mean(finite)) if finite else float("nan")
        )

    def _check_outputs(self, out: torch.Tensor, y: torch.Tensor) -> None:
        # Out-of-range labels would otherwise surface as a bare IndexError from torch.
        if isinstance(self.loss, str) and out.ndim == 2 and int(y.max()) >= out.shape[1]:
            raise DataError(
                f"labels go up to {int(y.max())} but the module outputs {out.shape[1]} "
                "classes; build the model with the data set's number of classes"
            )

    def evaluate(self, data: Any) -> dict[str, float]:
        x, y = self._tensors(data)
        self.module.eval()
        total_loss = 0.0
        correct = 0
        with torch.no_grad():
            for start in range(0, len(y), _EVAL_BATCH):
                xb, yb = x[start : start + _EVAL_BATCH], y[start : start + _EVAL_BATCH]
                out = self.module(xb)
                if start == 0:
                    self._check_outputs(out, y)
                total_loss += float(self._loss_fn(out, yb)) * len(yb)
                correct += int((out.argmax(dim=1) == yb).sum())
        metrics = {"loss": total_loss / len(y), "accuracy": correct / len(y)}
        if self.token_inputs:
            metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
        return metrics


def _tensor_for(source: Mapping[str, np.ndarray], name: str, like: torch.Tensor) -> torch.Tensor:
    value = source.get(name)
    if value is None or tuple(np.shape(value)) != tuple(like.shape):
        raise ConfigError(
            f"{name!r} is missing from a gradient hook (FedProx, SCAFFOLD) or has the wrong "
            f"shape (expected {tuple(like.shape)}); the server and node models differ"
        )
    return torch.tensor(np.asarray(value)).to(like.device, dtype=like.dtype)


# ---------------------------------------------------------------- built-in nets


def mlp_module(features: int, classes: int, hidden: int = 64) -> nn.Module:
    """features -> hidden (ReLU) -> classes; inputs of any shape are flattened first."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


def cnn_module(features: int, classes: int, channels: int = 16) -> nn.Module:
    """A small conv net for square one-channel images given flat (8x8 digits: features=64)."""
    side = math.isqrt(features)
    if side * side != features or side < 4:
        raise ConfigError(
            f"cnn needs square single-channel images of side >= 4 (features = side**2, "
            f"e.g. 64 for 8x8 digits), got features={features}"
        )
    pooled = side // 4
    return nn.Sequential(
        nn.Flatten(),
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * pooled * pooled, classes),
    )


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _mlp(
    *,
    features: int,
    classes: int,
    hidden: int = 64,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    seed: int = 0,
) -> Model:
    factory = functools.partial(mlp_module, features, classes, _positive("hidden", hidden))
    return TorchModel(factory, optimizer=optimizer, momentum=momentum, seed=seed)


def _cnn(
    *,
    features: int,
    classes: int,
    channels: int = 16,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    seed: int = 0,
) -> Model:
    factory = functools.partial(cnn_module, features, classes, _positive("channels", channels))
    return TorchModel(factory, optimizer=optimizer, momentum=momentum, seed=seed)


register_model("mlp", _mlp)
register_model("cnn", _cnn)


def _numpy_dtype(tensor: torch.Tensor) -> bool:
    """Whether NumPy can view this tensor's memory (it has no bfloat16)."""
    return tensor.dtype is not torch.bfloat16


def load_pretrained(folder: str, **overrides: Any) -> Model:
    """The model of a folder ``shoal export --format hub`` wrote (its weights scanned first);
    see :func:`shoal.learn.export.hub.load_pretrained`."""
    from shoal.learn.export.hub import load_pretrained as load

    return load(folder, **overrides)
