"""Tests for the coordinator's SQLite Store: round trips, atomic rounds, resume, corruption."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.errors import StoreError
from shoal.runtime.store import SCHEMA_VERSION, Store


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "shoal.db"


@pytest.fixture
def store(path: Path) -> Any:
    with Store(path) as s:
        yield s


def _canon(value: Any) -> str:
    # NaN != NaN, so compare through the JSON text, which also keeps -0.0 and int/float apart.
    return json.dumps(value, sort_keys=True, allow_nan=True)


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


# -- runs --------------------------------------------------------------------------------------


def test_run_round_trip_and_lifecycle(store: Store) -> None:
    config = {"lr": 0.1, "rounds": 3, "nested": {"ok": [1, 2.5, None, True, "x"]}}
    run_id = store.create_run(name="digits", config=config)
    run = store.get_run(run_id)
    assert (run.id, run.name, run.status, run.config, run.summary) == (
        run_id,
        "digits",
        "running",
        config,
        None,
    )
    assert run.ended_at is None

    done = store.finish_run(run_id, status="finished", summary={"accuracy": 0.93})
    assert done.status == "finished"
    assert done.summary == {"accuracy": 0.93}
    assert done.ended_at is not None and done.ended_at >= done.created_at
    assert store.get_run(run_id) == done
    with pytest.raises(StoreError, match="already ended"):
        store.finish_run(run_id, status="failed", summary={})
    with pytest.raises(StoreError, match="finished"):
        store.resume_run(run_id)
    with pytest.raises(StoreError, match="not one of"):
        store.finish_run(store.create_run(name="b", config={}), status="running", summary={})


def test_list_runs_newest_first_with_limit_and_status(store: Store) -> None:
    ids = [store.create_run(name=f"r{i}", config={"i": i}) for i in range(5)]
    store.finish_run(ids[1], status="failed", summary={"why": "diverged"})
    assert [r.id for r in store.list_runs()] == ids[::-1]
    assert [r.id for r in store.list_runs(limit=2)] == ids[:2:-1][:2]
    assert [r.id for r in store.list_runs(status="failed")] == [ids[1]]
    with pytest.raises(StoreError, match="positive integer"):
        store.list_runs(limit=0)
    with pytest.raises(StoreError, match="not one of"):
        store.list_runs(status="paused")


def test_run_ids_are_unique_and_time_prefixed(store: Store) -> None:
    ids = [store.create_run(name="x", config={}) for _ in range(50)]
    assert len(set(ids)) == 50
    prefixes = [i.rsplit("-", 1)[0] for i in ids]
    assert prefixes == sorted(prefixes)
    assert all(len(i) <= 26 for i in ids)


def test_unknown_run_is_a_clear_error(store: Store) -> None:
    for call in (
        lambda: store.get_run("nope"),
        lambda: store.last_completed_round("nope"),
        lambda: store.load_checkpoint("nope"),
        lambda: store.round_metrics("nope"),
        lambda: store.record_round("nope", 0, metrics={}, participants=[]),
        lambda: store.audit(actor="a", action="b", run_id="nope"),
    ):
        with pytest.raises(StoreError, match="no run 'nope'"):
            call()


def test_config_must_be_json(store: Store) -> None:
    with pytest.raises(StoreError, match=r"config\['bad'\].*set"):
        store.create_run(name="x", config={"bad": {1, 2}})
    with pytest.raises(StoreError, match="must be a dict"):
        store.create_run(name="x", config=[1, 2])  # type: ignore[arg-type]
    assert store.list_runs() == []


# -- rounds ------------------------------------------------------------------------------------


def test_record_round_round_trip(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    weights: dict[str, np.ndarray] = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.zeros(4),
    }
    record = store.record_round(
        run_id,
        1,
        metrics={"loss": 0.25, "accuracy": np.float32(0.5), "per_class": [0.1, 0.9], "n": 7},
        participants={"a": "ok", "b": "ok", "c": "timeout", "d": "error"},
        details={"c": "missed the deadline", "d": "TaskError: boom"},
        node_metrics={"a": {"loss": 0.2}, "b": {"loss": 0.3, "n": np.int64(10)}},
        checkpoint=weights,
        state={"step": 40, "ledger": {"epsilon": 1.5, "delta": 1e-5}},
        started_at=123.0,
    )
    assert record.metrics == {"loss": 0.25, "accuracy": 0.5, "per_class": [0.1, 0.9], "n": 7}
    assert record.participants == {"ok": 2, "timeout": 1, "error": 1}
    assert record.has_checkpoint

    (stored,) = store.round_metrics(run_id)
    assert stored == record
    assert stored.started_at == 123.0
    assert type(stored.metrics["n"]) is int

    people = store.participation(run_id, 1)
    assert [(p.node_id, p.status, p.detail) for p in people] == [
        ("a", "ok", ""),
        ("b", "ok", ""),
        ("c", "timeout", "missed the deadline"),
        ("d", "error", "TaskError: boom"),
    ]
    assert store.node_metrics(run_id, 1) == {"a": {"loss": 0.2}, "b": {"loss": 0.3, "n": 10}}
    assert store.metric_series(run_id, "loss") == [(1, 0.25)]

    ckpt = store.load_checkpoint(run_id)
    assert ckpt.round == 1 and ckpt.run_id == run_id
    assert ckpt.state == {"step": 40, "ledger": {"epsilon": 1.5, "delta": 1e-5}}
    assert ckpt.arrays.keys() == weights.keys()
    for name, array in weights.items():
        np.testing.assert_array_equal(ckpt.arrays[name], array)
        assert ckpt.arrays[name].dtype == array.dtype


def test_participant_list_means_all_ok(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    record = store.record_round(run_id, 0, metrics={}, participants=["n2", "n1"])
    assert record.participants == {"ok": 2}
    assert [p.node_id for p in store.participation(run_id, 0)] == ["n1", "n2"]
    with pytest.raises(StoreError, match="listed twice"):
        store.record_round(run_id, 1, metrics={}, participants=["n1", "n1"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"participants": {"a": "gone"}}, "not one of"),
        ({"participants": "abc"}, "list of node ids"),
        ({"participants": ["a"], "details": {"b": "x"}}, "not among"),
        ({"participants": ["a"], "node_metrics": {"b": {"x": 1}}}, "not among"),
        ({"participants": ["a"], "details": {"a": 3}}, "must be a string"),
        ({"participants": [], "metrics": {"": 1.0}}, "must not be empty"),
        ({"participants": [], "metrics": {"x": object()}}, r"metrics\['x'\].*object"),
        ({"participants": [], "status": "skipped"}, "not one of"),
        ({"participants": [], "status": "failed", "state": {"a": 1}}, "completed round"),
        ({"participants": [], "checkpoint": {"w": np.array([None])}}, "pickle"),
        ({"participants": [], "checkpoint": {"w": "text"}}, "NumPy array"),
        ({"participants": [], "checkpoint": [np.zeros(2)]}, "dict of name"),
    ],
)
def test_record_round_rejects_bad_input(store: Store, kwargs: dict[str, Any], message: str) -> None:
    run_id = store.create_run(name="r", config={})
    kwargs.setdefault("metrics", {})
    with pytest.raises(StoreError, match=message):
        store.record_round(run_id, 1, **kwargs)
    assert store.round_metrics(run_id) == []


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1", None])
def test_round_numbers_are_non_negative_ints(store: Store, bad: Any) -> None:
    run_id = store.create_run(name="r", config={})
    with pytest.raises(StoreError, match="round number"):
        store.record_round(run_id, bad, metrics={}, participants=[])
    store.record_round(run_id, np.int64(0), metrics={}, participants=[])
    assert store.last_completed_round(run_id) == 0


def test_long_details_are_truncated(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    store.record_round(run_id, 1, metrics={}, participants=["a"], details={"a": "x" * 100_000})
    (p,) = store.participation(run_id, 1)
    assert len(p.detail) == 4000 and p.detail.endswith("…")


def test_rerecording_a_round_needs_replace(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    store.record_round(
        run_id,
        1,
        metrics={"loss": 1.0, "old": 1},
        participants={"a": "ok", "b": "dropped"},
        node_metrics={"a": {"x": 1}},
        checkpoint={"w": np.ones(2)},
    )
    with pytest.raises(StoreError, match=r"already recorded.*replace=True"):
        store.record_round(run_id, 1, metrics={"loss": 0.5}, participants=["a"])
    assert store.round_metrics(run_id)[0].metrics == {"loss": 1.0, "old": 1}

    store.record_round(run_id, 1, metrics={"loss": 0.5}, participants=["c"], replace=True)
    (record,) = store.round_metrics(run_id)
    assert record.metrics == {"loss": 0.5}
    assert record.participants == {"ok": 1}
    assert not record.has_checkpoint
    assert [p.node_id for p in store.participation(run_id, 1)] == ["c"]
    assert store.node_metrics(run_id, 1) == {}
    with pytest.raises(StoreError, match="no checkpoint"):
        store.load_checkpoint(run_id)


def test_unknown_round_is_a_clear_error(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    with pytest.raises(StoreError, match="no recorded round 3"):
        store.participation(run_id, 3)
    with pytest.raises(StoreError, match="no recorded round 3"):
        store.node_metrics(run_id, 3)


def test_non_finite_metrics_round_trip(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    metrics = {"loss": math.nan, "epsilon": math.inf, "low": -math.inf, "z": -0.0}
    store.record_round(run_id, 1, metrics=metrics, participants=[], state={"eps": math.inf})
    got = store.round_metrics(run_id)[0].metrics
    assert math.isnan(got["loss"])
    assert got["epsilon"] == math.inf and got["low"] == -math.inf
    assert math.copysign(1.0, got["z"]) == -1.0
    assert store.load_checkpoint(run_id).state == {"eps": math.inf}


def test_numpy_scalars_become_python_values(store: Store) -> None:
    run_id = store.create_run(name="r", config={"k": np.int32(3), "flag": np.bool_(True)})
    assert store.get_run(run_id).config == {"k": 3, "flag": True}
    metrics = {"a": np.float16(0.5), "b": np.uint64(2**63), "c": np.array(2.5), "d": (1, 2)}
    store.record_round(run_id, 1, metrics=metrics, participants=[])
    got = store.round_metrics(run_id)[0].metrics
    assert got == {"a": 0.5, "b": 2**63, "c": 2.5, "d": [1, 2]}
    assert type(got["b"]) is int and type(got["a"]) is float


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"bytes", r"\['m'\].*bytes"),
        (1 + 2j, r"\['m'\].*complex"),
        (np.zeros(3), r"\['m'\].*shape \(3,\).*tolist"),
        ({1: "x"}, r"\['m'\].*key 1"),
        ({"deep": [1, {"x": {2, 3}}]}, r"\['m'\]\['deep'\]\[1\]\['x'\].*set"),
    ],
)
def test_non_json_metric_names_its_key(store: Store, value: Any, message: str) -> None:
    run_id = store.create_run(name="r", config={})
    with pytest.raises(StoreError, match=message):
        store.record_round(run_id, 1, metrics={"m": value}, participants=[])


def test_cyclic_value_is_refused(store: Store) -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(StoreError, match="nested more than"):
        store.create_run(name="r", config={"c": cycle})


# -- checkpoints -------------------------------------------------------------------------------


def _exotic_arrays() -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    return {
        "f16": gen.standard_normal(5).astype(np.float16),
        "f32": gen.standard_normal((2, 3)).astype(np.float32),
        "f64": np.array([np.nan, np.inf, -0.0, 1e-308, 5e-324]),
        "i8": np.array([-128, 127], dtype=np.int8),
        "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "i64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
        "bool": np.array([True, False, True]),
        "c128": np.array([1 + 2j, -3.5j]),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        "strided": np.arange(20, dtype=np.int16)[::3],
        "scalar": np.array(7, dtype=np.int32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "text": np.array(["ab", "αβγ"]),
        "record": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
        # Names np.savez would mistake for its own keyword arguments.
        "file": np.ones(1),
        "allow_pickle": np.ones(2),
        "layer/0.weight": np.eye(2, dtype=np.float32),
    }


def test_checkpoint_arrays_preserved_exactly(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    arrays = _exotic_arrays()
    store.record_round(run_id, 1, metrics={}, participants=[], checkpoint=arrays)
    got = store.load_checkpoint(run_id, 1).arrays
    assert list(got) == list(arrays)
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name
    assert got["fortran"].flags.f_contiguous
    assert got["f32"].flags.writeable


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes()),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)
def test_any_plain_array_round_trips(array: np.ndarray) -> None:
    with Store(":memory:") as store:
        run_id = store.create_run(name="r", config={})
        store.record_round(run_id, 0, metrics={}, participants=[], checkpoint={"a": array})
        got = store.load_checkpoint(run_id).arrays["a"]
    assert got.dtype == array.dtype and got.shape == array.shape
    assert got.tobytes() == array.tobytes()


def test_state_only_and_latest_checkpoint(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    with pytest.raises(StoreError, match="has no checkpoint yet"):
        store.load_checkpoint(run_id)
    store.record_round(run_id, 0, metrics={}, participants=[], state={"step": 0})
    store.record_round(run_id, 1, metrics={}, participants=[], checkpoint={"w": np.ones(2)})
    store.record_round(run_id, 2, metrics={"loss": 1.0}, participants=[])  # no checkpoint

    first = store.load_checkpoint(run_id, 0)
    assert first.arrays == {} and first.state == {"step": 0}
    latest = store.load_checkpoint(run_id)
    assert latest.round == 1 and latest.state == {}
    np.testing.assert_array_equal(latest.arrays["w"], np.ones(2))
    with pytest.raises(StoreError, match="no checkpoint for round 2"):
        store.load_checkpoint(run_id, 2)
    assert [r.has_checkpoint for r in store.round_metrics(run_id)] == [True, True, False]


def test_prune_checkpoints_keeps_newest(store: Store) -> None:
    run_id = store.create_run(name="r", config={})
    for r in range(5):
        store.record_round(
            run_id, r, metrics={"r": r}, participants=[], checkpoint={"w": np.full(2, r)}
        )
    assert store.prune_checkpoints(run_id, keep=2) == 3
    assert [r.has_checkpoint for r in store.round_metrics(run_id)] == [False] * 3 + [True] * 2
    assert store.load_checkpoint(run_id).round == 4
    with pytest.raises(StoreError, match="pruned"):
        store.load_checkpoint(run_id, 1)
    assert len(store.round_metrics(run_id)) == 5


def _replace_blob(path: Path, blob: bytes, *, digest: str | None = None) -> None:
    with _raw(path) as conn:
        conn.execute(
            "UPDATE checkpoints SET arrays=?, sha256=?",
            (blob, digest if digest is not None else hashlib.sha256(blob).hexdigest()),
        )
    conn.close()


def _store_with_checkpoint(path: Path) -> str:
    with Store(path) as store:
        run_id = store.create_run(name="r", config={})
        store.record_round(run_id, 1, metrics={}, participants=[], checkpoint={"w": np.ones(3)})
    return run_id


def test_object_arrays_are_never_unpickled(path: Path) -> None:
    run_id = _store_with_checkpoint(path)
    buf = io.BytesIO()
    # np.savez pickles object arrays by default: exactly what a hostile blob would contain.
    np.savez(buf, w=np.array([{"payload": 1}, None], dtype=object))
    _replace_blob(path, buf.getvalue())
    with Store(path) as store, pytest.raises(StoreError, match="cannot be decoded safely"):
        store.load_checkpoint(run_id)


def test_tampered_checkpoint_fails_checksum(path: Path) -> None:
    run_id = _store_with_checkpoint(path)
    buf = io.BytesIO()
    np.savez(buf, w=np.zeros(3))
    _replace_blob(path, buf.getvalue(), digest="0" * 64)
    with Store(path) as store, pytest.raises(StoreError, match="checksum"):
        store.load_checkpoint(run_id)


@pytest.mark.parametrize("kind", ["npy", "garbage", "non_npy_member"])
def test_malformed_checkpoint_blob(path: Path, kind: str) -> None:
    run_id = _store_with_checkpoint(path)
    buf = io.BytesIO()
    if kind == "npy":
        np.save(buf, np.ones(3))
    elif kind == "garbage":
        buf.write(b"PK\x03\x04 definitely not a zip archive")
    else:
        with zipfile.ZipFile(buf, "w") as archive:
            archive.writestr("w.txt", b"raw bytes")
    _replace_blob(path, buf.getvalue())
    with Store(path) as store, pytest.raises(StoreError):
        store.load_checkpoint(run_id)


# -- resume and crash safety -------------------------------------------------------------------


def test_resume_semantics(path: Path) -> None:
    with Store(path) as store:
        run_id = store.create_run(name="r", config={})
        assert store.last_completed_round(run_id) is None
        for r in range(1, 4):
            store.record_round(
                run_id, r, metrics={"r": r}, participants=["a"], checkpoint={"w": np.full(2, r)}
            )
        store.record_round(run_id, 4, metrics={}, participants={"a": "dropped"}, status="failed")
        other = store.create_run(name="done", config={})
        store.finish_run(other, status="finished", summary={})
    # A new coordinator starts: whatever was running is now interrupted.
    with Store(path) as store:
        assert store.mark_interrupted() == [run_id]
        assert store.get_run(run_id).status == "interrupted"
        assert store.get_run(other).status == "finished"
        assert store.last_completed_round(run_id) == 3
        assert store.load_checkpoint(run_id).round == 3
        with pytest.raises(StoreError, match="resume_run"):
            store.record_round(run_id, 4, metrics={}, participants=[], replace=True)
        assert store.resume_run(run_id).status == "running"
        with pytest.raises(StoreError, match="already running"):
            store.resume_run(run_id)
        store.record_round(run_id, 4, metrics={"r": 4}, participants=["a"], replace=True)
        assert store.last_completed_round(run_id) == 4
        assert store.metric_series(run_id, "r") == [(1, 1), (2, 2), (3, 3), (4, 4)]
        assert store.mark_interrupted(run_id) == [run_id]
        assert store.mark_interrupted(run_id) == []


def test_exception_mid_transaction_leaves_no_partial_round(
    store: Store, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = store.create_run(name="r", config={})
    store.record_round(
        run_id, 1, metrics={"a": 1}, participants=["x"], checkpoint={"w": np.ones(1)}
    )

    seen: list[int] = []

    def explode(self: Store, conn: sqlite3.Connection, *args: Any) -> None:
        # Prove the rest of the round really was written inside the transaction.
        seen.append(conn.execute("SELECT COUNT(*) FROM metrics WHERE round=2").fetchone()[0])
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Store, "_write_checkpoint", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.record_round(
            run_id,
            2,
            metrics={"a": 2, "b": 3},
            participants=["x", "y"],
            node_metrics={"x": {"n": 1}},
            checkpoint={"w": np.zeros(1)},
        )
    assert seen == [2]
    monkeypatch.undo()

    assert store.last_completed_round(run_id) == 1
    assert [r.round for r in store.round_metrics(run_id)] == [1]
    assert store.load_checkpoint(run_id).round == 1
    with _raw(path) as raw:
        for table in ("rounds", "metrics", "participants", "node_metrics", "checkpoints"):
            count = raw.execute(f"SELECT COUNT(*) FROM {table} WHERE round=2").fetchone()[0]
            assert count == 0, table
    raw.close()
    # The store is still usable, and round 2 can now be written for real.
    store.record_round(
        run_id, 2, metrics={"a": 2}, participants=["x"], checkpoint={"w": np.ones(1)}
    )
    assert store.last_completed_round(run_id) == 2


_CRASHING_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from shoal.runtime.store import Store

    store = Store(sys.argv[1])
    run_id = store.create_run(name="crash", config={})
    store.record_round(run_id, 1, metrics={"loss": 1.0}, participants=["a"],
                       checkpoint={"w": np.arange(4.0)}, state={"step": 1})

    def die(self, conn, *args):
        partial = conn.execute("SELECT COUNT(*) FROM participants WHERE round=2").fetchone()[0]
        print(run_id, partial, flush=True)
        os._exit(17)  # no rollback, no close, no atexit: as if the process were killed

    Store._write_checkpoint = die
    store.record_round(run_id, 2, metrics={"loss": 0.5}, participants=["a", "b"],
                       checkpoint={"w": np.zeros(4)}, state={"step": 2})
    print("unreachable", flush=True)
    """
)


