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


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vertical"
SECUREBOOST_TOML = """
[job]
name = "deployed-bank-insurer-trees"

[vertical]
id_column = "id"
parties = [
  { name = "bank", role = "guest", path = "bank.csv", label = "default" },
  { name = "insurer", role = "host", path = "insurer.csv" },
]

[model]
name = "secureboost"
n_trees = 2
max_depth = 3
max_bins = 16

[crypto]
key_bits = 512
"""


def test_deployed_vertical_toml_secureboost_equals_the_simulation(tmp_path: Path) -> None:
    """`shoal coordinator` and one `shoal node` per party of a vertical.toml, each holding
    only its own CSV: PSI, then the trees, as in the simulation of the same job."""
    pytest.importorskip("shoal.crypto.paillier")
    from shoal.trees.secureboost import simulate
    from shoal.vertical.job import load_vertical_job

    parties = ["bank", "insurer"]
    for name in parties:
        (tmp_path / f"{name}.csv").write_bytes((EXAMPLE / f"{name}.csv").read_bytes())
    job = tmp_path / "vertical.toml"
    job.write_text(SECUREBOOST_TOML)
    make_certs(tmp_path / "certs", nodes=parties)
    with Store(tmp_path / "fl.db") as store:
        for name in parties:
            _, _, key = write_key_pair(tmp_path / f"{name}.key")
            store.add_node(node_id=name, public_key=public_key_bytes(key))
    port = _port()
    shoal = [sys.executable, "-m", "shoal.cli.main"]
    logs = [open(tmp_path / f"v{i}.log", "w") for i in range(3)]  # noqa: SIM115
    coordinator = subprocess.Popen(
        [*shoal, "coordinator", "--job", str(job), "--listen", f"127.0.0.1:{port}",
         "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
         "--wait-timeout", str(TIMEOUT), "--json", str(tmp_path / "out.json"),
         "--insecure-test-keys"],
        stdout=logs[0], stderr=subprocess.STDOUT,
    )  # fmt: skip
    nodes = [
        subprocess.Popen(
            [
                *shoal,
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
                str(TIMEOUT),
                "--insecure-test-keys",
            ],
            stdout=logs[i + 1],
            stderr=subprocess.STDOUT,
        )
        for i, name in enumerate(parties)
    ]
    try:
        code = coordinator.wait(timeout=TIMEOUT)
        for proc in nodes:  # the coordinator tells them the run is over
            assert proc.wait(timeout=60) == 0
    finally:
        for proc in [coordinator, *nodes]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    output = "\n".join((tmp_path / f"v{i}.log").read_text() for i in range(3))
    assert code == 0, output
    summary = json.loads((tmp_path / "out.json").read_text())
    sim = simulate(load_vertical_job(job, insecure_test_keys=True))
    assert summary["model"] == "secureboost" and summary["bytes_sent"] > 0
    # the same aligned order, the same trees: the same predictions as the simulation, which
    # equal centralized training on the joined columns
    assert summary["digest"] == sim["digest"] and sim["identical_predictions"]
    assert summary["auc"] == sim["centralized_auc"]
