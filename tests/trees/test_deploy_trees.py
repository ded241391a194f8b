"""Tree jobs deployed: `shoal coordinator` and `shoal node` processes on 127.0.0.1 over
mutual TLS train the same model as the simulation of the same job file."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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
                "--model-out",
                str(tmp_path / f"{name}.model.json"),
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
    # each party wrote its part (--model-out); together they score the held-out rows (the
    # aligned order is the sorted shared ids) as the run's guest did
    assert summary["saved_by"] == parties
    _predict_from_party_files(load_vertical_job(job, insecure_test_keys=True), tmp_path, summary)


def _predict_from_party_files(job: Any, folder: Path, summary: dict) -> None:
    from wire_link import Wire

    from shoal.trees.secureboost import digest, load_party
    from shoal.trees.vertical import HostParty, load_guest, predict_vertical
    from shoal.vertical.model import held_out_rows

    tables = [load_party(job, p) for p in job.parties]
    shared = sorted(set.intersection(*(set(t.ids) for t in tables)))
    held = held_out_rows(len(shared), seed=job.config.seed, test_fraction=job.config.test_fraction)
    x = []
    for t in tables:
        where = {i: k for k, i in enumerate(t.ids)}
        x.append(t.x[[where[i] for i in shared]][held])
    guest = load_guest(folder / f"{job.parties[0].name}.model.json")
    hosts = [Wire(HostParty.load(folder / f"{p.name}.model.json")) for p in job.parties[1:]]
    scores = predict_vertical(guest, x[0], hosts, x_hosts=x[1:])
    assert bytes(digest(scores)).hex() == summary["digest"]


class Proc:
    """A `shoal` child process whose output lines are read by a thread (to act on them)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli.main", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )  # fmt: skip
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, pattern: str, timeout: float = TIMEOUT) -> str:
        regex, deadline = re.compile(pattern), time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if regex.search(line):
                return line
        raise AssertionError(f"no line matching {pattern!r}: {self.output()}")

    def wait_stderr(self, pattern: str, timeout: float = TIMEOUT) -> None:
        """Until a line of the child's stderr (its log file: warnings go there) matches."""
        regex, deadline = re.compile(pattern, re.MULTILINE), time.monotonic() + timeout
        while not regex.search(Path(self.log.name).read_text()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no stderr line matching {pattern!r}: {self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return "\n".join(self.seen[-30:]) + "\n--- stderr ---\n" + Path(self.log.name).read_text()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
        self.popen.wait(timeout=30)
        self.log.close()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def _cluster(tmp_path: Path, text: str, nodes: int) -> tuple[Proc, list[Proc]]:
    """A coordinator and ``nodes`` nodes of the job ``text`` (each node its partition)."""
    names = [f"n{i}" for i in range(nodes)]
    make_certs(tmp_path / "certs", nodes=names)
    with Store(tmp_path / "fl.db") as store:
        for name in names:
            _, _, key = write_key_pair(tmp_path / f"{name}.key")
            store.add_node(node_id=name, public_key=public_key_bytes(key))
    job = tmp_path / "job.toml"
    job.write_text(text)
    port = _port()
    coordinator = Proc(
        ["coordinator", "--job", str(job), "--listen", f"127.0.0.1:{port}",
         "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
         "--wait-nodes", str(nodes), "--wait-timeout", str(TIMEOUT),
         "--json", str(tmp_path / "summary.json")],
        tmp_path / "coordinator.log",
    )  # fmt: skip
    node = ["node", "--coordinator", f"127.0.0.1:{port}", "--certs", str(tmp_path / "certs"),
            "--job", str(job), "--max-idle", str(TIMEOUT)]  # fmt: skip
    workers = [
        Proc(
            [*node, "--key", str(tmp_path / f"n{i}.key"), "--partition", f"{i}/{nodes}"],
            tmp_path / f"n{i}.log",
        )
        for i in range(nodes)
    ]
    return coordinator, workers


def _finish(tmp_path: Path, coordinator: Proc, workers: list[Proc]) -> dict:
    try:
        coordinator.wait_line(r"^run finished")
        code = coordinator.popen.wait(timeout=60)
    finally:
        for proc in [coordinator, *workers]:
            proc.stop()
    assert code == 0, coordinator.output()
    summary: dict = json.loads((tmp_path / "summary.json").read_text())
    return summary


def test_deployed_gbdt_drops_a_frozen_node_as_the_secure_sum_does(tmp_path: Path) -> None:
    """Node n4 freezes after tree 2: its secure sum goes on without it (its deadline passes),
    the server grows that tree again from the four nodes left (down to min_nodes), and
    training finishes; the restart is in the summary. (Five nodes: SecAgg+ refuses to
    promise a dropout among three, so four survivors are the fewest that can go on.)"""
    text = (
        GBDT.format(nodes=5)
        .replace("n_trees = 3", "n_trees = 5")
        .replace("min_nodes = 5", "min_nodes = 4\ndeadline_s = 8")
    )
    coordinator, workers = _cluster(tmp_path, text, nodes=5)
    try:
        coordinator.wait_line(r"^tree 2/5")
        workers[4].popen.send_signal(signal.SIGSTOP)
        coordinator.wait_line(r"^tree 3/5")  # grown without it
        workers[4].popen.kill()
    except BaseException:
        for proc in [coordinator, *workers]:
            proc.stop()
        raise
    summary = _finish(tmp_path, coordinator, workers)
    restarts = summary["restarts"]
    assert len(restarts) == 1 and restarts[0]["nodes"] == 4, restarts
    assert 2 <= restarts[0]["round"] <= 3  # the tree under way when it froze
    assert summary["trees"] == 5 and summary["federated_auc"] > 0.9
    # trees before the drop used n4's rows, so the model is not the pooled one of anybody
    assert not summary["identical_predictions"]


def test_deployed_secureboost_rolls_back_a_tree_a_party_missed(tmp_path: Path) -> None:
    """Host n2 freezes during tree 2 for longer than the deadline: the tree fails, every
    party rolls back to the last complete tree (the roll-back waits for n2 to come back)
    and the tree is grown again; the trees are those of an uninterrupted run."""
    pytest.importorskip("shoal.crypto.paillier")
    text = (
        VERTICAL.format(nodes=3, hosts=2)
        .replace("n_trees = 2", "n_trees = 4")
        .replace("min_nodes = 3", "min_nodes = 3\ndeadline_s = 6")
    )
    coordinator, workers = _cluster(tmp_path, text, nodes=3)
    try:
        coordinator.wait_line(r"^tree 1/4")
        workers[2].popen.send_signal(signal.SIGSTOP)
        # the tree under way fails at its deadline, and so does the first roll-back; n2
        # comes back while the coordinator tries the roll-back again
        coordinator.wait_stderr(r"^tree \d+ failed .*rolling back")
        coordinator.wait_stderr(r"^roll-back failed at \['n2'\]; trying again")
        workers[2].popen.send_signal(signal.SIGCONT)
    except BaseException:
        for proc in [coordinator, *workers]:
            proc.stop()
        raise
    summary = _finish(tmp_path, coordinator, workers)
    assert summary["retries"] >= 1 and summary["trees"] == 4
    # the guest's digest of its predictions equals centralized training's on the same cuts
    assert summary["identical_predictions"], summary
    assert summary["federated_auc"] == summary["centralized_auc"]


def test_deployed_secureboost_resumes_after_a_host_process_is_killed(tmp_path: Path) -> None:
    """The insurer's `shoal node` is killed (SIGKILL) during tree 2 and started again with
    the same --state file: every party aligns and sets up again, restores the complete
    round from its state (the insurer its split table, the bank its trees and margins), and
    the run ends with the predictions of the uninterrupted simulation of the same job."""
    pytest.importorskip("shoal.crypto.paillier")
    from shoal.trees.secureboost import simulate
    from shoal.vertical.job import load_vertical_job

    parties = ["bank", "insurer"]
    for name in parties:
        (tmp_path / f"{name}.csv").write_bytes((EXAMPLE / f"{name}.csv").read_bytes())
    job = tmp_path / "vertical.toml"
    job.write_text(SECUREBOOST_TOML.replace("n_trees = 2", "n_trees = 4"))
    make_certs(tmp_path / "certs", nodes=parties)
    with Store(tmp_path / "fl.db") as store:
        for name in parties:
            _, _, key = write_key_pair(tmp_path / f"{name}.key")
            store.add_node(node_id=name, public_key=public_key_bytes(key))
    port = _port()
    coordinator = Proc(
        ["coordinator", "--job", str(job), "--listen", f"127.0.0.1:{port}",
         "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
         "--wait-timeout", str(TIMEOUT), "--json", str(tmp_path / "out.json"),
         "--insecure-test-keys"],
        tmp_path / "coordinator.log",
    )  # fmt: skip

    def node(name: str, log: str) -> Proc:
        return Proc(
            ["node", "--coordinator", f"127.0.0.1:{port}", "--certs", str(tmp_path / "certs"),
             "--key", str(tmp_path / f"{name}.key"), "--job", str(job),
             "--state", str(tmp_path / f"{name}.db"), "--max-idle", str(TIMEOUT),
             "--backoff", "0.2", "--backoff-max", "1", "--insecure-test-keys",
             "--model-out", str(tmp_path / f"{name}.model.json")],
            tmp_path / log,
        )  # fmt: skip

    procs = [coordinator, node("bank", "bank.log"), node("insurer", "insurer.log")]
    try:
        coordinator.wait_line(r"^tree 1/4")
        procs[2].popen.kill()  # SIGKILL: no cleanup, no goodbye
        procs[2].popen.wait(timeout=30)
        procs.append(node("insurer", "insurer2.log"))
        coordinator.wait_line(r"^tree 4/4")
        code = coordinator.popen.wait(timeout=120)
    finally:
        for proc in procs:
            proc.stop()
    assert code == 0, coordinator.output()
    summary = json.loads((tmp_path / "out.json").read_text())
    # tree 2 failed and the run went on from the one complete round the parties had saved
    assert summary["retries"] >= 1 and summary["resumed_from"] == [1], summary
    sim = simulate(load_vertical_job(job, insecure_test_keys=True))
    assert summary["digest"] == sim["digest"] and sim["identical_predictions"]
    assert summary["auc"] == sim["centralized_auc"]
    # each party wrote its part (--model-out); together they score the held-out rows (the
    # aligned order is the sorted shared ids) as the run's guest did
    assert summary["saved_by"] == parties
    _predict_from_party_files(load_vertical_job(job, insecure_test_keys=True), tmp_path, summary)
