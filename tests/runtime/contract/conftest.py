"""The engines the contract suite runs against, as a registry of kit factories.

A *kit* is one engine under test plus what the suite needs to drive it from outside: read a
node's own audit log, and take a node away and bring it back. Every kit serves the same
nodes (``apps.NODES``) running the same apps (``apps.build_app``), so any difference in
outcome is the engine's.

Adding an engine: write a factory ``(root, nodes) -> ContextManager[EngineKit]`` and put it
in ``ENGINES`` under the engine's name. A name whose factory is None, or whose factory
raises ImportError (the engine's extra is not installed), is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import pytest

from shoal.runtime import Engine, LocalEngine, NodeStateFile
from shoal.runtime.nodestate import NODE_STATE_KEY
from shoal.runtime.roles import NodeApps


def _load_apps() -> ModuleType:
    # By path: this folder is not a package, and node processes run the same file as a script.
    spec = importlib.util.spec_from_file_location("shoal_contract_apps", APPS_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


APPS_SCRIPT = Path(__file__).with_name("apps.py")
apps = _load_apps()

Audit = list[tuple[str, dict[str, Any]]]


class EngineKit(Protocol):
    """One engine under test, serving ``nodes``."""

    name: str
    engine: Engine
    nodes: tuple[str, ...]
    # Whether the engine offers the optional forget() extension (a simulation engine hosting
    # its nodes' state does; the suite then holds it to it).
    forgets: bool

    def audit(self, node_id: str) -> Audit:
        """The node's own audit log as (action, detail) pairs, oldest first."""
        ...

    def disconnect(self, node_id: str) -> None:
        """Make the node unreachable (gone from ``node_ids``) until :meth:`reconnect`.

        Per-node state need not survive this (a restarted process starts afresh)."""
        ...

    def reconnect(self, node_id: str) -> None:
        """Bring a disconnected node back; returns once the engine lists it again."""
        ...

    def leftovers(self) -> list[str]:
        """After ``engine.close()``: what the engine still holds besides threads (which the
        suite checks itself), e.g. a listening port. Empty when all is released."""
        ...


KitFactory = Callable[[Path, Sequence[str]], AbstractContextManager[EngineKit]]


# -- LocalEngine --------------------------------------------------------------------------------


class LocalKit:
    name = "local"
    forgets = True

    def __init__(self, nodes: Sequence[str]) -> None:
        self.nodes = tuple(nodes)
        app = NodeApps({n: apps.build_app(n) for n in self.nodes})
        # Two workers: a dispatch's tasks really run side by side, as on the other engines.
        self.engine: LocalEngine = LocalEngine(app, nodes=self.nodes, workers=2, seed=3)

    def audit(self, node_id: str) -> Audit:
        state = self.engine.node_state(node_id).get(NODE_STATE_KEY)
        return [] if state is None else [(e.action, dict(e.detail)) for e in state.entries]

    def disconnect(self, node_id: str) -> None:
        self.engine.set_offline([node_id])

    def reconnect(self, node_id: str) -> None:
        self.engine.set_offline([node_id], offline=False)

    def leftovers(self) -> list[str]:
        return []


@contextlib.contextmanager
def local_kit(root: Path, nodes: Sequence[str]) -> Iterator[EngineKit]:
    kit = LocalKit(nodes)
    try:
        yield kit
    finally:
        kit.engine.close()


# -- GrpcEngine: a real coordinator engine and one node process per node, over mutual TLS -----


class GrpcKit:
    name = "grpc"
    forgets = False

    def __init__(self, root: Path, nodes: Sequence[str]) -> None:
        from shoal.runtime import Store
        from shoal.runtime.grpc import (
            GrpcEngine,
            ServerTLS,
            make_certs,
            public_key_bytes,
            write_key_pair,
        )

        self.root = root
        self.nodes = tuple(nodes)
        self.store = Store(root / "fl.db")
        for node in self.nodes:
            _, _, key = write_key_pair(root / f"{node}.key")
            self.store.add_node(node_id=node, public_key=public_key_bytes(key))
        make_certs(root / "certs", nodes=list(self.nodes))
        self.engine = GrpcEngine(
            listen="127.0.0.1:0",
            registry=self.store,
            tls=ServerTLS.from_dir(root / "certs"),
            seed=3,
        ).start()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}

    def start(self, node_id: str) -> None:
        self.starts[node_id] = self.starts.get(node_id, 0) + 1
        args = [
            sys.executable,
            str(APPS_SCRIPT),
            "--port",
            str(self.engine.port),
            "--key",
            str(self.root / f"{node_id}.key"),
            "--certs",
            str(self.root / "certs"),
            "--node",
            node_id,
            "--state",
            str(self.root / f"{node_id}-state.db"),
        ]
        if node_id == "n3":  # one node without a bulk lane: its payloads take the stream
            args.append("--no-lane")
        with open(self._log(node_id), "wb") as log:
            self.procs[node_id] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def _log(self, node_id: str) -> Path:
        return self.root / f"{node_id}-{self.starts.get(node_id, 1)}.log"

    def logs(self) -> str:
        return "\n".join(
            f"--- {n}: {self._log(n).read_text(errors='replace')[-2000:]}" for n in self.procs
        )

    def wait_listed(self, node_id: str, listed: bool) -> None:
        deadline = time.monotonic() + 60  # a safety net on a loaded machine, not a timing test
        while (node_id in self.engine.node_ids()) != listed:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{node_id} {'never connected' if listed else 'never left'}\n{self.logs()}"
                )
            time.sleep(0.02)

    def wait_lanes(self) -> None:
        """Until every node but n3 has its bulk lane open (it opens just after the welcome)."""
        deadline = time.monotonic() + 60
        want = {n: n != "n3" for n in self.nodes}
        while {s.node_id: s.lane for s in self.engine.sessions()} != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"bulk lanes never opened\n{self.logs()}")
            time.sleep(0.02)

    def audit(self, node_id: str) -> Audit:
        with NodeStateFile(self.root / f"{node_id}-state.db", owner=None) as file:
            assert file.verify().ok
            return [(e.action, dict(e.detail)) for e in file.read("")]

    def disconnect(self, node_id: str) -> None:
        proc = self.procs[node_id]
        proc.kill()
        proc.wait(timeout=30)
        self.wait_listed(node_id, False)

    def reconnect(self, node_id: str) -> None:
        self.start(node_id)
        self.wait_listed(node_id, True)
        self.wait_lanes()

    def leftovers(self) -> list[str]:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", self.engine.port)) == 0:
                return [f"port {self.engine.port} still accepts connections"]
        return []

    def close(self) -> None:
        self.engine.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        self.store.close()


