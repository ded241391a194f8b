"""A node that cannot get a session says why, on every attempt, within seconds: nothing
listening, a TLS/plaintext mismatch either way, a certificate from another CA."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.runtime import NodeApp
from shoal.runtime.grpc import Backoff, ClientTLS, NodeClient, ServerTLS, make_certs
from shoal.runtime.grpc.node import explain_connect_error

SRC = Path(__file__).resolve().parents[2] / "src"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_reasons(client: NodeClient, count: int = 2, timeout: float = 60) -> list[str]:
    """Run ``client`` until it has retried ``count`` times; the reasons it gave."""
    reasons: list[str] = []
    done = threading.Event()

    def on_retry(attempt: int, delay: float, reason: str) -> None:
        reasons.append(reason)
        if len(reasons) >= count:
            done.set()
            client.stop()

    client.on_retry = on_retry
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    assert done.wait(timeout), f"no retries within {timeout} s: {reasons}"
    thread.join(timeout=30)
    return reasons


def make_client(federation, port: int, **options) -> NodeClient:  # type: ignore[no-untyped-def]
    options.setdefault("insecure", "tls" not in options)
    return NodeClient(
        app=NodeApp(),
        coordinator=f"127.0.0.1:{port}",
        key=federation.keys["n0"],
        backoff=Backoff(initial_s=0.05, max_s=0.2),
        **options,
    )


def test_nothing_listening_is_connection_refused(federation) -> None:
    reasons = first_reasons(make_client(federation, free_port()))
    assert all("connection refused" in r for r in reasons), reasons


def test_tls_node_against_a_plaintext_coordinator(federation) -> None:
    engine = federation.engine()  # insecure
    tls = ClientTLS.from_dir(federation.certs, name="n0")
    reasons = first_reasons(make_client(federation, engine.port, tls=tls))
    assert all("TLS mismatch" in r and "--insecure" in r for r in reasons), reasons


def test_plaintext_node_against_a_tls_coordinator(federation) -> None:
    engine = federation.engine(tls=ServerTLS.from_dir(federation.certs))
    reasons = first_reasons(make_client(federation, engine.port))
    assert all("expects TLS" in r for r in reasons), reasons


def test_certificate_from_another_ca(federation, tmp_path: Path) -> None:
    engine = federation.engine(tls=ServerTLS.from_dir(federation.certs))
    make_certs(tmp_path / "other", nodes=["n0"])  # a different federation's CA
    tls = ClientTLS.from_dir(tmp_path / "other", name="n0")
    reasons = first_reasons(make_client(federation, engine.port, tls=tls))
    assert all("not signed by this node's CA" in r for r in reasons), reasons


def test_unknown_errors_are_not_explained() -> None:
    assert explain_connect_error("something else entirely") is None


@pytest.mark.integration
def test_node_command_prints_each_attempt_and_why(federation) -> None:
    job = federation.root / "job.toml"
    job.write_text(
        '[data]\ndataset = "iris"\npartition = { scheme = "iid", nodes = 2 }\n'
        '[algorithm]\nname = "fedavg"\nrounds = 1\nnodes_per_round = 2\n'
    )
    port = free_port()
    code = "import sys; from shoal.cli.main import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "node", "--coordinator", f"127.0.0.1:{port}",
         "--insecure", "--key", str(federation.root / "n0.key"), "--job", str(job),
         "--partition", "0/2", "--backoff", "0.1", "--backoff-max", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and sum("attempt" in x for x in lines) < 3:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    attempts = [x for x in lines if x.startswith("attempt")]
    assert len(attempts) >= 3, lines
    assert attempts[0].startswith("attempt 1:") and attempts[1].startswith("attempt 2:")
    assert all("connection refused" in x and "retrying in" in x for x in attempts), attempts
