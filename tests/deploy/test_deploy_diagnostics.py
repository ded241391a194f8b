"""A node that cannot get a session says why, on every attempt, within seconds: nothing
listening, a TLS/plaintext mismatch either way, a certificate from another CA."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from shoal.cli.deploy import _EventPrinter
from shoal.errors import TransportError
from shoal.runtime import NodeApp
from shoal.runtime.grpc import Backoff, ClientTLS, NodeClient, ServerTLS, make_certs
from shoal.runtime.grpc.node import explain_connect_error
from shoal.runtime.grpc.protocol import METHOD
from shoal.runtime.grpc.transport import AGREEMENT, agree, classify, mismatch_line

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


NODE_ON_TLS = mismatch_line(side="node", coordinator="tls")  # an --insecure node
NODE_ON_PLAIN = mismatch_line(side="node", coordinator="plaintext")  # a TLS node


def mismatch_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the coordinator logged about transports (the node's own log lines say it too)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "shoal.deploy" and "transport mismatch" in r.getMessage()
    ]


def test_tls_node_against_a_plaintext_coordinator(federation, caplog) -> None:  # type: ignore[no-untyped-def]
    engine = federation.engine()  # insecure
    tls = ClientTLS.from_dir(federation.certs, name="n0")
    reasons = first_reasons(make_client(federation, engine.port, tls=tls), count=3)
    assert reasons == [NODE_ON_PLAIN] * 3
    # One line on the coordinator's side too, however often the node retries.
    line = mismatch_line(side="coordinator", coordinator="plaintext", peer="127.0.0.1")
    assert mismatch_warnings(caplog) == [line]
    assert "--insecure too" in line and "speaks TLS" in line


def test_plaintext_node_against_a_tls_coordinator(federation, caplog) -> None:  # type: ignore[no-untyped-def]
    engine = federation.engine(tls=ServerTLS.from_dir(federation.certs))
    reasons = first_reasons(make_client(federation, engine.port), count=3)
    assert reasons == [NODE_ON_TLS] * 3
    line = mismatch_line(side="coordinator", coordinator="tls", peer="127.0.0.1")
    assert mismatch_warnings(caplog) == [line]
    engine.close()  # the retries beyond the first are counted, then recorded once
    audit = [r for r in federation.store.audit_log(limit=100) if "transport" in r.action]
    assert [r.action for r in audit] == [
        "node.transport_mismatch",
        "node.transport_mismatch_summary",
    ]
    assert audit[1].detail["count"] >= 2


@pytest.mark.parametrize("coordinator_tls", [True, False])
def test_a_raw_grpc_client_on_the_wrong_transport_is_one_line(
    federation, caplog, coordinator_tls: bool
) -> None:  # type: ignore[no-untyped-def]
    """A gRPC client that skips the agreement (another tool, an old node) is told apart by
    its first bytes: the coordinator says so once, and gRPC never sees the connection."""
    tls = ServerTLS.from_dir(federation.certs) if coordinator_tls else None
    engine = federation.engine(tls=tls) if tls else federation.engine()
    target = f"127.0.0.1:{engine.port}"
    if coordinator_tls:
        channel = grpc.insecure_channel(target)
    else:
        client_tls = ClientTLS.from_dir(federation.certs, name="n0")
        channel = grpc.secure_channel(target, client_tls.credentials())
    with channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                list(channel.stream_stream(METHOD)(iter([b""]), timeout=5))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    speaks = "tls" if coordinator_tls else "plaintext"
    line = mismatch_line(side="coordinator", coordinator=speaks, peer="127.0.0.1")
    assert mismatch_warnings(caplog) == [line]


def test_bytes_that_are_neither_transport_are_refused_and_recorded(federation) -> None:
    engine = federation.engine()
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == b""  # closed, without an answer
    engine.close()
    records = federation.store.audit_log(limit=100)
    rejected = [r.detail for r in records if r.action == "node.rejected"]
    assert len(rejected) == 1 and "not a shoal node" in rejected[0]["reason"]


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"\x16\x03\x01\x02\x00", "tls"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00", "plaintext"),
        (b"PRI * HTTP/2.0", None),  # not yet decided
        (b"SHOAL-TRANSPORT/1 tls\n", "agree"),
        (b"SHOAL-TRANSPORT/1 tl", None),
        (b"PRX", "unknown"),
        (b"\x00", "unknown"),
    ],
)
def test_classify(head: bytes, kind: str | None) -> None:
    assert classify(head) == kind


def test_a_forged_answer_stops_a_node_but_never_downgrades_it() -> None:
    """The agreement is unauthenticated: a man in the middle answering "plaintext" to a TLS
    node only makes it refuse to go on (it never switches transport)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(100)
                conn.sendall(AGREEMENT + b"plaintext\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(TransportError, match="transport mismatch"):
            agree(f"127.0.0.1:{port}", "tls")
        thread.join(timeout=10)


def test_a_service_that_is_not_a_coordinator() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(TransportError, match="did not answer shoal's transport agreement"):
            agree(f"127.0.0.1:{port}", "plaintext")
        thread.join(timeout=10)


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


@pytest.mark.integration
def test_shoal_commands_on_mismatched_transports_say_so_in_one_line(federation) -> None:
    """Real `shoal coordinator` and `shoal node` processes, both ways round: the node prints
    the mismatch and the fix on each attempt, the coordinator prints it once per address,
    and neither prints gRPC's own TLS errors."""
    job = federation.root / "job.toml"
    job.write_text(
        '[data]\ndataset = "iris"\npartition = { scheme = "iid", nodes = 1 }\n'
        '[algorithm]\nname = "fedavg"\nrounds = 1\nnodes_per_round = 1\n'
    )
    certs = ["--certs", str(federation.certs)]
    code = "import sys; from shoal.cli.main import main; sys.exit(main(sys.argv[1:]))"
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        procs.append(proc)
        return proc

    cases = []
    for coordinator_tls in (True, False):
        port = free_port()
        coordinator = start(
            "coordinator", "--job", str(job), "--listen", f"127.0.0.1:{port}",
            "--store", str(federation.root / f"c{int(coordinator_tls)}.db"),
            *(certs if coordinator_tls else ["--insecure"]),
        )  # fmt: skip
        cases.append((coordinator_tls, port, coordinator))
    try:
        nodes = []
        early: dict[int, str] = {}  # what each coordinator printed until it listened
        for coordinator_tls, port, coordinator in cases:
            assert coordinator.stdout is not None
            early[coordinator.pid] = ""
            while "listening on" not in early[coordinator.pid]:  # up before its node comes
                line = coordinator.stdout.readline()
                assert line, early[coordinator.pid]
                early[coordinator.pid] += line
            node = start(
                "node", "--coordinator", f"127.0.0.1:{port}", "--key",
                str(federation.root / "n0.key"), "--job", str(job), "--partition", "0/1",
                "--backoff", "0.1", "--backoff-max", "0.2",
                *(["--insecure"] if coordinator_tls else [*certs, "--cert-name", "n0"]),
            )  # fmt: skip
            nodes.append(node)
        outputs = []
        for node in nodes:
            assert node.stdout is not None
            lines: list[str] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and sum(x.startswith("attempt") for x in lines) < 3:
                line = node.stdout.readline()
                if not line:
                    break
                lines.append(line)
            outputs.append(lines)
    finally:
        for proc in procs[::-1]:  # the nodes first: a coordinator records until it stops
            proc.terminate()
            proc.wait(timeout=30)
        finished = [proc.communicate(timeout=30)[0] for proc in procs]
    for (coordinator_tls, _, coordinator), node_lines, node_rest in zip(
        cases, outputs, finished[2:], strict=True
    ):
        speaks = "tls" if coordinator_tls else "plaintext"
        attempts = [x for x in node_lines if x.startswith("attempt")]
        assert len(attempts) == 3, node_lines
        assert all(mismatch_line(side="node", coordinator=speaks) in x for x in attempts)
        coordinator_out = early[coordinator.pid] + finished[procs.index(coordinator)]
        expected = mismatch_line(side="coordinator", coordinator=speaks, peer="127.0.0.1")
        said = [x for x in coordinator_out.splitlines() if "mismatch" in x]
        assert said == [expected], coordinator_out
        for text in (coordinator_out, "".join(node_lines) + node_rest):
            for raw in ("WRONG_VERSION_NUMBER", "ssl_transport_security", "Handshake failed"):
                assert raw not in text


def test_the_coordinator_prints_reconnects_and_revocations(federation, capsys) -> None:  # type: ignore[no-untyped-def]
    """What `shoal coordinator` shows an operator: a node's first connection, its
    reconnection (from its own address, not the front door's relay), and a revocation."""
    events = logging.getLogger("shoal.deploy")
    printer = _EventPrinter()
    events.addHandler(printer)
    old_level = events.level
    events.setLevel(logging.INFO)
    try:
        engine = federation.engine(registry_refresh_s=0.2)
        first = federation.client("n0", NodeApp(), engine.port)
        federation.client("n1", NodeApp(), engine.port)
        assert engine.wait_for_nodes(2, timeout_s=30) == 2
        first.stop()
        deadline = time.monotonic() + 30
        while "n0" in engine.node_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        federation.client("n0", NodeApp(), engine.port)
        assert engine.wait_for_nodes(2, timeout_s=30) == 2
        federation.store.revoke_node("n1")
        # Until the session has left the table, not just node_ids(): a session is marked
        # closed first and logs its end after, so the line could come after the printer had
        # been removed (failed so once under load). Its own deadline, as the first may be spent.
        revoked_at = time.monotonic()
        while any(s.node_id == "n1" for s in engine.sessions()):
            if time.monotonic() > revoked_at + 30:
                break
            time.sleep(0.05)
        waited = time.monotonic() - revoked_at
        peers = {s.node_id: s.peer for s in engine.sessions()}
    finally:
        events.removeHandler(printer)
        events.setLevel(old_level)
    out = capsys.readouterr().out.splitlines()
    assert any(x.startswith("node n0 connected from ipv4:127.0.0.1:") for x in out), out
    assert any(x.startswith("node n0 reconnected from ipv4:127.0.0.1:") for x in out), out
    assert "node n1 disconnected: revoked" in out, (f"after {waited:.1f} s", out)
    # gRPC sees the relay's loopback connection; the session names the node's own address.
    assert peers["n0"].startswith("ipv4:127.0.0.1:")
    assert engine._door is not None and engine._door._conn_of(peers["n0"]) is None
