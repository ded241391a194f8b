"""`shoal predict serve` (the owner's node) and `shoal predict query` (the client) over
gRPC with mutual TLS, in two threads of one process."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np

from shoal.cli.main import main
from shoal.runtime import Store
from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair


def test_predict_cli_round_trip(tmp_path: Path) -> None:
    w, b = np.array([1.5, -2.0, 0.25]), 0.5
    np.savez(tmp_path / "model.npz", weights=w, bias=b)
    x = np.random.default_rng(0).normal(size=(4, 3))
    (tmp_path / "rows.csv").write_text(
        "a,b,c\n" + "".join(",".join(repr(float(v)) for v in r) + "\n" for r in x)
    )
    make_certs(tmp_path / "certs", nodes=["owner"])
    with Store(tmp_path / "fl.db") as store:
        _, _, key = write_key_pair(tmp_path / "owner.key")
        store.add_node(node_id="owner", public_key=public_key_bytes(key))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    codes: list[int] = []
    owner = threading.Thread(
        target=lambda: codes.append(
            main(
                [
                    "predict", "serve", "--coordinator", f"127.0.0.1:{port}",
                    "--key", str(tmp_path / "owner.key"), "--certs", str(tmp_path / "certs"),
                    "--model", str(tmp_path / "model.npz"), "--insecure-test-keys",
                    "--max-idle", "5",
                ]
            )
        ),
        daemon=True,
    )  # fmt: skip
    owner.start()
    code = main(
        [
            "predict", "query", "--listen", f"127.0.0.1:{port}",
            "--certs", str(tmp_path / "certs"), "--store", str(tmp_path / "fl.db"),
            "--owner", "owner", "--rows", str(tmp_path / "rows.csv"),
            "--out", str(tmp_path / "scores.txt"), "--key-bits", "512",
            "--insecure-test-keys",
        ]
    )  # fmt: skip
    assert code == 0
    scores = np.array([float(v) for v in (tmp_path / "scores.txt").read_text().split()])
    np.testing.assert_allclose(scores, x @ w + b, atol=1e-6)
    owner.join(timeout=30)
    assert codes == [0]