@contextlib.contextmanager
def grpc_kit(root: Path, nodes: Sequence[str]) -> Iterator[EngineKit]:
    kit = GrpcKit(root, nodes)
    try:
        for node in kit.nodes:
            kit.start(node)
        for node in kit.nodes:
            kit.wait_listed(node, True)
        kit.wait_lanes()
        yield kit
    finally:
        kit.close()


# -- RayEngine: the same virtual nodes in Ray actors, on a private Ray on 127.0.0.1 ------------

RAY_SUPPORT = Path(__file__).resolve().parents[1] / "ray_support"


class RayKit:
    name = "ray"
    forgets = True

    def __init__(self, root: Path, nodes: Sequence[str]) -> None:
        import ray  # not installed: the kit is skipped

        from shoal.runtime import Recipe
        from shoal.runtime.ray import RayEngine

        self.nodes = tuple(nodes)
        self.temp: str | None = None
        if not ray.is_initialized():
            # Actors import the apps' recipe module by name: their path comes from this
            # process's environment when Ray starts. A short temp dir: socket paths must fit.
            self.temp = tempfile.mkdtemp(prefix="shoalray")
            old = os.environ.get("PYTHONPATH")
            os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(RAY_SUPPORT), old) if p)
            try:
                ray.init(
                    address="local",
                    num_cpus=4,  # logical CPUs: room for the suite's engine and a fresh one
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level="ERROR",
                    _temp_dir=self.temp,
                )
            finally:
                if old is None:
                    os.environ.pop("PYTHONPATH", None)
                else:
                    os.environ["PYTHONPATH"] = old
        app = Recipe(target="shoal_ray_apps:contract_apps", options={"nodes": list(self.nodes)})
        self.engine = RayEngine(app=app, nodes=self.nodes, actors=min(2, len(self.nodes)), seed=3)
        self.hosts = list(self.engine._hosts)

    def audit(self, node_id: str) -> Audit:
        return self.engine.node_audit(node_id)

    def disconnect(self, node_id: str) -> None:
        self.engine.set_offline([node_id])

    def reconnect(self, node_id: str) -> None:
        self.engine.set_offline([node_id], offline=False)

    def leftovers(self) -> list[str]:
        import ray

        left = []
        for host in self.hosts:
            try:  # a dead actor fails the call at once; a live one answers
                ray.get(host.ready.remote(), timeout=30)
                left.append("a Ray actor still answers")
            except ray.exceptions.RayActorError:
                pass
            except ray.exceptions.GetTimeoutError:
                left.append("a Ray actor neither answers nor is dead")
        return left

    def close(self) -> None:
        import ray

        self.engine.close()
        if self.temp is not None:
            ray.shutdown()
            shutil.rmtree(self.temp, ignore_errors=True)


@contextlib.contextmanager
def ray_kit(root: Path, nodes: Sequence[str]) -> Iterator[EngineKit]:
    kit = RayKit(root, nodes)
    try:
        yield kit
    finally:
        kit.close()


# -- the registry ---------------------------------------------------------------------------------

ENGINES: dict[str, KitFactory | None] = {
    "local": local_kit,
    "grpc": grpc_kit,
    "ray": ray_kit,
}


@contextlib.contextmanager
def _open_kit(name: str, root: Path, nodes: Sequence[str] = apps.NODES) -> Iterator[EngineKit]:
    """The kit of engine ``name`` serving ``nodes``; skips the test if it cannot exist here."""
    factory = ENGINES[name]
    if factory is None:
        pytest.skip(f"no {name} kit yet: add its factory to ENGINES in {Path(__file__).name}")
    try:
        manager = factory(root, nodes)
        kit = manager.__enter__()
    except ImportError as exc:
        pytest.skip(f"{name} engine not available here: {exc}")
    try:
        yield kit
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="module", params=list(ENGINES))
def kit(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One engine serving every node of the suite, shared by the tests of a module (node
    processes cost seconds to start): tests use their own task ids and state keys."""
    if request.param == "ray":  # the Ray cluster RayEngine's own tests use (../conftest.py)
        request.getfixturevalue("ray_cluster")
    with _open_kit(request.param, tmp_path_factory.mktemp(request.param)) as kit:
        yield kit


@pytest.fixture
def open_kit() -> Callable[..., AbstractContextManager[EngineKit]]:
    """``open_kit(name, root, nodes)``: a kit of its own, for a test that must close it."""
    return _open_kit
