"""Cross-device simulation on LocalEngine: availability traces, device speeds and links on the
virtual clock, nodes that go offline mid-task, and what an idle registered node costs."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import ConfigError, DataError
from shoal.runtime import (
    Devices,
    Diurnal,
    FailureKind,
    LocalEngine,
    NodeApp,
    RandomAvailability,
    Task,
    TaskContext,
    TraceAvailability,
    VirtualClock,
)
from shoal.wire import encode

IDS = [f"n{i}" for i in range(4)]


def make_app() -> NodeApp:
    app = NodeApp()

    @app.task("ping")
    def ping(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"ok": 1}

    @app.task("echo")
    def echo(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"x": payload["x"]}

    return app


def tasks(nodes: list[str], name: str = "ping", payload: Any = None) -> list[Task]:
    payload = encode({}) if payload is None else payload
    return [Task(node_id=n, name=name, payload=payload, task_id=f"t/{n}") for n in nodes]


# -- traces ---------------------------------------------------------------------------------


def test_trace_csv_with_header_ids_and_indices(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text("node,online_from,online_to\nn0,0,10\n1,5,15\n\nn0,10,20\nn0,30,40\n")
    trace = TraceAvailability.from_csv(path, node_ids=IDS)
    assert trace.intervals(0) == [(0.0, 20.0), (30.0, 40.0)]  # touching rows merge
    assert trace.intervals(1) == [(5.0, 15.0)]
    assert trace.intervals(2) == []  # no row: never online
    assert trace.online(12.0, 4).tolist() == [True, True, False, False]
    assert trace.online(25.0, 4).tolist() == [False, False, False, False]
    assert trace.online_until(0, 3.0, 4) == 20.0
    assert trace.online_until(0, 25.0, 4) == 25.0  # offline: its own time
    with pytest.raises(ConfigError, match="describes 4 nodes"):
        trace.online(0.0, 5)


BAD_ROWS = [
    ("n0,1", "expected 3 fields"),
    ("n0,1,2,3", "expected 3 fields"),
    ("n9,0,1", "unknown node 'n9'"),
    ("n0,abc,5", "online_from must be a number"),
    ("n0,0,five", "online_to must be a number"),
    ("n0,nan,5", "must be finite"),
    ("n0,0,inf", "must be finite"),
    ("n0,-1,5", "must be >= 0"),
    ("n0,5,5", "must be after online_from"),
    ("n0,7,5", "must be after online_from"),
]


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS)
def test_trace_bad_row_names_its_line(tmp_path: Path, row: str, problem: str) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(f"node,online_from,online_to\nn1,0,10\n{row}\nn2,0,5\n")
    with pytest.raises(DataError, match=f"trace.csv line 3: .*{problem}"):
        TraceAvailability.from_csv(path, node_ids=IDS)


def test_trace_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read availability trace"):
        TraceAvailability.from_csv(tmp_path / "missing.csv", node_ids=IDS)
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="cannot read availability trace"):
        TraceAvailability.from_csv(binary, node_ids=IDS)


intervals = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.integers(0, 1000),
        st.integers(1, 200),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(rows=intervals, probes=st.lists(st.floats(0, 1300), min_size=1, max_size=8))
def test_trace_agrees_with_its_rows(rows: list[tuple[int, int, int]], probes: list[float]) -> None:
    """Online at t exactly when some row covers t; online_until is the end of the union."""
    lines = [f"n{i},{start},{start + length}" for i, start, length in rows]
    trace = TraceAvailability.parse(lines, node_ids=IDS)
    for t in probes:
        mask = trace.online(t, 4)
        for i in range(4):
            covered = [(a, a + n) for j, a, n in rows if j == i and a <= t < a + n]
            assert bool(mask[i]) == bool(covered)
            until = trace.online_until(i, t, 4)
            if covered:
                assert until > t and not trace.online(until, 4)[i]
                assert trace.online(math.nextafter(until, 0.0), 4)[i]
            else:
                assert until == t


@settings(max_examples=40, deadline=None)
@given(
    good=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), max_size=6),
    bad=st.sampled_from([row for row, _ in BAD_ROWS]),
    at=st.integers(0, 6),
)
def test_trace_reports_the_first_bad_line(good: list[tuple[int, int]], bad: str, at: int) -> None:
    lines = [f"n{i},{a},{a + 1}" for i, a in good]
    at = min(at, len(lines))
    lines.insert(at, bad)
    with pytest.raises(DataError, match=f"trace line {at + 1}:"):
        TraceAvailability.parse(lines, node_ids=IDS)


# -- diurnal and random availability --------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    model=st.sampled_from(
        [
            Diurnal(online_hours=8, seed=1),
            Diurnal(online_hours=20, spread_hours=0, seed=2),
            RandomAvailability(online_fraction=0.6, slot_s=60, seed=3),
        ]
    ),
    t=st.floats(0, 5 * 86_400),
)
def test_online_until_matches_the_mask(model: Any, t: float) -> None:
    mask = model.online(t, 50)
    for i in range(50):
        until = model.online_until(i, t, 50)
        assert (until > t) == bool(mask[i])
        if mask[i] and math.isfinite(until):
            assert not model.online(until, 50)[i]


def test_diurnal_nodes_are_online_their_hours_a_day() -> None:
    model = Diurnal(online_hours=6, spread_hours=3, seed=0)
    hours = np.arange(0, 86_400, 600.0)
    share = np.mean([model.online(t, 200) for t in hours], axis=0)
    assert np.allclose(share, 6 / 24, atol=600 / 86_400 + 1e-9)
    online = [int(model.online(t, 200).sum()) for t in (0.0, 12 * 3600.0)]
    assert online[0] > 3 * online[1]  # a day and a night, not a constant fraction
    with pytest.raises(ConfigError, match="online_hours"):
        Diurnal(online_hours=25)


def test_random_availability_is_deterministic_and_near_its_fraction() -> None:
    model = RandomAvailability(online_fraction=0.3, slot_s=100, seed=5)
    a, b = model.online(250.0, 5000), model.online(299.0, 5000)
    assert np.array_equal(a, b)  # the same slot
    assert abs(a.mean() - 0.3) < 0.03
    assert not np.array_equal(a, model.online(300.0, 5000))
    with pytest.raises(ConfigError, match="online_fraction"):
        RandomAvailability(online_fraction=1.5)


# -- devices and the virtual clock -----------------------------------------------------------


def test_a_megabyte_on_a_megabit_link_takes_eight_virtual_seconds() -> None:
    devices = Devices(down_mbps=1.0, up_mbps=np.array([1.0, 2.0, 1.0, 1.0]), compute_s={"echo": 2})
    engine = LocalEngine(make_app(), nodes=IDS, devices=devices)
    payload = encode({"x": np.zeros(125_000)})  # 1 MB of float64
    result = engine.dispatch(tasks(IDS[:2], "echo", payload), deadline_s=1000)
    n0, n1 = result.replies["n0"], result.replies["n1"]
    down = len(payload) * 8 / 1e6
    assert n0.elapsed_s == pytest.approx(down + 2 + len(n0.payload) * 8 / 1e6)
    assert n1.elapsed_s == pytest.approx(down + 2 + len(n1.payload) * 8 / 2e6)
    assert n0.elapsed_s > 17  # about 8 s down, 2 s compute, 8 s up
    assert engine.clock.now == pytest.approx(max(n0.elapsed_s, n1.elapsed_s))
    engine.dispatch(tasks(IDS[:2], "echo", payload), deadline_s=1000)
    assert engine.clock.now == pytest.approx(2 * max(n0.elapsed_s, n1.elapsed_s))


def test_slow_devices_time_out_and_the_clock_waits_for_the_deadline() -> None:
    devices = Devices(speed=np.array([1.0, 0.1, 1.0, 1.0]), compute_s={"ping": 1.0})
    engine = LocalEngine(make_app(), nodes=IDS, devices=devices, clock=VirtualClock(100.0))
    out = engine.dispatch(tasks(IDS[:2]), deadline_s=5)
    assert out.replies["n0"].elapsed_s == pytest.approx(1.0)
    assert out.failures["n1"].kind is FailureKind.TIMEOUT  # 10 s > 5 s
    assert engine.clock.now == pytest.approx(105.0)
    sampled = Devices.sample(1000, stragglers=0.3, slowdown=10, seed=1)
    assert isinstance(sampled.speed, np.ndarray)
    assert abs(float(np.mean(sampled.speed < 1)) - 0.3) < 0.05
    with pytest.raises(ConfigError, match="describe 1000 nodes"):
        LocalEngine(make_app(), nodes=IDS, devices=sampled)
    with pytest.raises(ConfigError, match="positive"):
        Devices(down_mbps=0)
    with pytest.raises(ConfigError, match="compute_s"):
        Devices(compute_s={"ping": -1})


def test_offline_nodes_are_not_offered_and_drop_if_asked() -> None:
    trace = TraceAvailability.parse(["n0,0,100", "n1,50,100", "n2,0,5"], node_ids=IDS)
    engine = LocalEngine(make_app(), nodes=IDS, availability=trace)
    assert list(engine.node_ids()) == ["n0", "n2"]
    out = engine.dispatch(tasks(["n0", "n1"]), deadline_s=10)
    assert "n0" in out.replies
    assert out.failures["n1"].kind is FailureKind.DROPPED
    assert "offline at t=0" in out.failures["n1"].detail
    engine.clock.set(60.0)
    assert list(engine.node_ids()) == ["n0", "n1"]


def test_a_node_that_goes_offline_mid_task_drops_out() -> None:
    trace = TraceAvailability.parse(["n0,0,100", "n1,0,5", "n2,0,20"], node_ids=IDS)
    devices = Devices(compute_s={"ping": 8.0})
    engine = LocalEngine(make_app(), nodes=IDS, availability=trace, devices=devices)
    out = engine.dispatch(tasks(["n0", "n1", "n2"]), deadline_s=60)
    assert set(out.replies) == {"n0", "n2"}
    assert out.failures["n1"].kind is FailureKind.DROPPED
    assert "went offline 5 s into the task" in out.failures["n1"].detail
    assert engine.clock.now == pytest.approx(8.0)
    engine.clock.set(15.0)  # n2 is online until 20: an 8 s task no longer fits
    out = engine.dispatch(tasks(["n0", "n2"]), deadline_s=60)
    assert set(out.replies) == {"n0"} and out.failures["n2"].kind is FailureKind.DROPPED


def test_an_idle_registered_node_costs_well_under_5_kb() -> None:
    """Registration, availability and device profiles for 20,000 nodes; no task run."""
    nodes = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        engine = LocalEngine(
            make_app(),
            nodes=nodes,
            data=lambda node_id: np.zeros(1000),
            availability=Diurnal(seed=0),
            devices=Devices.sample(nodes, stragglers=0.3, down_mbps=1.0, up_mbps=1.0),
        )
        online = engine.node_ids()  # builds the availability phases and the mask
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert 0 < len(online) < nodes
    per_node = (after - before) / nodes
    assert per_node < 5 * 1024, per_node
