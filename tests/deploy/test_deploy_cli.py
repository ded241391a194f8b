"""`shoal certs`, `shoal keys`, `shoal nodes` and argument checks of `shoal coordinator`/`node`."""

from __future__ import annotations

import json
import stat

import pytest

from shoal.cli.main import main
from shoal.runtime import Store
from shoal.runtime.grpc import fingerprint, load_public_key


def test_certs_keys_and_registry(tmp_path, capsys) -> None:
    certs = tmp_path / "certs"
    assert main(["certs", "--out", str(certs), "--nodes", "2", "--host", "coord.example"]) == 0
    assert {p.name for p in certs.iterdir()} == {
        "ca.pem", "ca-key.pem", "coordinator.pem", "coordinator-key.pem",
        "node-0.pem", "node-0-key.pem", "node-1.pem", "node-1-key.pem",
    }  # fmt: skip
    assert main(["keys", "new", "--out", str(tmp_path / "node-0.key")]) == 0
    assert stat.S_IMODE((tmp_path / "node-0.key").stat().st_mode) == 0o600
    public = tmp_path / "node-0.pub"
    store = str(tmp_path / "fl.db")
    assert main(["nodes", "add", str(public), "--store", store, "--label", "hospital"]) == 0
    capsys.readouterr()
    assert main(["nodes", "list", "--store", store, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["node_id"] == "node-0" and row["label"] == "hospital"
    assert row["fingerprint"] == fingerprint(load_public_key(public))
    assert main(["keys", "show", str(public)]) == 0
    assert capsys.readouterr().out.strip() == row["fingerprint"]
    # The same key under another name is refused: one key, one node.
    assert main(["nodes", "add", str(public), "--name", "again", "--store", store]) == 2
    assert "already registered" in capsys.readouterr().err
    assert main(["nodes", "revoke", "node-0", "--store", store]) == 0
    with Store(store) as s:
        assert s.get_node("node-0").revoked
        assert [r.action for r in s.audit_log()] == ["node.added", "node.revoked"]
    # Refuses to overwrite a key.
    assert main(["keys", "new", "--out", str(tmp_path / "node-0.key")]) == 2


def test_tls_or_insecure_must_be_chosen(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["coordinator", "--job", "job.toml", "--listen", "127.0.0.1:0"])
    assert exc.value.code == 2
    assert "--certs" in capsys.readouterr().err


def test_data_port_options_are_checked(capsys) -> None:
    base = ["coordinator", "--job", "job.toml", "--insecure"]
    with pytest.raises(SystemExit) as exc:
        main([*base, "--data-port", "70000"])
    assert exc.value.code == 2 and "0..65535" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*base, "--data-port", "7001", "--no-data-lane"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_node_reports_bad_inputs(tmp_path, capsys) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[data]\ndataset = "digits"\npartition = { nodes = 3 }\n')
    args = ["node", "--coordinator", "127.0.0.1:1", "--insecure", "--job", str(job)]
    assert main([*args, "--key", str(tmp_path / "missing.key"), "--partition", "0/3"]) == 2
    assert "shoal keys new" in capsys.readouterr().err
    assert main(["keys", "new", "--out", str(tmp_path / "n.key")]) == 0
    assert main([*args, "--key", str(tmp_path / "n.key"), "--partition", "0/4"]) == 2
    assert "not 4" in capsys.readouterr().err
    assert main([*args, "--key", str(tmp_path / "n.key"), "--partition", "x"]) == 2
    assert "I/N" in capsys.readouterr().err
