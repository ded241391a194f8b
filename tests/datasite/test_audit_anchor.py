"""Someone with write access to a datasite's file rewrites its audit chain: what verify finds
with and without an anchor exported earlier (``shoal datasite audit head``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from shoal.cli.main import main
from shoal.datasite.state import DB_NAME, DatasiteState
from shoal.errors import ConfigError
from shoal.runtime.audit import entry_hash, parse_head


def make_site(directory: Path, entries: int = 6) -> None:
    with DatasiteState(directory, create=True) as state:
        for i in range(entries):
            state.audit("olivia", "request.approve", {"request": i, "reason": "fine"})


def rewrite(directory: Path, *, seq: int, detail: str, keep_from_end: int | None = None) -> None:
    """Drop the triggers, edit entry ``seq`` (and cut the chain after ``keep_from_end``
    entries if given), recompute every hash after it, lower the sequence counter, and put
    the triggers back: the chain is consistent again, and keyless."""
    conn = sqlite3.connect(directory / DB_NAME)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    if keep_from_end is not None:
        conn.execute("DELETE FROM audit WHERE seq > ?", (keep_from_end,))
        conn.execute("UPDATE sqlite_sequence SET seq=? WHERE name='audit'", (keep_from_end,))
    conn.execute("UPDATE audit SET detail=? WHERE seq=?", (detail, seq))
    rows = conn.execute("SELECT seq, ts, actor, action, detail FROM audit ORDER BY seq").fetchall()
    prev = "0" * 64
    for s, ts, actor, action, text in rows:
        digest = entry_hash(prev, s, ts, actor, action, text)
        conn.execute("UPDATE audit SET prev=?, hash=? WHERE seq=?", (prev, digest, s))
        prev = digest
    conn.executescript(
        """
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
        """
    )
    conn.commit()
    conn.close()


def test_a_rewrite_with_recomputed_hashes_is_found_only_against_an_anchor(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    make_site(site)
    with DatasiteState(site) as state:
        anchor = state.anchor()
        assert state.verify(anchor=anchor).ok
    assert anchor.heads[""][0] == 6
    rewrite(site, seq=2, detail='{"reason":"never approved","request":1}')
    with DatasiteState(site) as state:
        assert state.verify().ok  # what a keyless chain cannot see (docs/datasite.md says so)
        report = state.verify(anchor=anchor)
    assert not report.ok
    assert any("differs from the anchor" in p for p in report.problems)


def test_the_tail_cut_and_the_counter_lowered_is_found_against_an_anchor(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    make_site(site)
    with DatasiteState(site) as state:
        anchor = state.anchor()
    rewrite(site, seq=2, detail='{"reason":"fine","request":1}', keep_from_end=3)
    with DatasiteState(site) as state:
        assert state.verify().ok
        problems = state.verify(anchor=anchor).problems
    assert any("anchor exported earlier holds entry 6" in p for p in problems)


def test_dropped_triggers_are_reported_even_though_opening_restores_them(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    make_site(site)
    conn = sqlite3.connect(site / DB_NAME)
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.commit()
    conn.close()
    with DatasiteState(site) as state:
        problems = state.verify().problems
    assert any("audit_no_delete" in p and "dropped" in p for p in problems)


def test_cli_head_then_verify_with_the_anchor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"
    make_site(site)
    out = tmp_path / "elsewhere.json"
    assert main(["datasite", "audit", "head", "--dir", str(site), "--out", str(out)]) == 0
    head = capsys.readouterr().out.strip()
    assert parse_head(head).heads[""][0] == 6
    for anchor in (head, str(out)):  # SEQ:HASH or the anchor file
        assert main(["datasite", "audit", "verify", "--dir", str(site), "--anchor", anchor]) == 0
    capsys.readouterr()
    rewrite(site, seq=5, detail='{"reason":"edited","request":4}')
    assert main(["datasite", "audit", "verify", "--dir", str(site)]) == 0
    assert "without an anchor" in capsys.readouterr().out
    for anchor in (head, str(out)):
        assert main(["datasite", "audit", "verify", "--dir", str(site), "--anchor", anchor]) == 1
        assert "TAMPERED" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="SEQ:HASH"):
        parse_head("6:abc")
