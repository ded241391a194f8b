"""A mock run is code nobody approved, and its result goes straight to the scientist: it must
not be able to open the private data file (or the site's database) itself. Without bwrap the
sandbox sees the host's files, so a world-readable data file was read and returned."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sites import write_patients

from shoal.datasite.sandbox import SandboxLimits
from shoal.datasite.service import Service, User
from shoal.datasite.state import DatasiteState
from shoal.errors import ConfigError
from shoal.wire import decode

LEAK = "def f(assets, path=''):\n    with open(path) as fh:\n        return {'leak': fh.read()}\n"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may enter (as a data directory often is), outside pytest's 0700."""
    where = Path(tempfile.mkdtemp(prefix="shoal-open-", dir="/tmp"))
    where.chmod(0o755)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def service_with_users(directory: Path) -> tuple[Service, User, User]:
    with DatasiteState(directory, create=True) as state:
        owner, sam = (
            state.add_user("olivia", "owner", actor="t"),
            state.add_user("sam", "scientist", actor="t"),
        )
    service = Service(
        DatasiteState(directory), isolate=False, limits=SandboxLimits(wall_seconds=20)
    )
    return service, service.authenticate(owner), service.authenticate(sam)


@pytest.mark.skipif(
    os.getuid() != 0, reason="not root and no bwrap: every job is refused (the job would be us)"
)
def test_a_mock_run_cannot_read_the_private_file(tmp_path: Path, open_dir: Path) -> None:
    data = open_dir / "patients.csv"
    write_patients(data)
    data.chmod(0o644)
    service, owner, sam = service_with_users(tmp_path / "site")
    try:
        spec = {"name": "patients", "path": str(data), "bounds": {"age": [0, 120]}}
        with pytest.raises(ConfigError, match="could read the file of dataset 'patients'"):
            service.add_dataset(owner, spec)
        data.chmod(0o600)
        service.add_dataset(owner, spec)
        data.chmod(0o644)  # made readable after it was added: checked again at each job
        body = {"source": LEAK, "entrypoint": "f", "assets": ["patients"]}
        rid = service.submit(sam, {**body, "params": {"path": str(data)}})["id"]
        deadline = time.monotonic() + 30
        while service.status(sam, rid)["state"] != "mock-run":
            assert time.monotonic() < deadline, "the mock run did not end within 30 s"
            time.sleep(0.1)
        assert "could read the file of dataset" in service.status(sam, rid)["reason"]
        assert str(data) not in service.status(sam, rid)["reason"]
        with pytest.raises(Exception, match="no mock result"):
            service.result_bytes(sam, rid, kind="mock")
        # hidden again, the same code runs and finds nothing to open
        data.chmod(0o600)
        rid = service.submit(sam, {**body, "params": {"path": str(data)}})["id"]
        while service.status(sam, rid)["state"] != "mock-run":
            assert time.monotonic() < deadline, "the mock run did not end within 30 s"
            time.sleep(0.1)
        with pytest.raises(Exception, match="no mock result"):
            decode(service.result_bytes(sam, rid, kind="mock"))
        jobs = [j for j in service.jobs(owner) if j["request_id"] == rid]
        assert "Permission denied" in service.job_logs(owner, jobs[-1]["id"])  # as nobody
    finally:
        service.close()
        service.state.close()


def test_without_bwrap_and_root_no_job_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not root, no bwrap: the job would run as the server's own user, who reads the
    database and every data file."""
    from shoal.datasite import sandbox

    monkeypatch.setattr(sandbox.os, "getuid", lambda: 1000)
    assert sandbox.readable_by_jobs(tmp_path, isolated=False)
    assert not sandbox.readable_by_jobs(tmp_path, isolated=True)  # /tmp is its own there
