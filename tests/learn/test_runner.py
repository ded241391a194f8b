"""The Trainer records every round in the Store and resumes an interrupted run exactly."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.data import load_digits, partition
from shoal.learn import FedAvg, RoundReport, SoftmaxRegression, simulate
from shoal.runtime import Store


class Crash(Exception):
    pass


def test_resume_continues_from_the_last_completed_round(tmp_path) -> None:
    train, test = load_digits(test_fraction=0.2, seed=0)
    nodes = partition(train, nodes=8, scheme="dirichlet", alpha=0.5, seed=0)
    algorithm = FedAvg(rounds=5, nodes_per_round=4, lr=0.3, local_epochs=2)

    def run(store=None, resume=None, on_round=None):
        return simulate(
            model=SoftmaxRegression(features=64, classes=10),
            nodes=nodes,
            algorithm=algorithm,
            test=test,
            seed=7,
            store=store,
            resume=resume,
            on_round=on_round,
        )

    uninterrupted = run()

    def crash_after_three(report: RoundReport) -> None:
        if report.round == 3:
            raise Crash

    with Store(tmp_path / "store.db") as store:
        with pytest.raises(Crash):
            run(store=store, on_round=crash_after_three)
        (record,) = store.list_runs()
        assert record.status == "failed"
        assert store.last_completed_round(record.id) == 3
        resumed = run(store=store, resume=record.id)
        assert resumed.run_id == record.id
        assert [r.round for r in resumed.history] == [1, 2, 3, 4, 5]
        assert store.get_run(record.id).status == "finished"
        assert len(store.round_metrics(record.id)) == 5
    for name, value in uninterrupted.weights.items():
        np.testing.assert_allclose(resumed.weights[name], value, rtol=0, atol=1e-12)


def test_simulate_collects_its_cyclic_garbage_and_unfreezes_the_collector() -> None:
    # simulate() keeps the collector's full passes off objects older than the run: garbage
    # the run makes must still be collected, and nothing may stay frozen afterwards.
    import gc
    import weakref

    train, test = load_digits(test_fraction=0.2, seed=0)
    nodes = partition(train, nodes=4, scheme="iid", seed=0)
    freed: list[weakref.ref] = []

    class Cycle:
        pass

    def make_cycle(report: RoundReport) -> None:
        a, b = Cycle(), Cycle()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        freed.append(weakref.ref(a))
        gc.collect()
        if report.round == 2:
            assert freed[0]() is None  # round 1's cycle, collected during the run
            raise Crash

    with pytest.raises(Crash):
        simulate(
            model=SoftmaxRegression(features=64, classes=10),
            nodes=nodes,
            algorithm=FedAvg(rounds=3, nodes_per_round=4),
            test=test,
            on_round=make_cycle,
        )
    assert gc.get_freeze_count() == 0


def test_simulate_raises_only_the_oldest_threshold_and_restores_it() -> None:
    # Full passes are made rare for the run; the young generations keep their thresholds
    # (the run's cycles are still found), and the caller's thresholds come back afterwards,
    # also when the run fails.
    import gc

    from shoal.learn._gcfreeze import RUN_OLDEST_THRESHOLD

    train, test = load_digits(test_fraction=0.2, seed=0)
    nodes = partition(train, nodes=3, scheme="iid", seed=0)
    seen: list[tuple[int, int, int]] = []

    def look(report: RoundReport) -> None:
        seen.append(gc.get_threshold())
        if report.round == 2:
            raise Crash

    before = gc.get_threshold()
    gc.set_threshold(500, 7, 9)
    try:
        with pytest.raises(Crash):
            simulate(
                model=SoftmaxRegression(features=64, classes=10),
                nodes=nodes,
                algorithm=FedAvg(rounds=3, nodes_per_round=3),
                test=test,
                on_round=look,
            )
        assert seen == [(500, 7, RUN_OLDEST_THRESHOLD)] * 2
        assert gc.get_threshold() == (500, 7, 9)

        def change(report: RoundReport) -> None:  # the caller's own change is kept
            gc.set_threshold(600, 8, 11)

        simulate(
            model=SoftmaxRegression(features=64, classes=10),
            nodes=nodes,
            algorithm=FedAvg(rounds=1, nodes_per_round=3),
            test=test,
            on_round=change,
        )
        assert gc.get_threshold() == (600, 8, 11)
        assert gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*before)
