"""A deployed query: a coordinator and three `shoal node --db` processes (DuckDB, SQLite and
Parquet files) on 127.0.0.1 over mutual TLS."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import Federated, make_rows

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_deployed_query_matches_pooled_duckdb(tmp_path: Path) -> None:
    from shoal.runtime import Store
    from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair

    rng = np.random.default_rng(11)
    fs = Federated(
        tmp_path,
        [make_rows(rng, n, 1000 * i) for i, n in enumerate((60, 80, 70))],
        ["duckdb", "sqlite", "parquet"],
    )
    names = [p.name for p in fs.parties]
    store = Store(tmp_path / "registry.db")
    for name in names:
        _, _, key = write_key_pair(tmp_path / f"{name}.key")
        store.add_node(node_id=name, public_key=public_key_bytes(key))
    store.close()
    make_certs(tmp_path / "certs", nodes=names)
    job = tmp_path / "analytics.toml"
    job.write_text(
        '[analytics]\ntable = "visits"\nbounds = { age = [0, 120], cost = [0, 20000] }\n'
        'categories = { ward = ["A", "B", "C", "D"] }\n'
    )
    port = _free_port()
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    cli = [sys.executable, "-m", "shoal.cli.main"]
    out = tmp_path / "out.json"
    sqls = [
        "SELECT ward, COUNT(*) AS n, AVG(age) AS a FROM visits GROUP BY ward ORDER BY ward",
        "SELECT SUM(cost) AS s FROM visits",
    ]
    coordinator = subprocess.Popen(
        [
            *cli,
            "query",
            "--job",
            str(job),
            "--listen",
            f"127.0.0.1:{port}",
            "--certs",
            str(tmp_path / "certs"),
            "--store",
            str(tmp_path / "registry.db"),
            "--wait-nodes",
            "3",
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
                p.path,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--key",
                str(tmp_path / f"{p.name}.key"),
                "--certs",
                str(tmp_path / "certs"),
                "--max-idle",
                "120",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        for p in fs.parties
    ]
    try:
        _, stderr = coordinator.communicate(timeout=240)
        assert coordinator.returncode == 0, stderr
        for node in nodes:
            node.wait(timeout=60)
    finally:
        for proc in (coordinator, *nodes):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = json.loads(out.read_text())
    first, second = results
    assert first["mode"] == "exact" and sorted(first["parties"]) == names
    want = fs.duck(sqls[0])
    assert [r[0] for r in first["rows"]] == [w[0] for w in want]
    for got, exp in zip(first["rows"], want):
        assert got[1] == exp[1] and got[2] == pytest.approx(exp[2], rel=1e-9)
    assert second["rows"][0][0] == pytest.approx(fs.duck(sqls[1])[0][0], rel=1e-9)
