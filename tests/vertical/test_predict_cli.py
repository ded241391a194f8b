"""`shoal predict serve` (the owner's node) and `shoal predict query` (the client) over
gRPC with mutual TLS; the owner's query budget on disk, across a killed owner process and
under concurrent queries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from shoal.cli.main import main
from shoal.errors import PrivacyBudgetExceeded
from shoal.runtime import Store
from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair
from shoal.vertical.prediction import FileQueryLedger


def test_predict_cli_round_trip(tmp_path: Path) -> None:
    w, b = np.array([1.5, -2.0, 0.25]), 0.5
    np.savez(tmp_path / "model.npz", weights=w, bias=b)
    x = np.random.default_rng(0).normal(size=(4, 3))
    (tmp_path / "rows.csv").write_text(
        "a,b,c\n" + "".join(",".join(repr(float(v)) for v in r) + "\n" for r in x)
    )
    make_certs(tmp_path / "certs", nodes=["owner"])
    with Store(tmp_path / "fl.db") as store:
        _, _, key = write_key_pair(tmp_path / "owner.key")
        store.add_node(node_id="owner", public_key=public_key_bytes(key))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    codes: list[int] = []
    owner = threading.Thread(
        target=lambda: codes.append(
            main(
                [
                    "predict", "serve", "--coordinator", f"127.0.0.1:{port}",
                    "--key", str(tmp_path / "owner.key"), "--certs", str(tmp_path / "certs"),
                    "--model", str(tmp_path / "model.npz"), "--insecure-test-keys",
                    "--max-idle", "5",
                ]
            )
        ),
        daemon=True,
    )  # fmt: skip
    owner.start()
    code = main(
        [
            "predict", "query", "--listen", f"127.0.0.1:{port}",
            "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
            "--owner", "owner", "--rows", str(tmp_path / "rows.csv"),
            "--out", str(tmp_path / "scores.txt"), "--key-bits", "512",
            "--insecure-test-keys",
        ]
    )  # fmt: skip
    assert code == 0
    scores = np.array([float(v) for v in (tmp_path / "scores.txt").read_text().split()])
    np.testing.assert_allclose(scores, x @ w + b, atol=1e-6)
    owner.join(timeout=30)
    assert codes == [0]


def _owner_process(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    with (tmp_path / "owner.log").open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable, "-m", "shoal.cli.main", "predict", "serve",
                "--coordinator", f"127.0.0.1:{port}", "--key", str(tmp_path / "owner.key"),
                "--certs", str(tmp_path / "certs"), "--model", str(tmp_path / "model.npz"),
                "--insecure-test-keys", "--max-idle", "60", *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )  # fmt: skip


@pytest.mark.integration
def test_query_budget_survives_a_killed_owner(tmp_path: Path) -> None:
    """The owner's process is killed (SIGKILL) after answering 6 of its client's 10 rows;
    started again on the same state file it refuses 6 more and answers the last 4."""
    np.savez(tmp_path / "model.npz", weights=np.array([1.0, 2.0, 3.0]), bias=0.0)
    for n in (6, 4):
        (tmp_path / f"rows{n}.csv").write_text("a,b,c\n" + "1,2,3\n" * n)
    make_certs(tmp_path / "certs", nodes=["owner"])
    with Store(tmp_path / "fl.db") as store:
        _, _, key = write_key_pair(tmp_path / "owner.key")
        store.add_node(node_id="owner", public_key=public_key_bytes(key))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def query(rows: int) -> int:
        return main(
            [
                "predict", "query", "--listen", f"127.0.0.1:{port}",
                "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
                "--owner", "owner", "--rows", str(tmp_path / f"rows{rows}.csv"),
                "--out", str(tmp_path / "scores.txt"), "--key-bits", "512",
                "--insecure-test-keys", "--wait-timeout", "60",
            ]
        )  # fmt: skip

    budget = ("--state", str(tmp_path / "owner.db"), "--budget-rows", "10", "--client", "c1")
    owners = []
    try:
        owners.append(_owner_process(tmp_path, port, *budget))
        assert query(6) == 0
        owners[-1].kill()
        owners[-1].wait(timeout=10)
        owners.append(_owner_process(tmp_path, port, *budget))
        assert query(6) != 0  # 12 > 10: declined by the restarted owner
        assert query(4) == 0  # exactly what is left
        assert (tmp_path / "scores.txt").read_text().split() == ["14.0"] * 4
    finally:
        for proc in owners:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert FileQueryLedger(tmp_path / "owner.db").used("c1") == 10


def test_concurrent_charges_never_overspend(tmp_path: Path) -> None:
    """Threads on two connections to one ledger file (as two serving processes would be):
    of 16 one-row queries against a budget of 5, exactly 5 are charged, every trial."""
    for trial in range(5):
        path = tmp_path / f"ledger{trial}.db"
        books = [FileQueryLedger(path), FileQueryLedger(path)]
        barrier = threading.Barrier(16)
        outcomes: list[bool] = []

        def spend(book: FileQueryLedger, barrier: threading.Barrier, outcomes: list) -> None:
            barrier.wait()
            try:
                book.charge("c", 1, limit=5)
                outcomes.append(True)
            except PrivacyBudgetExceeded:
                outcomes.append(False)

        threads = [
            threading.Thread(target=spend, args=(books[i % 2], barrier, outcomes))
            for i in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sum(outcomes) == 5 and len(outcomes) == 16
        assert books[0].used("c") == books[1].used("c") == 5
        for book in books:
            book.close()
