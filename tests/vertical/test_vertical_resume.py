"""A deployed vertical job whose host process is killed (SIGKILL) mid-epoch and started
again: the run resumes from the last epoch both parties completed, which the host kept in
its state file, and ends with exactly the model of an uninterrupted run."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from shoal.runtime import Store
from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair

from .test_vertical_deploy import EXAMPLE, _free_port, _shoal

pytestmark = pytest.mark.integration

PARTIES = ["bank", "insurer"]


def _saved_epochs(path: Path) -> list[int]:
    if not path.exists():
        return []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute("SELECT epoch FROM vertical_epochs ORDER BY epoch").fetchall()
    except sqlite3.Error:  # the table is not there yet
        return []
    return [int(r[0]) for r in rows]


def test_killed_party_resumes_from_its_last_saved_epoch(tmp_path: Path) -> None:
    job = tmp_path / "vertical.toml"
    text = (EXAMPLE / "vertical.toml").read_text()
    text = text.replace("epochs = 10", "epochs = 4\nresume_wait_s = 60")
    text = text.replace("batch_size = 1024", "batch_size = 32")
    text = text.replace("key_bits = 2048", "key_bits = 512")
    for name in PARTIES:
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

    def node(name: str, log: str) -> object:
        return _shoal(
            [
                "node", "--coordinator", f"127.0.0.1:{port}", "--certs", str(tmp_path / "certs"),
                "--key", str(tmp_path / f"{name}.key"), "--job", str(job),
                "--state", str(tmp_path / f"{name}.db"), "--max-idle", "60",
                "--backoff", "0.2", "--backoff-max", "1", "--insecure-test-keys",
            ],
            tmp_path / log,
        )  # fmt: skip

    procs = [coordinator, node("bank", "bank.log")]
    host = node("insurer", "insurer.log")
    procs.append(host)
    state = tmp_path / "insurer.db"
    try:
        # kill the host halfway through epoch 2: epochs 0 and 1 are saved in its state file
        end, stamps = time.monotonic() + 300, {}
        while len(stamps) < 2 and time.monotonic() < end:
            assert coordinator.poll() is None, (tmp_path / "coordinator.log").read_text()
            for epoch in _saved_epochs(state):
                stamps.setdefault(epoch, time.monotonic())
            time.sleep(0.01)
        assert sorted(stamps) == [0, 1], "the host did not complete two epochs"
        time.sleep((stamps[1] - stamps[0]) / 2)
        saved_before = _saved_epochs(state)
        host.kill()  # SIGKILL: no cleanup, no goodbye
        host.wait(timeout=10)
        restarted = node("insurer", "insurer2.log")
        procs.append(restarted)
        code = coordinator.wait(timeout=400)
        logs = "".join(
            (tmp_path / f).read_text()
            for f in ("coordinator.log", "bank.log", "insurer.log", "insurer2.log")
        )
        assert code == 0, logs
        assert restarted.wait(timeout=90) == 0, logs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    summary = json.loads((tmp_path / "out.json").read_text())
    assert saved_before == [0, 1], "the host was not killed in epoch 2"
    assert "epoch 2 failed" in logs
    assert summary["retries"] == 1 and summary["epochs_run"] == 4
    # resumed from the epoch the killed host read back from its state file, not from zeros
    assert summary["resumed_from"] == [-1, 1]
    assert _saved_epochs(state) == [0, 1, 2, 3]
    # the same job simulated here, uninterrupted: the same model, bit for bit
    from shoal.vertical.job import load_vertical_job, simulate

    sim = simulate(load_vertical_job(job, insecure_test_keys=True))
    assert summary["history"] == sim["history"]
    assert summary["auc"] == sim["auc"] and summary["accuracy"] == sim["accuracy"]
