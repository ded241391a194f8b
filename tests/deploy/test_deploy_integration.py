"""Real processes on 127.0.0.1: a `shoal coordinator` and five `shoal node`s over mutual TLS.

A full run matches the simulation of the same job; a node killed mid-round is dropped from
that round and rejoins; a coordinator killed mid-run resumes from the store while the nodes
reconnect by themselves; an unregistered node, replayed and forged messages, a tampered
reply and malformed or oversized frames are refused while the coordinator keeps serving.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from shoal.cli.job import load_job, simulate_job
from shoal.runtime import Store
from shoal.runtime.grpc import ClientTLS, make_certs, public_key_bytes, write_key_pair
from shoal.runtime.grpc.protocol import TO_COORDINATOR_CHUNK, chunk_frame
from shoal.wire import encode

pytestmark = pytest.mark.integration

NODES = 5
TIMEOUT = 150.0


def job_text(rounds: int, per_round: int) -> str:
    return f"""
[job]
name = "deploy-test"
seed = 3

[data]
dataset = "digits"
partition = {{ scheme = "dirichlet", alpha = 0.5, nodes = {NODES} }}

[algorithm]
name = "fedavg"
rounds = {rounds}
nodes_per_round = {per_round}
clamp = {"true" if per_round > NODES else "false"}
local_epochs = 1
lr = 0.5
batch_size = 32

