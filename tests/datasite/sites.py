"""Start a real datasite server process with an owner, two scientists and a guest (helpers)."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import shoal
from shoal.datasite.client import Datasite, connect
from shoal.datasite.state import DatasiteState
from shoal.runtime.grpc.certs import make_certs

SRC = str(Path(shoal.__file__).resolve().parent.parent)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_patients(path: Path, rows: int = 200, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "age", "sex", "income"])
        for i in range(rows):
            w.writerow(
                [
                    i // 2,
                    int(rng.integers(18, 90)),
                    ["F", "M"][int(rng.integers(0, 2))],
                    round(float(rng.uniform(1000, 9000)), 2),
                ]
            )


@dataclass
class RunningSite:
    directory: Path
    url: str
    ca: Path | None
    tokens: dict[str, str]
    proc: subprocess.Popen[bytes]
    data: Path
    extra: dict[str, str] = field(default_factory=dict)

    def as_(self, who: str) -> Datasite:
        return connect(self.url, self.tokens[who], ca=self.ca)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _serve(
    directory: Path,
    *,
    tls: bool,
    ca: Path | None,
    tokens: dict[str, str],
    data: Path,
    extra: list[str],
) -> RunningSite | None:
    """The server on a free port, or None if that port was taken before it could bind."""
    port = free_port()
    command = [sys.executable, "-m", "shoal.cli.main", "datasite", "serve", str(directory)]
    command += ["--listen", f"127.0.0.1:{port}", *extra]
    if not tls:
        command.append("--insecure")
    env = {**os.environ, "PYTHONPATH": SRC}
    with open(directory / "server.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    site = RunningSite(directory=directory, url=url, ca=ca, tokens=tokens, proc=proc, data=data)
    deadline = time.monotonic() + 60
    while True:
        try:
            site.as_("olivia").call("GET", "/api/whoami")
            return site
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                site.stop()
                if "address already in use" in (directory / "server.log").read_text():
                    return None
                raise RuntimeError(
                    "the datasite did not start: " + (directory / "server.log").read_text()
                ) from None
            time.sleep(0.1)


def start_site(
    directory: Path,
    *,
    tls: bool = True,
    wall_seconds: float = 20.0,
    memory_mb: int = 1024,
    rows: int = 200,
    dataset: bool = True,
) -> RunningSite:
    tokens: dict[str, str] = {}
    with DatasiteState(directory, create=True) as state:
        for name, role in (
            ("olivia", "owner"),
            ("sam", "scientist"),
            ("tess", "scientist"),
            ("gus", "guest"),
        ):
            tokens[name] = state.add_user(name, role, actor="test")
    ca = None
    if tls:
        ca = make_certs(directory / "certs").ca
    data = directory.parent / f"{directory.name}-patients.csv"
    write_patients(data, rows=rows)
    for attempt in range(5):  # a free port may be taken by another process before we bind it
        site = _serve(
            directory,
            tls=tls,
            ca=ca,
            tokens=tokens,
            data=data,
            extra=["--wall-seconds", str(wall_seconds), "--memory-mb", str(memory_mb)],
        )
        if site is not None:
            break
        if attempt == 4:
            raise RuntimeError(
                "the datasite did not start: " + (directory / "server.log").read_text()
            )
    if dataset:
        site.as_("olivia").call(
            "POST",
            "/api/datasets",
            {
                "name": "patients",
                "path": str(data),
                "description": "synthetic patients",
                "bounds": {"age": [0, 120], "income": [0, 10000]},
                "categories": {"sex": ["F", "M"]},
                "unit": "id",
                "max_contributions": 2,
                "max_epsilon": 2.0,
                "default_epsilon": 0.5,
                "threshold": 5,
            },
        )
    return site
