"""A real datasite process (plain HTTP on loopback) under hostile HTTP: bodies that never say
how long they are, roles on the wrong endpoints. One server for the module."""

from __future__ import annotations

import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sites import RunningSite, start_site

from shoal.datasite.client import DatasiteError, connect

pytestmark = [pytest.mark.integration, pytest.mark.serial]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = start_site(tmp_path_factory.mktemp("hostile") / "site", tls=False, wall_seconds=5)
    try:
        yield running
    finally:
        running.stop()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def send_chunked(site: RunningSite, path: str, token: str, megabytes: int) -> bytes:
    """POST a body of ``megabytes`` MiB with Transfer-Encoding: chunked (no Content-Length);
    returns whatever the server answered (read while sending, as it may answer early)."""
    parts = urlsplit(site.url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    answer = bytearray()

    def complete() -> bool:
        head, sep, body = bytes(answer).partition(b"\r\n\r\n")
        length = [x for x in head.lower().split(b"\r\n") if x.startswith(b"content-length:")]
        return bool(sep and length) and len(body) >= int(length[0].split(b":")[1])

    def read() -> None:  # until the answer is whole (the server may keep the connection)
        try:
            while not complete() and (chunk := sock.recv(65536)):
                answer.extend(chunk)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b" " * (1 << 20)
    frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
    try:
        sock.sendall(head.encode())
        for _ in range(megabytes):
            if answer:  # answered early: sending on would only wait for a reader
                break
            sock.sendall(frame)
        sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server answered and closed without reading the rest
        pass
    reader.join(30)
    sock.close()
    return bytes(answer)


@pytest.mark.parametrize("who,path", [("olivia", "/api/datasets"), ("gus", "/api/users")])
def test_a_chunked_body_is_cut_at_the_limit(site: RunningSite, who: str, path: str) -> None:
    """Before: the whole chunked body was read into memory before any size or role check,
    so a guest's 400 MB body took the server to 967 MB."""
    before = peak_rss_mb(site.proc.pid)
    started = time.monotonic()
    answer = send_chunked(site, path, site.tokens[who], megabytes=50)
    status = answer.split(b"\r\n", 1)[0]
    expected = b"413" if who == "olivia" else b"403"  # a guest is refused before any reading
    assert expected in status, answer[:300]
    assert time.monotonic() - started < 20
    grown = peak_rss_mb(site.proc.pid) - before
    assert grown < 20, f"the server's peak RSS grew {grown:.0f} MB on a 50 MB body"
    assert site.as_("sam").call("GET", "/api/whoami")["name"] == "sam"
    assert site.alive()


def test_audit_verify_against_an_anchor_over_the_api(site: RunningSite) -> None:
    owner = site.as_("olivia")
    first = owner.call("GET", "/api/audit/verify")
    assert first["ok"]
    got = owner.call("GET", f"/api/audit/verify?anchor={first['anchor']}")
    assert got["ok"], got
    seq, digest = first["anchor"].split(":")
    wrong = "0" * 64 if digest != "0" * 64 else "1" * 64
    got = owner.call("GET", f"/api/audit/verify?anchor={seq}:{wrong}")
    assert not got["ok"] and "differs from the anchor" in got["problems"][0]
    for bad in ("../../etc/passwd", "1:xyz", "x" * 5000):  # never a path the server reads
        with pytest.raises(DatasiteError, match="SEQ:HASH") as refused:
            owner.call("GET", f"/api/audit/verify?anchor={bad}")
        assert refused.value.status == 400
    with pytest.raises(DatasiteError) as refused:
        site.as_("sam").call("GET", f"/api/audit/verify?anchor={first['anchor']}")
    assert refused.value.status == 403


# The owner approves what they read. Each of these reads as other code than what runs:
# bidirectional controls reorder a line on screen (here the return looks commented out,
# "Trojan Source"), and a Cyrillic "а" is a second name that looks like "a".
TROJANS = [
    "def f(assets):\n"
    "    t = assets['patients']\n"
    "    return {'n': 0}  # \u202e }{ ;return t['age'].tolist() \u202c\n",
    "def f(assets):\n    ok = 'safe'  # \u2067\u2069 harmless\n    return {'n': 0}\n",
    "def f(assets):\n    a = 0\n    \u0430 = assets['patients']['age'].tolist()\n"
    "    return {'n': \u0430}\n",
]
# Printed by `shoal datasite requests show`: a carriage return overwrites the line with the
# dead code after it (Python reads it as a new line), ESC sequences move up and erase lines.
TERMINAL_TROJANS = [
    "def f(assets):\n    return {'age': assets['patients']['age'].tolist()}  #\r"
    "    return {'n': 0}                                            \n",
    "def f(assets):\n    return {'age': assets['patients']['age'].tolist()}\n"
    "    # \x1b[1A\x1b[2K\x1b[1A\x1b[2K\n    return {'n': 0}\n",
]


@pytest.mark.parametrize("source", TERMINAL_TROJANS)
def test_code_a_terminal_would_rewrite_is_refused(site: RunningSite, source: str) -> None:
    with pytest.raises(DatasiteError, match="control character") as refused:
        site.as_("sam").call(
            "POST", "/api/requests", {"source": source, "entrypoint": "f", "assets": ["patients"]}
        )
    assert refused.value.status == 400 and "source line" in str(refused.value)


@pytest.mark.parametrize("source", TROJANS)
def test_code_that_displays_as_other_code_is_refused(site: RunningSite, source: str) -> None:
    with pytest.raises(DatasiteError, match=r"bidirectional|identifiers must be ASCII") as refused:
        site.as_("sam").call(
            "POST", "/api/requests", {"source": source, "entrypoint": "f", "assets": ["patients"]}
        )
    assert refused.value.status == 400
    with pytest.raises(DatasiteError, match="control or bidirectional"):
        site.as_("sam").call(
            "POST",
            "/api/requests",
            {
                "source": "def f(assets):\n    return {'n': 1}\n",
                "entrypoint": "f",
                "assets": ["patients"],
                "name": "mean \u202eegaytd",
            },
        )
    # text in strings and comments may be any other Unicode
    fine = site.as_("sam").call(
        "POST",
        "/api/requests",
        {
            "source": "def f(assets):\n    # été, 東京\n    return {'city': '東京'}\n",
            "entrypoint": "f",
            "assets": ["patients"],
        },
    )
    assert fine["state"] in ("submitted", "mock-run")


def test_one_scientist_cannot_queue_everyone_else_out(site: RunningSite) -> None:
    """The job pool is first come, first served: before, a scientist could queue any number
    of mock runs that each sleep to the deadline, and everyone else's waited behind them all."""
    # a scientist of their own: no pending requests left by the module's other tests
    added = site.as_("olivia").call("POST", "/api/users", {"name": "uma", "role": "scientist"})
    uma = connect(site.url, added["token"], ca=site.ca)
    tess = site.as_("tess")
    sleeper = "def f(assets, i=0):\n    import time\n    time.sleep(3600)\n"

    def submit(i: int) -> Any:
        try:
            return uma.submit(sleeper, entrypoint="f", assets=["patients"], params={"i": i})
        except DatasiteError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:  # at once: the cap holds under concurrent submits
        got = list(pool.map(submit, range(8)))
    refused = [g for g in got if isinstance(g, DatasiteError)]
    assert len(refused) == 4, got
    assert all(e.status == 409 and "have not finished" in str(e) for e in refused)
    started = time.monotonic()
    quick = tess.submit(
        "def f(assets):\n    return {'n': 1}\n", entrypoint="f", assets=["patients"]
    )
    assert quick.wait(("mock-run",), timeout=60) == "mock-run"
    # 4 sleepers on 2 workers, 5 s each: tess waits about two deadlines, not sam's whole queue
    assert time.monotonic() - started < 20
    assert quick.refresh()["reason"] == ""


def test_a_dataset_spec_of_wrong_types_is_refused_by_name(site: RunningSite) -> None:
    """Before, these reached Python's own errors ("'list' object has no attribute 'items'",
    "unhashable type: 'list'"), answered as "the datasite failed on this request"; an
    infinite max_epsilon and a negative threshold were taken."""
    owner = site.as_("olivia")
    path = str(site.data)
    cases = [
        ({"bounds": [1, 2]}, "bounds"),
        ({"bounds": {"age": [1]}}, "bounds of 'age'"),
        ({"bounds": {"age": ["a", "b"]}}, "bounds of 'age'"),
        ({"categories": {"sex": 5}}, "categories"),
        ({"unit": ["id"]}, "privacy unit"),
        ({"max_contributions": "x"}, "max_contributions"),
        ({"max_epsilon": 1e999}, "max_epsilon"),
        ({"threshold": -5}, "threshold"),
        ({"mock_rows": 1.5}, "mock_rows"),
    ]
    for i, (extra, named) in enumerate(cases):
        with pytest.raises(DatasiteError) as refused:
            owner.call("POST", "/api/datasets", {"name": f"bad{i}", "path": path, **extra})
        assert refused.value.status == 400, extra
        assert named in str(refused.value) and "failed on this request" not in str(refused.value)
    names = {d["name"] for d in owner.call("GET", "/api/datasets")}
    assert not any(n.startswith("bad") for n in names)  # nothing half-written