def test_killed_process_leaves_committed_rounds_and_no_partial_one(path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _CRASHING_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 17, child.stderr
    run_id, partial = child.stdout.split()
    assert partial == "2"  # round 2 was half-written when the process died

    with Store(path) as store:
        assert store.get_run(run_id).status == "running"
        assert store.mark_interrupted() == [run_id]
        assert store.last_completed_round(run_id) == 1
        assert [r.round for r in store.round_metrics(run_id)] == [1]
        ckpt = store.load_checkpoint(run_id)
        assert ckpt.round == 1 and ckpt.state == {"step": 1}
        np.testing.assert_array_equal(ckpt.arrays["w"], np.arange(4.0))
        store.verify()


# -- opening files -----------------------------------------------------------------------------


def test_file_store_uses_wal_and_persists(path: Path) -> None:
    with Store(path) as store:
        run_id = store.create_run(name="r", config={"a": 1})
    with _raw(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    raw.close()
    with Store(str(path)) as store:
        assert store.get_run(run_id).config == {"a": 1}


def test_not_a_database_file_is_refused_untouched(path: Path) -> None:
    content = b"name,value\n" + b"alice,1\n" * 500
    path.write_bytes(content)
    with pytest.raises(StoreError, match="corrupt or not an SQLite file"):
        Store(path)
    assert path.read_bytes() == content


def test_corrupt_header_is_refused(path: Path) -> None:
    _store_with_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[100:4096] = os.urandom(3996)  # the schema page, after the 100-byte file header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        store = Store(path)
        store.list_runs()


def test_corrupt_pages_surface_as_store_errors(path: Path) -> None:
    with Store(path) as store:
        run_id = store.create_run(name="r", config={})
        for r in range(3):
            store.record_round(
                run_id,
                r,
                metrics={f"m{i}": float(i) for i in range(50)},
                participants=[f"node{i}" for i in range(50)],
                checkpoint={"w": np.arange(20_000.0)},
            )
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[4096:] = bytes(b ^ 0x5A for b in data[4096:])  # every page but the first
    path.write_bytes(bytes(data))
    # Whichever call trips first, it must be a StoreError, never a raw sqlite3 exception.
    with pytest.raises(StoreError):
        store = Store(path)
        try:
            store.verify()
            store.round_metrics(run_id)
            store.load_checkpoint(run_id)
        finally:
            store.close()


def test_other_sqlite_database_is_refused(path: Path) -> None:
    with _raw(path) as raw:
        raw.execute("CREATE TABLE customers (id INTEGER)")
    raw.close()
    with pytest.raises(StoreError, match="not a shoal store"):
        Store(path)


def test_newer_schema_version_asks_for_upgrade(path: Path) -> None:
    Store(path).close()
    with _raw(path) as raw:
        raw.execute("UPDATE meta SET value=? WHERE key='schema_version'", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(StoreError, match="upgrade shoal"):
        Store(path)


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "missing" / "shoal.db")
    with pytest.raises(StoreError, match="is a directory"):
        Store(tmp_path)


def test_closed_store_refuses_calls(path: Path) -> None:
    store = Store(path)
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_runs()


# -- node registry and audit -------------------------------------------------------------------


def test_node_registry(store: Store) -> None:
    added = store.add_node(node_id="hospital3", public_key=b"\x01" * 32, label="St. Mary")
    assert (added.node_id, added.public_key, added.label, added.revoked) == (
        "hospital3",
        b"\x01" * 32,
        "St. Mary",
        False,
    )
    store.add_node(node_id="bank1", public_key=bytearray(b"\x02" * 32))
    assert store.get_node("hospital3") == added
    assert [n.node_id for n in store.list_nodes()] == ["bank1", "hospital3"]

    with pytest.raises(StoreError, match="already registered"):
        store.add_node(node_id="bank1", public_key=b"\x03" * 32)
    with pytest.raises(StoreError, match="already registered to node 'bank1'"):
        store.add_node(node_id="bank2", public_key=b"\x02" * 32)
    with pytest.raises(StoreError, match="must be bytes"):
        store.add_node(node_id="x", public_key="abc")  # type: ignore[arg-type]

    revoked = store.revoke_node("bank1")
    assert revoked.revoked and revoked.revoked_at is not None
    assert store.revoke_node("bank1") == revoked  # idempotent, keeps the first timestamp
    assert [n.node_id for n in store.list_nodes(include_revoked=False)] == ["hospital3"]
    with pytest.raises(StoreError, match="revoked; ids are never reused"):
        store.add_node(node_id="bank1", public_key=b"\x04" * 32)
    with pytest.raises(StoreError, match="no node 'ghost'"):
        store.get_node("ghost")
    with pytest.raises(StoreError, match="no node 'ghost'"):
        store.revoke_node("ghost")


def test_audit_log(store: Store, path: Path) -> None:
    run_id = store.create_run(name="r", config={})
    first = store.audit(actor="admin", action="add_node", detail={"node": "h3"})
    for i in range(5):
        store.audit(actor="coordinator", action="round", detail={"round": i}, run_id=run_id)
    entries = store.audit_log()
    assert entries[0] == first
    assert [e.seq for e in entries] == sorted(e.seq for e in entries)
    run_entries = store.audit_log(run_id, limit=3)
    assert [e.detail["round"] for e in run_entries] == [2, 3, 4]
    assert all(e.run_id == run_id and e.actor == "coordinator" for e in run_entries)
    with pytest.raises(StoreError, match="detail"):
        store.audit(actor="a", action="b", detail={"x": object()})

    with _raw(path) as raw:
        for sql in ("UPDATE audit SET actor='mallory'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                raw.execute(sql)
    raw.close()
    assert len(store.audit_log()) == 6


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_writers_from_threads(path: Path) -> None:
    shared = Store(path)
    second = Store(path)  # a second connection to the same file contends through SQLite locks
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)
    run_ids: list[str] = []

    def worker(store: Store, k: int) -> None:
        try:
            run_id = store.create_run(name=f"w{k}", config={"k": k})
            run_ids.append(run_id)
            barrier.wait()
            for r in range(8):
                store.record_round(
                    run_id,
                    r,
                    metrics={"k": k, "r": r},
                    participants={f"n{k}": "ok"},
                    checkpoint={"w": np.full(64, k * 100 + r)},
                )
                store.audit(actor=f"w{k}", action="round", detail={"r": r}, run_id=run_id)
                assert store.last_completed_round(run_id) == r
        except BaseException as exc:  # reported below, from the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(shared if k < 4 else second, k)) for k in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with shared, second:
        assert len(shared.list_runs()) == 6
        for run_id in run_ids:
            k = shared.get_run(run_id).config["k"]
            assert shared.metric_series(run_id, "r") == [(r, r) for r in range(8)]
            np.testing.assert_array_equal(
                second.load_checkpoint(run_id).arrays["w"], np.full(64, k * 100 + 7)
            )
            assert len(shared.audit_log(run_id)) == 8
        shared.verify()


# -- properties --------------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_names = st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metrics=st.dictionaries(_names, _json, max_size=8), state=st.dictionaries(_names, _json))
def test_arbitrary_metric_dicts_round_trip(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    with Store(":memory:") as store:
        run_id = store.create_run(name="prop", config=state)
        store.record_round(
            run_id,
            3,
            metrics=metrics,
            participants=["a"],
            node_metrics={"a": metrics},
            state=state,
        )
        (record,) = store.round_metrics(run_id)
        assert _canon(record.metrics) == _canon(metrics)
        assert list(record.metrics) == list(metrics)
        assert _canon(store.node_metrics(run_id, 3).get("a", {})) == _canon(metrics)
        assert _canon(store.load_checkpoint(run_id).state) == _canon(state)
        assert _canon(store.get_run(run_id).config) == _canon(state)


class _InterruptAfterBegin:
    """A store connection whose BEGIN runs and is then interrupted (Ctrl-C between statements)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)

    def execute(self, sql: str, *args: object) -> object:
        out = self.conn.execute(sql, *args)
        if sql.startswith("BEGIN"):
            raise KeyboardInterrupt
        return out


def test_an_interrupt_right_after_begin_leaves_no_transaction_open(tmp_path: Path) -> None:
    # Ctrl-C landing just after BEGIN left the transaction open, and the run's next write,
    # marking it interrupted, failed with "cannot start a transaction within a transaction"
    # (test_ctrl_c_prints_the_run_id_and_how_to_resume under load)
    store = Store(tmp_path / "s.db")
    real = store._conn
    assert real is not None
    store._conn = _InterruptAfterBegin(real)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        store.create_run(name="r", config={})
    store._conn = real
    assert not real.in_transaction
    run_id = store.create_run(name="r", config={})
    assert store.get_run(run_id).name == "r"


def test_a_transaction_left_open_is_rolled_back_before_the_next(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    assert store._conn is not None
    store._conn.execute("BEGIN")
    store._conn.execute("INSERT INTO meta (key, value) VALUES ('stray', 'x')")
    run_id = store.create_run(name="r", config={})
    assert store.get_run(run_id).name == "r"
    assert store._conn.execute("SELECT count(*) FROM meta WHERE key='stray'").fetchone()[0] == 0
