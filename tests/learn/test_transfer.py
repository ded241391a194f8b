"""Transfer learning: scanned pretrained files, frozen backbones, LoRA, FedPer/FedRep.

The adversary here is a hostile pretrained file (a pickle that runs code when loaded), a
state dict that does not fit, and a coordinator that tries to read or overwrite a node's
personal layers.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from shoal.data import Dataset, load_digits, partition  # noqa: E402
from shoal.errors import ConfigError, UnsafeModelError  # noqa: E402
from shoal.learn import TRAIN, FedAvg, FitConfig, SoftmaxRegression, simulate  # noqa: E402
from shoal.learn.tasks import PERSONAL_STATE, learning_tasks  # noqa: E402
from shoal.learn.torch import TorchModel, mlp_module  # noqa: E402
from shoal.learn.transfer import (  # noqa: E402
    LORA_PATTERNS,
    PartialModel,
    PretrainedFactory,
    VocabularyMismatch,
    add_lora,
    load_into,
    merge_lora,
    read_weights,
)
from shoal.runtime import TaskContext  # noqa: E402

pytestmark = pytest.mark.torch

FACTORY = functools.partial(mlp_module, 64, 10, 16)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny batches run fastest on one intra-op thread, above all on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits(test_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def backbone(digits: tuple[Dataset, Dataset]) -> dict[str, np.ndarray]:
    """An MLP pretrained centrally for a few epochs."""
    model = TorchModel(FACTORY, seed=1)
    model.fit(digits[0], config=FitConfig(epochs=3, lr=0.1), rng=np.random.default_rng(0))
    return model.get_weights()


def save_torch(path: Path, weights: dict[str, np.ndarray], wrap: str | None = None) -> None:
    state = {k: torch.tensor(v) for k, v in weights.items()}
    torch.save({wrap: state} if wrap else state, path)


# ------------------------------------------------------------------ reading pretrained files


@pytest.mark.parametrize("kind", ["safetensors", "torch", "wrapped", "folder"])
def test_pretrained_weights_read_from_every_format(
    tmp_path: Path, backbone: dict[str, np.ndarray], kind: str
) -> None:
    from safetensors.numpy import save_file

    if kind == "safetensors":
        path = tmp_path / "b.safetensors"
        save_file({k: v.astype(np.float32) for k, v in backbone.items()}, str(path))
    elif kind == "folder":  # Hugging Face layout: config.json beside model.safetensors
        path = tmp_path / "model"
        path.mkdir()
        (path / "config.json").write_text("{}")
        save_file(
            {k: v.astype(np.float32) for k, v in backbone.items()}, str(path / "model.safetensors")
        )
    else:
        path = tmp_path / "b.pt"
        save_torch(path, backbone, wrap="state_dict" if kind == "wrapped" else None)
    weights = read_weights(path)
    assert sorted(weights) == sorted(backbone)
    for name, value in backbone.items():
        np.testing.assert_array_equal(weights[name], value.astype(np.float32))


class _RunsCode:
    """Unpickling this calls open() on a file it names: a stand-in for os.system."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self) -> Any:
        return (open, (self.target, "w"))


def test_a_malicious_pretrained_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for name in ("evil.pt", "evil.pkl"):
        path = tmp_path / name
        torch.save({"weight": torch.zeros(2), "payload": _RunsCode(str(marker))}, path)
        with pytest.raises(UnsafeModelError, match="refusing to load"):
            read_weights(path)
    # The same bytes dressed as a Hugging Face folder's safetensors file: the scanner reads
    # content, not names.
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(pickle.dumps(_RunsCode(str(marker))))
    with pytest.raises(UnsafeModelError):
        read_weights(folder)
    assert not marker.exists()


def test_unfit_state_dicts_are_refused_with_every_bad_key_named(
    backbone: dict[str, np.ndarray],
) -> None:
    module = FACTORY()
    bad = dict(backbone)
    bad["extra.weight"] = np.zeros(3, np.float32)
    del bad["3.bias"]
    bad["1.weight"] = np.zeros((16, 63), np.float32)
    with pytest.raises(ConfigError) as info:
        load_into(module, bad)
    text = str(info.value)
    assert "unexpected keys (in the file, not the model): extra.weight" in text
    assert "missing keys (in the model, not the file): 3.bias" in text
    assert "1.weight (file (16, 63), model (16, 64))" in text
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for name, value in module.state_dict().items():  # nothing half-loaded
        assert torch.equal(value, before[name])


def test_a_vocabulary_mismatch_names_both_sizes() -> None:
    def text_model(vocab: int) -> nn.Module:
        return nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(4 * 3, vocab))

    pretrained = {k: v.numpy() for k, v in text_model(65).state_dict().items()}
    with pytest.raises(VocabularyMismatch, match=r"vocabulary of 65 tokens.*has 60"):
        load_into(text_model(60), pretrained)


