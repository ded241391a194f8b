"""`shoal audit verify|tail` on a coordinator's store and on a node's state file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from shoal.cli.main import main
from shoal.runtime import Store, open_node_state


def node_state_file(path: Path) -> Path:
    state = open_node_state(path, owner="key:abc")
    state.charge(task_id="r1", charge={"noise_multiplier": 1.0, "steps": 1}, task="train")
    state.audit("refused", task="shoal.fetch", reason="'delta' as secure")
    state.close()
    return path


def store_file(path: Path) -> Path:
    with Store(path) as store:
        for i in range(3):
            store.audit(actor="coordinator", action="request", detail={"i": i})
    return path


def unlock(path: Path, statement: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute(statement)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("kind", ["store", "state"])
def test_verify_passes_an_intact_chain_and_fails_a_tampered_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = (store_file if kind == "store" else node_state_file)(tmp_path / f"{kind}.db")
    assert main(["audit", "verify", f"--{kind}", str(path)]) == 0
    assert "chain intact" in capsys.readouterr().out
    unlock(path, "DELETE FROM audit WHERE seq=1")
    assert main(["audit", "verify", f"--{kind}", str(path)]) == 1
    out = capsys.readouterr().out
    assert "TAMPERED" in out and "does not link" in out


def test_tail_shows_the_newest_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = node_state_file(tmp_path / "node.db")
    assert main(["audit", "tail", "--state", str(state), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "refused" in out and "privacy.charge" not in out
    store = store_file(tmp_path / "fl.db")
    assert main(["audit", "tail", "--store", str(store)]) == 0
    assert capsys.readouterr().out.count("request") == 3


def test_missing_or_foreign_files_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "verify", "--state", str(tmp_path / "nope.db")]) == 2
    assert "does not exist" in capsys.readouterr().err
    store = store_file(tmp_path / "fl.db")
    assert main(["audit", "verify", "--state", str(store)]) == 2  # a store is not a node state
    assert "not a shoal node state file" in capsys.readouterr().err


def test_shoal_node_refuses_a_state_file_of_another_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[data]\ndataset = "digits"\npartition = { nodes = 3 }\n')
    assert main(["keys", "new", "--out", str(tmp_path / "n.key")]) == 0
    state = node_state_file(tmp_path / "node.db")  # written for key:abc
    before = state.read_bytes()
    args = ["node", "--coordinator", "127.0.0.1:1", "--insecure", "--job", str(job)]
    code = main(
        [*args, "--key", str(tmp_path / "n.key"), "--partition", "0/3", "--state", str(state)]
    )
    assert code == 2
    assert "belongs to 'key:abc'" in capsys.readouterr().err
    assert state.read_bytes() == before


@pytest.mark.parametrize("kind", ["store", "state"])
def test_anchor_then_verify_catches_a_truncation_the_key_holder_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    path = (store_file if kind == "store" else node_state_file)(tmp_path / f"{kind}.db")
    key = tmp_path / "elsewhere.key"
    (tmp_path / f"{kind}.db.audit-key").rename(key)  # the key kept apart, named by --key
    assert main(["audit", "verify", f"--{kind}", str(path)]) == 1  # no key: not "ok"
    assert "no audit key" in capsys.readouterr().out
    anchor = tmp_path / "anchor.json"
    assert (
        main(["audit", "anchor", f"--{kind}", str(path), "--key", str(key), "--out", str(anchor)])
        == 0
    )
    assert "anchored 1 chain" in capsys.readouterr().out
    assert (
        main(
            ["audit", "verify", f"--{kind}", str(path), "--key", str(key), "--anchor", str(anchor)]
        )
        == 0
    )
    assert "holds anchor" in capsys.readouterr().out
    # Whoever holds the key cuts the newest entry and reseals the head: only the anchor shows.
    from shoal.runtime.audit import load_key, seal

    secret = load_key(key, create=False)
    assert secret is not None
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_no_delete")
    last, prev = conn.execute("SELECT seq, prev FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    conn.execute("DELETE FROM audit WHERE seq=?", (last,))
    if kind == "store":
        conn.execute("UPDATE sqlite_sequence SET seq=? WHERE name='audit'", (last - 1,))
        conn.execute(
            "UPDATE audit_seal SET seq=?, hash=?, mac=?",
            (last - 1, prev, seal(secret, "", last - 1, prev)),
        )
    else:
        conn.execute(
            "UPDATE heads SET seq=?, hash=?, mac=?",
            (last - 1, prev, seal(secret, "", last - 1, prev)),
        )
    conn.execute(
        "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit "
        "BEGIN SELECT RAISE(ABORT, 'append-only'); END"
    )
    conn.commit()
    conn.close()
    assert main(["audit", "verify", f"--{kind}", str(path), "--key", str(key)]) == 0
    capsys.readouterr()
    assert (
        main(
            ["audit", "verify", f"--{kind}", str(path), "--key", str(key), "--anchor", str(anchor)]
        )
        == 1
    )
    assert "anchor exported earlier" in capsys.readouterr().out
