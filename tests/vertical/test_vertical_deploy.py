"""A deployed vertical job: `shoal coordinator` and three `shoal node`s (bank, insurer,
arbiter) as real processes on 127.0.0.1 over mutual TLS, each party holding only its own CSV;
the result matches the simulation's centralized reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.runtime import Store
from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"
PARTIES = ["bank", "insurer", "arbiter"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _shoal(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", "shoal.cli.main", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"},
        )


def test_deployed_vertical_job_matches_simulation(tmp_path: Path) -> None:
    job = tmp_path / "vertical.toml"
    text = (EXAMPLE / "vertical.toml").read_text()
    text = text.replace("# arbiter = true ", "arbiter = true ")
    text = text.replace("epochs = 10", "epochs = 2").replace(
        "batch_size = 1024", "batch_size = 512"
    )
    text = text.replace("key_bits = 2048", "key_bits = 512")
    # each party's own copy of its CSV, next to the job file as the job names it
    for name in ("bank", "insurer"):
        (tmp_path / f"{name}.csv").write_bytes((EXAMPLE / f"{name}.csv").read_bytes())
    job.write_text(text)
    make_certs(tmp_path / "certs", nodes=PARTIES)
    with Store(tmp_path / "fl.db") as store:
        for name in PARTIES:
            _, _, key = write_key_pair(tmp_path / f"{name}.key")
            store.add_node(node_id=name, public_key=public_key_bytes(key))
    port = _free_port()
    coordinator = _shoal(
        [
            "coordinator", "--job", str(job), "--listen", f"127.0.0.1:{port}",
            "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
            "--wait-timeout", "120", "--json", str(tmp_path / "out.json"),
            "--insecure-test-keys",
        ],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    nodes = [
        _shoal(
            [
                "node",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--certs",
                str(tmp_path / "certs"),
                "--key",
                str(tmp_path / f"{name}.key"),
                "--job",
                str(job),
                "--max-idle",
                "60",
                "--backoff",
                "0.2",
                "--backoff-max",
                "1",
                "--insecure-test-keys",
            ],
            tmp_path / f"{name}.log",
        )
        for name in PARTIES
    ]
    try:
        code = coordinator.wait(timeout=400)
        log = (tmp_path / "coordinator.log").read_text()
        assert code == 0, log + "".join((tmp_path / f"{n}.log").read_text() for n in PARTIES)
        for proc in nodes:
            assert proc.wait(timeout=90) == 0
    finally:
        for proc in [coordinator, *nodes]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["mode"] == "arbiter" and summary["intersection_size"] == 512
    assert summary["epochs_run"] == 2 and summary["bytes_sent"] > 0
    # the same job simulated in this process: same protocol, same model up to fixed point
    from shoal.vertical.job import load_vertical_job, simulate

    sim = simulate(load_vertical_job(job, insecure_test_keys=True))
    # the aligned order is the sorted shared ids, so both runs train the same model
    assert abs(summary["auc"] - sim["auc"]) <= 1e-9
    assert abs(summary["auc"] - sim["centralized_auc"]) <= 0.002
    assert abs(summary["accuracy"] - sim["centralized_accuracy"]) <= 0.01
    assert summary["auc"] > 0.95
