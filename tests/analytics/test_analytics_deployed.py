"""Deployed queries: a coordinator (`shoal query --listen`) and `shoal node --db` processes
(DuckDB, SQLite, Parquet and CSV files) on 127.0.0.1 over mutual TLS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import Federated, make_rows

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deploy(
    tmp_path: Path,
    parties: Sequence[tuple[str, str, Sequence[str]]],
    job: str,
    sqls: Sequence[str],
) -> tuple[int, str, str, Any]:
    """Run the coordinator with ``sqls`` and one `shoal node --db PATH ARGS` per (name,
    path, args); return its exit code, stdout, stderr and the JSON it wrote."""
    from shoal.runtime import Store
    from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair

    names = [name for name, _, _ in parties]
    store = Store(tmp_path / "registry.db")
    for name in names:
        _, _, key = write_key_pair(tmp_path / f"{name}.key")
        store.add_node(node_id=name, public_key=public_key_bytes(key))
    store.close()
    make_certs(tmp_path / "certs", nodes=names)
    (tmp_path / "job.toml").write_text(job)
    port = _free_port()
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    cli = [sys.executable, "-m", "shoal.cli.main"]
    out = tmp_path / "out.json"
    coordinator = subprocess.Popen(
        [
            *cli,
            "query",
            "--job",
            str(tmp_path / "job.toml"),
            "--listen",
            f"127.0.0.1:{port}",
            "--certs",
            str(tmp_path / "certs"),
            "--store",
            str(tmp_path / "registry.db"),
            "--wait-nodes",
            str(len(parties)),
            "--wait-timeout",
            "120",
            "--json",
            str(out),
            *[a for sql in sqls for a in ("--sql", sql)],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    nodes = [
        subprocess.Popen(
            [
                *cli,
                "node",
                "--db",
                path,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--key",
                str(tmp_path / f"{name}.key"),
                "--certs",
                str(tmp_path / "certs"),
                "--max-idle",
                "120",
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        for name, path, args in parties
    ]
    try:
        stdout, stderr = coordinator.communicate(timeout=240)
        for node in nodes:
            node.wait(timeout=60)
    finally:
        for proc in (coordinator, *nodes):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return coordinator.returncode, stdout, stderr, json.loads(out.read_text())


def test_deployed_query_matches_pooled_duckdb(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    fs = Federated(
        tmp_path,
        [make_rows(rng, n, 1000 * i) for i, n in enumerate((60, 80, 70))],
        ["duckdb", "sqlite", "parquet"],
    )
    job = (
        '[analytics]\ntable = "visits"\nbounds = { age = [0, 120], cost = [0, 20000] }\n'
        'categories = { ward = ["A", "B", "C", "D"] }\n'
    )
    sqls = [
        "SELECT ward, COUNT(*) AS n, AVG(age) AS a FROM visits GROUP BY ward ORDER BY ward",
        "SELECT SUM(cost) AS s FROM visits",
    ]
    code, _, stderr, results = _deploy(
        tmp_path, [(p.name, p.path, ()) for p in fs.parties], job, sqls
    )
    assert code == 0, stderr
    first, second = results
    assert first["mode"] == "exact" and sorted(first["parties"]) == [p.name for p in fs.parties]
    want = fs.duck(sqls[0])
    assert [r[0] for r in first["rows"]] == [w[0] for w in want]
    for got, exp in zip(first["rows"], want):
        assert got[1] == exp[1] and got[2] == pytest.approx(exp[2], rel=1e-9)
    assert second["rows"][0][0] == pytest.approx(fs.duck(sqls[1])[0][0], rel=1e-9)


def test_deployed_dp_queries_with_a_party_lacking_a_column_and_one_out_of_budget(
    tmp_path: Path,
) -> None:
    import duckdb

    rng = np.random.default_rng(12)
    fs = Federated(
        tmp_path,
        [make_rows(rng, 80, 1000 * i) for i in range(4)],
        ["csv", "parquet", "duckdb", "sqlite"],
    )
    odd = tmp_path / "odd.duckdb"
    con = duckdb.connect(str(odd))
    con.execute("CREATE TABLE visits (patient_id INTEGER, ward VARCHAR)")
    con.execute("INSERT INTO visits VALUES (1, 'A'), (2, 'B')")
    con.close()
    north, south, east, west = (p.name for p in fs.parties)
    parties = [
        # its owner's budget has room for one query at epsilon 1, kept in a state file
        (north, fs.parties[0].path, ["--max-epsilon", "1.5", "--state", str(tmp_path / "n.db")]),
        (south, fs.parties[1].path, []),
        (east, fs.parties[2].path, ["--require-dp"]),  # lets its share only into a full sum
        (west, fs.parties[3].path, []),
        ("odd", str(odd), []),  # has no age column
    ]
    job = (
        '[analytics]\ntable = "visits"\nprivacy_unit = "patient_id"\nmax_contributions = 3\n'
        'bounds = { age = [0, 120] }\ncategories = { ward = ["A", "B", "C", "D"] }\n'
        "[privacy]\nepsilon = 1.0\n[engine]\nmin_nodes = 4\n"
    )
    sqls = [
        "SELECT ward, COUNT(*) AS n, AVG(age) AS a FROM visits GROUP BY ward ORDER BY ward",
        "SELECT COUNT(*) AS n FROM visits",
        "SELECT AVG(age) AS a FROM visits",
    ]
    code, stdout, stderr, (first, second, third) = _deploy(tmp_path, parties, job, sqls)
    assert code == 2  # one query failed; the others were answered
    # 1: odd cannot answer (no age), and says so; the four others split the noise.
    assert first["mode"] == "distributed" and first["epsilon"] == 1.0
    assert sorted(first["parties"]) == sorted([north, south, east, west])
    assert set(first["failures"]) == {"odd"} and '"age" not found' in first["failures"]["odd"]
    assert not first["notes"]  # no noise share was missing: the coordinator added none
    assert [r[0] for r in first["rows"]] == ["A", "B", "C", "D"]
    assert len(first["error"]) == 4 and all(e[0] is None and e[1] > 0 for e in first["error"])
    # 2: north's owner declines (budget spent); odd can count rows.
    assert set(second["failures"]) == {north} and "declined" in second["failures"][north]
    assert sorted(second["parties"]) == sorted([south, east, west, "odd"])
    # 3: both north and odd are out: 3 parties left, fewer than min_nodes 4; the analyst is
    # told which parties did not answer and why, and the coordinator still answered 1 and 2.
    assert third["sql"] == sqls[2] and "fewer than min_nodes (4" in third["failed"]
    assert f"{north}: declined" in third["failed"] and "odd:" in third["failed"]
    assert "query 3" in stderr and "failed" in stderr
    assert stdout.count("distributed DP, epsilon 1") == 2
