"""A Ray cluster on 127.0.0.1 shared by the tests that need one (Ray starts slowly).

One head (no CPUs, so no actor lands there) and two worker nodes of two logical CPUs each:
RayEngine's tests kill one worker node mid-round; the Engine contract suite runs its Ray kit
on the same cluster. Started on first use, stopped at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RAY_SUPPORT = Path(__file__).parent / "ray_support"


# Ray's head sometimes fails to start within its own fixed waits: on a CI machine the
# raylet did not register in 30 s (every Ray test errored at setup), and on a 2-core dev
# machine the GCS server did not publish its port in 30 s in 4 of 17 test runs (a
# retry then started in ~5 s). A start that fails is cleaned up and tried again; a last
# failure carries Ray's own logs.
START_ATTEMPTS = 3


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[tuple[Any, list[Any]]]:
    """(the Cluster, its two worker nodes); ``ray`` is connected to it meanwhile."""
    ray = pytest.importorskip("ray")

    # Workers import the recipes' module by name: put it on their path (they inherit it).
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(RAY_SUPPORT), old_path) if p)
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    temp = ""
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            temp = tempfile.mkdtemp(prefix="shoalray")  # short: Ray's socket paths must fit
            try:
                made, workers = _start_cluster(temp)
                break
            except Exception as exc:
                logs = _ray_logs(temp)
                _stop_processes_under(temp)
                shutil.rmtree(temp, ignore_errors=True)
                if attempt == START_ATTEMPTS:
                    raise RuntimeError(
                        f"the Ray cluster did not start in {attempt} attempts ({exc}); "
                        f"Ray's logs of the last one:\n{logs}"
                    ) from exc
                # stderr, not a warning: the suite turns warnings into errors
                print(
                    f"Ray cluster start {attempt} failed ({exc}); trying again. Ray's logs:\n"
                    f"{logs}",
                    file=sys.stderr,
                )
        try:
            ray.init(address=made.address, log_to_driver=False, logging_level="ERROR")
            yield made, workers
        finally:
            ray.shutdown()
            made.shutdown()
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
        _restore("RAY_TMPDIR", old_tmpdir)
        _restore("PYTHONPATH", old_path)


def _start_cluster(temp: str) -> tuple[Any, list[Any]]:
    """A head (no CPUs) and two 2-CPU workers on 127.0.0.1, Ray's files under ``temp``."""
    from ray.cluster_utils import Cluster

    # Cluster() records its address in the default Ray temp dir ($RAY_TMPDIR/ray), which
    # only a Ray started with default settings creates: on a fresh machine it is missing.
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    made = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": temp,
    })  # fmt: skip
    try:
        workers = [made.add_node(num_cpus=2) for _ in range(2)]
        made.wait_for_nodes()
    except BaseException:
        made.shutdown()
        raise
    return made, workers


def _ray_logs(temp: str, lines: int = 15) -> str:
    """The last ``lines`` of each of Ray's .err/.out logs under ``temp`` that has any."""
    parts = []
    for log in sorted(Path(temp).glob("session_*/logs/*")):
        if log.suffix in (".err", ".out") and log.is_file():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts) or f"(no Ray logs under {temp})"


def _stop_processes_under(temp: str) -> None:
    """Kill what a failed start left running: every process whose command line names
    ``temp`` (a failed head's raylet and GCS server are not its Cluster's to shut down)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(temp in arg for arg in proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
