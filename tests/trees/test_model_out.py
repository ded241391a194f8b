"""`shoal node --model-out FILE` is refused when the node starts, not when the run ends: on a
horizontal tree job (its model is grown at the coordinator), and where the party could not
write the file (a missing folder, a directory, a read-only folder)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.runtime.grpc import write_key_pair
from shoal.trees.secureboost import secureboost_tasks

GBDT = """
[job]
name = "g"

[data]
dataset = "breast_cancer"
partition = { scheme = "dirichlet", alpha = 0.5, nodes = 2 }

[model]
name = "gbdt"
n_trees = 2
max_depth = 2
"""

SECUREBOOST = """
[job]
name = "s"

[data]
dataset = "breast_cancer"

[model]
name = "secureboost"
guest_features = 10
hosts = 1
n_trees = 2
max_depth = 2
max_bins = 16
key_bits = 512
insecure_test_keys = true
"""


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node(tmp_path: Path, job_text: str, model_out: Path) -> subprocess.CompletedProcess[str]:
    """``shoal node`` aimed at a port nothing listens on: it must stop before connecting."""
    job = tmp_path / "job.toml"
    job.write_text(job_text)
    write_key_pair(tmp_path / "n.key")
    command = [sys.executable, "-m", "shoal.cli.main", "node", "--insecure",
               "--coordinator", f"127.0.0.1:{_unused_port()}", "--key", str(tmp_path / "n.key"),
               "--job", str(job), "--partition", "0/2", "--model-out", str(model_out)]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.integration
def test_a_horizontal_tree_job_refuses_model_out_at_start(tmp_path: Path) -> None:
    done = _node(tmp_path, GBDT, tmp_path / "model.json")
    assert done.returncode == 2
    assert "--model-out is for SecureBoost parties" in done.stderr
    assert "coordinator" in done.stderr
    assert not (tmp_path / "model.json").exists()


@pytest.mark.integration
def test_a_party_refuses_a_model_path_in_a_missing_folder_at_start(tmp_path: Path) -> None:
    done = _node(tmp_path, SECUREBOOST, tmp_path / "no-such-folder" / "model.json")
    assert done.returncode == 2
    assert "does not exist" in done.stderr
    assert "no-such-folder" in done.stderr


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        secureboost_tasks("guest", model_out=tmp_path)


def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this process writes anywhere (root): a read-only folder is not")
        with pytest.raises(ConfigError, match="may not write there"):
            secureboost_tasks("host", model_out=locked / "model.json")
    finally:
        locked.chmod(0o700)


def test_a_writable_path_is_taken(tmp_path: Path) -> None:
    tasks = secureboost_tasks("guest", model_out=tmp_path / "model.json")
    assert "secureboost.save" in tasks
    assert not (tmp_path / "model.json").exists()  # written at the end of a run, not before
