"""A Ray cluster on 127.0.0.1 shared by the tests that need one (Ray starts slowly).

One head (no CPUs, so no actor lands there) and two worker nodes of two logical CPUs each:
RayEngine's tests kill one worker node mid-round; the Engine contract suite runs its Ray kit
on the same cluster. Started on first use, stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

RAY_SUPPORT = Path(__file__).parent / "ray_support"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[tuple[Any, list[Any]]]:
    """(the Cluster, its two worker nodes); ``ray`` is connected to it meanwhile."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Workers import the recipes' module by name: put it on their path (they inherit it).
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(RAY_SUPPORT), old_path) if p)
    temp = tempfile.mkdtemp(prefix="shoalray")  # short: Ray's socket paths must fit
    # Cluster() records its address in the default Ray temp dir ($RAY_TMPDIR/ray), which
    # only a Ray started with default settings creates: on a fresh machine it is missing.
    old_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    head = {"num_cpus": 0, "include_dashboard": False, "temp_dir": temp}
    made = Cluster(initialize_head=True, head_node_args=head)
    try:
        workers = [made.add_node(num_cpus=2) for _ in range(2)]
        made.wait_for_nodes()
        ray.init(address=made.address, log_to_driver=False, logging_level="ERROR")
        yield made, workers
    finally:
        ray.shutdown()
        made.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if old_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmpdir
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
