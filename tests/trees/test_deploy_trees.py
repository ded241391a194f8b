"""Tree jobs deployed: `shoal coordinator` and `shoal node` processes on 127.0.0.1 over
mutual TLS train the same model as the simulation of the same job file."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.cli.job import load_job
from shoal.cli.trees import run_tree_job
from shoal.runtime import Store
from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair

pytestmark = pytest.mark.integration
TIMEOUT = 300

GBDT = """
[job]
name = "deployed-gbdt"

[data]
dataset = "breast_cancer"
partition = {{ scheme = "dirichlet", alpha = 0.5, nodes = {nodes} }}

[model]
name = "gbdt"
n_trees = 3
max_depth = 3

[engine]
min_nodes = {nodes}
"""

VERTICAL = """
[job]
name = "deployed-secureboost"

[data]
dataset = "breast_cancer"

[model]
name = "secureboost"
guest_features = 10
hosts = {hosts}
n_trees = 2
max_depth = 3
max_bins = 16
key_bits = 512
insecure_test_keys = true

[engine]
min_nodes = {nodes}
"""


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _deploy(tmp_path: Path, text: str, nodes: int) -> dict:
    names = [f"n{i}" for i in range(nodes)]
    make_certs(tmp_path / "certs", nodes=names)
    with Store(tmp_path / "fl.db") as store:
        for name in names:
            _, _, key = write_key_pair(tmp_path / f"{name}.key")
            store.add_node(node_id=name, public_key=public_key_bytes(key))
    job = tmp_path / "job.toml"
    job.write_text(text.format(nodes=nodes, hosts=nodes - 1))
    port = _port()
    shoal = [sys.executable, "-m", "shoal.cli.main"]
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(nodes + 1)]  # noqa: SIM115
    coordinator = subprocess.Popen(
        [*shoal, "coordinator", "--job", str(job), "--listen", f"127.0.0.1:{port}",
         "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
         "--wait-nodes", str(nodes), "--wait-timeout", str(TIMEOUT),
         "--json", str(tmp_path / "summary.json")],
        stdout=logs[0], stderr=subprocess.STDOUT,
    )  # fmt: skip
    node = [*shoal, "node", "--coordinator", f"127.0.0.1:{port}", "--certs",
            str(tmp_path / "certs"), "--job", str(job), "--max-idle", str(TIMEOUT)]  # fmt: skip
    workers = [
        subprocess.Popen(
            [*node, "--key", str(tmp_path / f"n{i}.key"), "--partition", f"{i}/{nodes}"],
            stdout=logs[i + 1],
            stderr=subprocess.STDOUT,
        )
        for i in range(nodes)
    ]
    try:
        code = coordinator.wait(timeout=TIMEOUT)
        for w in workers:
            w.wait(timeout=60)
    finally:
        for proc in [coordinator, *workers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"p{i}.log").read_text() for i in range(nodes + 1))
    assert code == 0, output
    summary: dict = json.loads((tmp_path / "summary.json").read_text())
    summary["simulated"] = run_tree_job(load_job(job))
    return summary


def test_deployed_gbdt_equals_the_simulation_and_centralized(tmp_path: Path) -> None:
    summary = _deploy(tmp_path, GBDT, nodes=4)
    assert summary["identical_predictions"] and summary["nodes"] == 4
    assert summary["federated_auc"] == summary["simulated"]["federated_auc"]
    assert summary["federated_auc"] == summary["centralized_auc"]


def test_deployed_secureboost_equals_the_simulation_and_centralized(tmp_path: Path) -> None:
    pytest.importorskip("shoal.crypto.paillier")
    summary = _deploy(tmp_path, VERTICAL, nodes=3)  # the guest and two hosts
    assert summary["identical_predictions"] and summary["nodes"] == 3
    assert summary["federated_auc"] == summary["simulated"]["federated_auc"]
    assert summary["federated_auc"] == summary["centralized_auc"]
