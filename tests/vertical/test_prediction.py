"""Private prediction: encrypted features in, encrypted scores out; the owner never sees
the features, the client never sees the weights; a query budget and output noise make
extraction of the weights by repeated queries measurably costly. Also over gRPC with TLS."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from shoal.core import Federation
from shoal.errors import ProtocolError
from shoal.runtime import LocalEngine, NodeApp, Store
from shoal.runtime.grpc import (
    Backoff,
    ClientTLS,
    GrpcEngine,
    NodeClient,
    ServerTLS,
    make_certs,
    public_key_bytes,
    write_key_pair,
)
from shoal.vertical.prediction import PREDICT_TASK, PredictionClient, ServedModel, serving_tasks
from shoal.vertical.tasks import spec

W = np.array([0.5, -1.25, 2.0, 0.0, 3.5])
B = -0.75


def _owner(model: ServedModel, seen: list | None = None) -> NodeApp:
    app = NodeApp()
    tasks = serving_tasks(model)
    if seen is not None:
        inner = tasks[PREDICT_TASK]

        def spy(ctx, payload):
            seen.append(dict(payload))
            return inner(ctx, payload)

        app.install({PREDICT_TASK: spec(spy, {"scores.*": "clear"})})
    else:
        app.install(tasks)
    return app


def _client(model: ServedModel, seen: list | None = None) -> tuple[PredictionClient, list]:
    engine = LocalEngine(_owner(model, seen), nodes=["owner"])
    client = PredictionClient(Federation(engine), owner="owner", key_bits=512, insecure=True)
    return client, seen if seen is not None else []


def _model(**kw) -> ServedModel:
    return ServedModel(weights=W, bias=B, min_key_bits=512, **kw)


def test_scores_are_right_and_nothing_else_crosses() -> None:
    seen: list = []
    client, _ = _client(_model(), seen)
    x = np.random.default_rng(0).normal(size=(7, 5))
    np.testing.assert_allclose(client.predict(x), x @ W + B, atol=1e-6)
    # the owner saw only the client's public key and ciphertexts: no float array
    arrays = [v for p in seen for v in p.values() if isinstance(v, np.ndarray)]
    assert arrays and all(a.dtype == np.uint8 for a in arrays)
    assert not any(
        np.isin(np.round(x, 6), np.round(np.asarray(a, float), 6)).any()
        for a in arrays
        if a.size < 10
    )


def test_budget_and_small_keys_refused() -> None:
    client, _ = _client(_model(budget_rows=10))
    client.predict(np.ones((6, 5)))
    with pytest.raises(ProtocolError, match="declined"):
        client.predict(np.ones((6, 5)))  # 12 > 10: refused, nothing scored
    client.predict(np.ones((4, 5)))  # exactly the rest of the budget
    strict = ServedModel(weights=W, bias=B)  # the default: 2048-bit keys at least
    engine = LocalEngine(_owner(strict), nodes=["owner"])
    weak = PredictionClient(Federation(engine), owner="owner", key_bits=512, insecure=True)
    with pytest.raises(ProtocolError, match=r"too short|refused"):
        weak.predict(np.ones((1, 5)))


def _extract(client: PredictionClient, d: int, repeats: int) -> np.ndarray:
    """The textbook attack: score e_1..e_d and 0 repeatedly, solve for (w, b)."""
    x = np.vstack([np.eye(d), np.zeros((1, d))])
    x = np.tile(x, (repeats, 1))
    y = client.predict(x)
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return coef[:d]


def test_extraction_costs_more_with_noise_and_is_capped_by_the_budget() -> None:
    exact, _ = _client(_model())
    assert np.max(np.abs(_extract(exact, 5, 1) - W)) < 1e-6  # d + 1 queries suffice
    noisy, _ = _client(_model(noise_std=1.0))
    errors = [np.max(np.abs(_extract(noisy, 5, 1) - W)) for _ in range(3)]
    assert min(errors) > 1e-3  # the same 6 queries no longer give the weights
    # averaging k repeats shrinks the error like 1/sqrt(k): 16x the queries for 4x precision;
    # a budget of 60 rows stops the attacker at 10 repeats
    capped, _ = _client(_model(noise_std=1.0, budget_rows=60))
    _extract(capped, 5, 10)
    with pytest.raises(ProtocolError, match="declined"):
        _extract(capped, 5, 1)


def test_over_grpc_with_tls(tmp_path: Path) -> None:
    store = Store(tmp_path / "fl.db")
    _, _, key = write_key_pair(tmp_path / "owner.key")
    store.add_node(node_id="owner", public_key=public_key_bytes(key))
    make_certs(tmp_path / "certs", nodes=["owner"])
    engine = GrpcEngine(
        listen="127.0.0.1:0", registry=store, tls=ServerTLS.from_dir(tmp_path / "certs")
    ).start()
    node = NodeClient(
        app=_owner(_model()),
        coordinator=f"127.0.0.1:{engine.port}",
        key=key,
        tls=ClientTLS.from_dir(tmp_path / "certs", name="owner"),
        backoff=Backoff(initial_s=0.05, max_s=0.3),
    )
    thread = threading.Thread(target=node.run, daemon=True)
    thread.start()
    try:
        assert engine.wait_for_nodes(1, timeout_s=30) == 1
        client = PredictionClient(Federation(engine), owner="owner", key_bits=512, insecure=True)
        x = np.random.default_rng(1).normal(size=(3, 5))
        np.testing.assert_allclose(client.predict(x), x @ W + B, atol=1e-6)
    finally:
        node.stop()
        engine.close()
        thread.join(timeout=10)
        store.close()