[engine]
min_nodes = 3
deadline_s = 120
"""


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.stderr = open(log, "w")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._new: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def wait_line(self, pattern: str, timeout: float = TIMEOUT) -> str:
        regex = re.compile(pattern)
        for line in self.lines:
            if regex.search(line):
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            if regex.search(line):
                return line
        raise AssertionError(f"no line matching {pattern!r} from {self.args[0]}: {self.output()}")

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.popen.wait(timeout=timeout)

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def output(self) -> str:
        self.stderr.flush()
        err = Path(self.stderr.name).read_text(errors="replace")[-3000:]
        return "\n".join(self.lines[-40:]) + "\n--- stderr ---\n" + err

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)
            self.popen.kill()
        try:
            self.popen.wait(timeout=10)
            self._pump_thread.join(timeout=10)
        finally:
            self.stderr.close()
            if self.popen.stdout is not None:
                self.popen.stdout.close()


@dataclass
class Cluster:
    root: Path
    port: int
    job: Path
    store: Path
    certs: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Proc:
        proc = Proc(list(args), self.root / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc)
        return proc

    def coordinator(self, *extra: str) -> Proc:
        return self.start(
            "coordinator",
            "coordinator",
            "--job", str(self.job),
            "--listen", f"127.0.0.1:{self.port}",
            "--certs", str(self.certs),
            "--store", str(self.store),
            "--wait-nodes", str(NODES),
            "--wait-timeout", str(TIMEOUT),
            "--json", str(self.root / "summary.json"),
            "--heartbeat", "2",
            *extra,
        )  # fmt: skip

    def node(self, index: int, *extra: str, key: str | None = None) -> Proc:
        return self.start(
            f"node{index}",
            "node",
            "--coordinator", f"127.0.0.1:{self.port}",
            "--certs", str(self.certs),
            "--key", str(self.root / (key or f"n{index}.key")),
            "--job", str(self.job),
            "--partition", f"{index}/{NODES}",
            "--max-idle", str(TIMEOUT),
            "--backoff", "0.2",
            "--backoff-max", "1",
            *extra,
        )  # fmt: skip

    def summary(self) -> dict:
        return json.loads((self.root / "summary.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    names = [f"n{i}" for i in range(NODES)]
    make_certs(tmp_path / "certs", nodes=[*names, "rogue"])
    with Store(tmp_path / "fl.db") as store:
        for name in [*names, "rogue"]:
            _, _, key = write_key_pair(tmp_path / f"{name}.key")
            store.add_node(node_id=name, public_key=public_key_bytes(key))
    write_key_pair(tmp_path / "stranger.key")  # never registered
    c = Cluster(
        root=tmp_path,
        port=free_port(),
        job=tmp_path / "job.toml",
        store=tmp_path / "fl.db",
        certs=tmp_path / "certs",
    )
    try:
        yield c
    finally:
        for proc in c.procs:
            proc.stop()


def participation(store_path: Path, run_id: str) -> dict[int, dict[str, str]]:
    with Store(store_path) as store:
        return {
            r.round: {p.node_id: p.status for p in store.participation(run_id, r.round)}
            for r in store.round_metrics(run_id)
        }


def finish(proc: Proc) -> None:
    code = proc.wait()
    assert code == 0, proc.output()


def test_deployment_matches_simulation(cluster: Cluster) -> None:
    cluster.job.write_text(job_text(rounds=4, per_round=3))
    coordinator = cluster.coordinator("--data-port", "0")  # the bulk lane on any free port
    nodes = [cluster.node(i) for i in range(NODES)]
    simulated = simulate_job(load_job(cluster.job))  # meanwhile, in this process
    finish(coordinator)
    for node in nodes:
        finish(node)
        assert "finished" in node.lines[-1]
    deployed = cluster.summary()
    # Same partitions, node ids, sampling, per-node seeds and summation order: bit for bit.
    assert [h["accuracy"] for h in deployed["history"]] == [r.accuracy for r in simulated.history]
    assert [h["train_loss"] for h in deployed["history"]] == [
        r.train_loss for r in simulated.history
    ]
    assert deployed["accuracy"] == simulated.metrics["accuracy"]
    assert deployed["rounds"] == 4 and deployed["nodes"] == NODES
    with Store(cluster.store) as store:
        assert store.get_run(deployed["run_id"]).status == "finished"


def test_node_killed_mid_round_rejoins(cluster: Cluster) -> None:
    cluster.job.write_text(job_text(rounds=10, per_round=NODES))
    coordinator = cluster.coordinator("--round-wait", str(TIMEOUT))
    nodes = [cluster.node(i) for i in range(NODES)]
    coordinator.wait_line(r"^round 2/")
    # Frozen, n2 cannot answer: the next round necessarily waits on it, and killing it then
    # breaks its stream in the middle of that round.
    nodes[2].signal(signal.SIGSTOP)
    time.sleep(1.0)
    nodes[2].signal(signal.SIGKILL)
    nodes[2].wait()
    coordinator.wait_line(r"node\(s\) ok, 1 failed")
    # Restarted with the same key and data, it rejoins; without the bulk lane this time, so
    # its payloads take the gRPC stream while the others' take the lane.
    cluster.node(2, "--no-data-lane")
    finish(coordinator)
    run_id = cluster.summary()["run_id"]
    rounds = participation(cluster.store, run_id)
    assert sorted(rounds) == list(range(1, 11))
    dropped = [r for r, who in rounds.items() if who.get("n2") == "dropped"]
    assert len(dropped) == 1, rounds
    r = dropped[0]
    assert sum(s == "ok" for s in rounds[r].values()) == NODES - 1  # completed without it
    assert any(rounds[later].get("n2") == "ok" for later in range(r + 1, 11))  # rejoined


def test_coordinator_killed_and_resumed(cluster: Cluster) -> None:
    cluster.job.write_text(job_text(rounds=10, per_round=NODES))
    first = cluster.coordinator()
    nodes = [cluster.node(i) for i in range(NODES)]
    first.wait_line(r"^round 2/")
    nodes[1].signal(signal.SIGSTOP)  # hold the run mid-round
    time.sleep(0.5)
    first.signal(signal.SIGKILL)
    first.wait()
    nodes[1].signal(signal.SIGCONT)
    with Store(cluster.store) as store:
        (run,) = store.list_runs()
        assert run.status == "running"  # a killed coordinator could not say otherwise
        before = {r.round: r.metrics for r in store.round_metrics(run.id)}
    done = max(before)
    assert 2 <= done < 10
    second = cluster.coordinator("--resume")
    second.wait_line(rf"resuming run {run.id}")
    finish(second)
    for node in nodes:
        finish(node)  # each reconnected by itself and was told the run finished
    summary = cluster.summary()
    assert summary["run_id"] == run.id and summary["resumed"]
    with Store(cluster.store) as store:
        assert store.get_run(run.id).status == "finished"
        after = {r.round: r.metrics for r in store.round_metrics(run.id)}
    assert sorted(after) == list(range(1, 11))
    assert {r: after[r] for r in before} == before  # nothing recorded was lost or redone
    assert summary["accuracy"] > 0.6


def test_attacks_are_refused_and_the_coordinator_keeps_serving(
    cluster: Cluster, raw_session
) -> None:
    cluster.job.write_text(job_text(rounds=3, per_round=NODES + 1))
    coordinator = cluster.coordinator("--wait-nodes", str(NODES + 1), "--heartbeat", "5")
    target = f"127.0.0.1:{cluster.port}"
    tls = ClientTLS.from_dir(cluster.certs, name="rogue")
    stranger = cluster.node(0, "--cert-name", "rogue", key="stranger.key")
    nodes = [cluster.node(i) for i in range(NODES)]
    assert stranger.wait() == 3, stranger.output()
    refusal = stranger.lines[-1]
    assert "the coordinator refused it: " in refusal and "node ?" not in refusal, refusal
    reason = refusal.split("refused it: ", 1)[1]
    assert stranger.output().count(reason) == 1  # said once, not repeated by a log line
    assert "not registered" in stranger.lines[-1]

    rogue_key = _load_key(cluster.root / "rogue.key")
    other_key = _load_key(cluster.root / "stranger.key")
    # A hello recorded on one connection and replayed on another.
    first = _session(raw_session, target, tls)
    recorded = first.hello(rogue_key)
    first.close()
    replay = _session(raw_session, target, tls)
    replay.send(recorded)
    code, details = replay.refused()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "another session" in details
    # Impersonation: n0's public key, signed with another key.
    forged = _session(raw_session, target, tls)
    forged.send(forged.hello(_load_key(cluster.root / "n0.key"), signer=forged.signer(other_key)))
    code, details = forged.refused()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bad signature" in details
    # Malformed bytes and a frame far over the size limit.
    junk = _session(raw_session, target, tls)
    junk.send(os.urandom(512))
    assert junk.refused()[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Before a node authenticates, the front door cuts a connection past its byte budget
    # (transport.PREAUTH_BYTES): the 16 MiB never reach gRPC.
    big = _session(raw_session, target, tls)
    big.send(b"\x0a" + b"x" * (16 << 20))
    assert big.refused()[0] == grpc.StatusCode.UNAVAILABLE

    # Now the rogue joins properly (it is registered) and tampers with its reply.
    deadline = time.monotonic() + TIMEOUT
    while _connected(cluster.store) < NODES and time.monotonic() < deadline:
        time.sleep(0.2)
    rogue = _session(raw_session, target, tls)
    rogue.send(rogue.hello(rogue_key))
    assert rogue.recv().WhichOneof("kind") == "welcome"
    signer = rogue.signer(rogue_key)
    header = rogue.recv().task
    remaining = 0 if header.HasField("inline") else header.size  # small tasks come inline
    while remaining > 0:
        remaining -= len(rogue.recv().chunk.data)
    honest = bytes(encode({"kept": "x", "fields": {}}))
    message = signer.message()
    message.reply.task_id = header.task_id
    message.reply.size = len(honest)
    message.reply.tag = signer.reply_tag(message, honest)
    rogue.send(signer.frame(message))
    rogue.send(chunk_frame(TO_COORDINATOR_CHUNK, honest[:-1] + bytes([honest[-1] ^ 1])))
    assert rogue.refused()[0] == grpc.StatusCode.UNAUTHENTICATED

    finish(coordinator)
    for node in nodes:
        finish(node)
    summary = cluster.summary()
    assert summary["rounds"] == 3 and summary["accuracy"] > 0.5
    rounds = participation(cluster.store, summary["run_id"])
    assert rounds[1]["rogue"] == "error"
    with Store(cluster.store) as store:
        details = {p.node_id: p.detail for p in store.participation(summary["run_id"], 1)}
        actions = [r.action for r in store.audit_log(limit=1000)]
    assert "tag the node signed" in details["rogue"]
    assert actions.count("node.rejected") >= 4  # stranger, replay, forgery, malformed
    assert "node.tampered_reply" in actions


def _connected(store_path: Path) -> int:
    with Store(store_path) as store:
        log = store.audit_log(limit=1000)
    return len({r.actor for r in log if r.action == "node.connected"})


def _load_key(path: Path):
    from shoal.runtime.grpc import load_private_key

    return load_private_key(path)


def _session(raw_session, target: str, tls: ClientTLS):
    return raw_session(target, tls=tls)


def test_a_node_whose_every_task_fails_says_so_and_the_coordinator_names_it(
    cluster: Cluster,
) -> None:
    # n4's data has 3 features where the job's model has 64: every task it runs fails.
    bad = cluster.root / "bad.csv"
    bad.write_text("a,b,c,label\n" + "".join(f"{i},{i + 1},{i + 2},{i % 10}\n" for i in range(40)))
    cluster.job.write_text(job_text(rounds=3, per_round=NODES))
    coordinator = cluster.coordinator()
    good = [cluster.node(i) for i in range(NODES - 1)]
    broken = cluster.start(
        "node4",
        "node",
        "--coordinator", f"127.0.0.1:{cluster.port}",
        "--certs", str(cluster.certs),
        "--key", str(cluster.root / "n4.key"),
        "--job", str(cluster.job),
        "--data", str(bad),
        "--classes", "10",
        "--max-idle", str(TIMEOUT),
    )  # fmt: skip
    line = coordinator.wait_line(r"^  n4 failed: ")
    assert "features" in line or "shape" in line, line
    finish(coordinator)
    for node in good:
        finish(node)
    assert broken.wait() == 4, broken.output()
    assert "every one of its" in broken.lines[-1] and "failed" in broken.lines[-1]