def test_skip_keeps_a_new_head_and_prefix_strips_a_wrapper(backbone: dict[str, np.ndarray]) -> None:
    module = FACTORY()
    head = module.state_dict()["3.weight"].clone()
    prefixed = {f"backbone.{k}": v for k, v in backbone.items() if not k.startswith("3.")}
    loaded = load_into(module, prefixed, skip=("3.*",), prefix="backbone.")
    assert loaded == ["1.bias", "1.weight"]
    assert torch.equal(module.state_dict()["3.weight"], head)
    np.testing.assert_array_equal(module.state_dict()["1.weight"].numpy(), backbone["1.weight"])


# ------------------------------------------------------------------ frozen backbone, LoRA


def test_a_frozen_backbone_never_moves_and_only_the_head_travels(
    digits: tuple[Dataset, Dataset], backbone: dict[str, np.ndarray]
) -> None:
    train, test = digits
    nodes = partition(train, nodes=4, scheme="iid", seed=0)
    model = PartialModel(
        TorchModel(PretrainedFactory(FACTORY, backbone, skip=("3.*",))), shared=("3.*",)
    )
    assert model.frozen_names == ("1.weight", "1.bias")
    result = simulate(
        model=model, nodes=nodes, algorithm=FedAvg(rounds=3, nodes_per_round=4), test=test
    )
    assert sorted(result.weights) == ["3.bias", "3.weight"]  # the server never held the backbone
    inner = model.clone().model
    assert isinstance(inner, TorchModel)
    np.testing.assert_array_equal(inner.get_weights()["1.weight"], backbone["1.weight"])
    # The head learned on top of the pretrained features.
    assert result.metrics["accuracy"] > 0.5


def test_lora_starts_as_the_base_model_and_federates_only_its_adapters(
    digits: tuple[Dataset, Dataset], backbone: dict[str, np.ndarray]
) -> None:
    train, test = digits
    base = TorchModel(PretrainedFactory(FACTORY, backbone))
    with_lora = TorchModel(PretrainedFactory(FACTORY, backbone, then=lambda m: add_lora(m, rank=2)))
    model = PartialModel(with_lora, shared=LORA_PATTERNS)
    assert sorted(model.get_weights()) == ["1.lora_a", "1.lora_b", "3.lora_a", "3.lora_b"]
    x = torch.tensor(test.x[:32], dtype=torch.float32)
    with torch.no_grad():  # B starts at zero: the adapted model is the pretrained one
        assert torch.allclose(base.module(x), with_lora.module(x))
    nodes = partition(train, nodes=3, scheme="iid", seed=0)
    result = simulate(model=model, nodes=nodes, algorithm=FedAvg(rounds=2, nodes_per_round=3))
    model.set_weights(result.weights)
    assert np.abs(result.weights["3.lora_b"]).max() > 0
    trained = with_lora.module
    merged = PretrainedFactory(FACTORY, backbone, then=lambda m: add_lora(m, rank=2))()
    merged.load_state_dict(trained.state_dict())
    merge_lora(merged)
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(x), trained(x), atol=1e-5)


def test_partial_model_refuses_what_it_cannot_do() -> None:
    torch_model = TorchModel(FACTORY)
    with pytest.raises(ConfigError, match="matches no weight"):
        PartialModel(torch_model, shared=("head.*",))
    with pytest.raises(ConfigError, match="no weight is shared"):
        PartialModel(torch_model, personal=("*",))
    with pytest.raises(ConfigError, match="needs a PyTorch model"):
        PartialModel(SoftmaxRegression(features=4, classes=2), shared=("W",))
    with pytest.raises(ConfigError, match="rank 20 exceeds"):
        add_lora(FACTORY(), rank=20)
    model = PartialModel(torch_model, shared=("3.*",))
    with pytest.raises(ConfigError, match=r"unexpected \['1.weight'\]"):
        model.set_weights({**model.get_weights(), "1.weight": np.zeros((16, 64))})


# ------------------------------------------------------------------ personalization


def _ctx(node: str, data: Any, state: dict[str, Any]) -> TaskContext:
    return TaskContext(node_id=node, data=data, state=state, task_id="t")


@pytest.mark.parametrize("mode", ["fedper", "fedrep"])
def test_personal_layers_stay_at_each_node_and_never_leave(
    digits: tuple[Dataset, Dataset], mode: str
) -> None:
    train, _ = digits
    nodes = partition(train, nodes=2, scheme="dirichlet", alpha=0.3, seed=0)
    model = PartialModel(TorchModel(FACTORY), personal=("3.*",), mode=mode)  # type: ignore[arg-type]
    task = learning_tasks(model)[TRAIN]
    shared = model.get_weights()
    payload = {**{f"w/{k}": v for k, v in shared.items()}, "max_steps": 8, "seed": 0}
    states: list[dict[str, Any]] = [{}, {}]
    for node, data, state in zip(("a", "b"), nodes, states):
        out = task(_ctx(node, data, state), dict(payload))
        assert out is not None
        # What the node releases: shared deltas and counts, nothing of its head.
        assert sorted(k for k in out if k.startswith("d/")) == ["d/1.bias", "d/1.weight"]
        assert not any("3." in k for k in out)
        assert sorted(state[PERSONAL_STATE]) == ["3.bias", "3.weight"]
    heads = [s[PERSONAL_STATE]["3.weight"] for s in states]
    assert not np.allclose(heads[0], heads[1])  # each node's head is its own
    # The next round starts each node from its own head, not from the other node's.
    before = {k: v.copy() for k, v in states[0][PERSONAL_STATE].items()}
    task(_ctx("a", nodes[0], states[0]), dict(payload))
    assert not np.allclose(states[0][PERSONAL_STATE]["3.weight"], heads[1])
    assert not np.allclose(states[0][PERSONAL_STATE]["3.weight"], before["3.weight"])


def test_a_coordinator_cannot_overwrite_a_personal_head(digits: tuple[Dataset, Dataset]) -> None:
    model = PartialModel(TorchModel(FACTORY), personal=("3.*",))
    task = learning_tasks(model)[TRAIN]
    full = TorchModel(FACTORY).get_weights()  # shared and personal names
    payload = {f"w/{k}": np.zeros_like(v) for k, v in full.items()}
    state: dict[str, Any] = {}
    with pytest.raises(ConfigError, match="unexpected"):
        task(_ctx("a", digits[0], state), payload)
    assert PERSONAL_STATE not in state


def test_fedper_personalizes_better_than_one_global_model_on_skewed_nodes(
    digits: tuple[Dataset, Dataset],
) -> None:
    """Each node holds 2 classes; its own head learns which. Judged on the nodes' own data."""
    train, _ = digits
    nodes = partition(train, nodes=6, scheme="shards", shards_per_node=2, seed=0)
    algorithm = FedAvg(rounds=4, nodes_per_round=6, local_epochs=2)
    common = {"nodes": nodes, "algorithm": algorithm, "holdout": 0.3, "federated_eval_every": 4}
    personal = simulate(model=PartialModel(TorchModel(FACTORY), personal=("3.*",)), **common)
    shared = simulate(model=TorchModel(FACTORY), **common)
    assert personal.metrics["federated_accuracy"] > shared.metrics["federated_accuracy"] + 0.05


def test_dp_sgd_trains_and_noises_only_what_is_not_frozen(digits: tuple[Dataset, Dataset]) -> None:
    from shoal.privacy.guard import LocalDP

    model = PartialModel(TorchModel(FACTORY), shared=("3.*",))
    inner = model.model
    assert isinstance(inner, TorchModel)
    before = inner.get_weights()
    dp = LocalDP(clip=1.0, noise_multiplier=1.0, sample_rate=0.1, steps=3)
    model.fit(digits[0], config=FitConfig(dp=dp), rng=np.random.default_rng(0))
    after = inner.get_weights()
    np.testing.assert_array_equal(after["1.weight"], before["1.weight"])
    assert not np.array_equal(after["3.weight"], before["3.weight"])
    rep = PartialModel(TorchModel(FACTORY), personal=("3.*",), mode="fedrep")
    with pytest.raises(ConfigError, match="fedrep' does not combine with DP-SGD"):
        rep.fit(digits[0], config=FitConfig(dp=dp), rng=np.random.default_rng(0))


def test_a_node_keeps_adam_state_for_what_it_trains(digits: tuple[Dataset, Dataset]) -> None:
    model = PartialModel(TorchModel(FACTORY, optimizer="adam"), shared=("3.*",))
    model.fit(digits[0], config=FitConfig(max_steps=3), rng=np.random.default_rng(0))
    state = model.optimizer_state()
    assert sorted(k.split("/")[1] for k in state if k.startswith("exp_avg/")) == [
        "3.bias",
        "3.weight",
    ]
    model.load_optimizer_state(state)  # resumed by the next fit without complaint
    model.fit(digits[0], config=FitConfig(max_steps=1), rng=np.random.default_rng(1))


def test_a_transfer_spec_builds_lora_on_a_frozen_pretrained_model(
    tmp_path: Path, backbone: dict[str, np.ndarray]
) -> None:
    from safetensors.numpy import save_file

    from shoal.learn.transfer import TransferSpec, apply_transfer

    save_file({k: v.astype(np.float32) for k, v in backbone.items()}, str(tmp_path / "b.st"))
    spec = TransferSpec.from_mapping(
        {"pretrained": "b.st", "lora_rank": 2, "lora_targets": ["3"], "freeze": ["1.*"]},
        base_dir=tmp_path,
    )
    model = apply_transfer(TorchModel(FACTORY), spec)
    assert isinstance(model, PartialModel)
    assert model.shared_names == ("3.lora_a", "3.lora_b")
    assert sorted(model.frozen_names) == ["1.bias", "1.weight", "3.base.bias", "3.base.weight"]
    assert spec.to_dict()["pretrained"] == "b.st"  # the card gets a name, not a path
