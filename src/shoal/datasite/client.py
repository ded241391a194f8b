"""The Python client: ``site = shoal.datasite.connect(url, token)``, then submit and fetch.

Standard library HTTP only (no extra needed). Results arrive as ``shoal.wire`` bytes and
are decoded here with the wire format's checks.
"""

from __future__ import annotations

import inspect
import json
import ssl
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal.errors import (
    AuthenticationError,
    ConfigError,
    ReleaseRefused,
    ShoalError,
    TransportError,
)

__all__ = ["Datasite", "DatasiteError", "DatasiteTimeout", "RemoteRequest", "connect"]

FINAL = ("denied", "failed", "timeout", "out-of-memory", "released", "withheld")


class DatasiteError(ShoalError, RuntimeError):
    """The datasite refused a call; the message is its own."""

    def __init__(self, status: int, message: str, *, failure: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message
        # A node task's outcome as the site's node named it (rejected, declined, error).
        self.failure = failure


class DatasiteTimeout(TransportError, TimeoutError):
    """The datasite did not answer in time."""


def connect(
    url: str, token: str, *, ca: str | Path | None = None, timeout: float = 30.0
) -> Datasite:
    """A session with the datasite at ``url`` (``https://host:port``), as the token's user.

    ``ca`` is the federation's ``ca.pem`` (from ``shoal certs``) that the datasite's
    certificate must chain to; without it the system's trust store is used.
    """
    return Datasite(url=url, token=token, ca=ca, timeout=timeout)


class Datasite:
    """One datasite, seen by one user."""

    def __init__(
        self, *, url: str, token: str, ca: str | Path | None = None, timeout: float = 30.0
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ConfigError(f"a datasite URL starts with https:// (got {url!r})")
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if url.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=str(ca) if ca else None)

    def __repr__(self) -> str:
        return f"Datasite({self.url!r})"

    def call(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        """One API call; JSON in and out (``raw=True`` returns the response bytes)."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        payload = self._send(method, path, data, "application/json")
        return payload if raw else json.loads(payload)

    def call_bytes(
        self, method: str, path: str, data: bytes, *, timeout: float | None = None
    ) -> bytes:
        """One API call with a wire-encoded body and answer."""
        return self._send(method, path, data, "application/x-shoal-wire", timeout=timeout)

    def _send(
        self,
        method: str,
        path: str,
        data: bytes | None,
        content_type: str,
        *,
        timeout: float | None = None,
    ) -> bytes:
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": content_type},
        )
        seconds = self.timeout if timeout is None else timeout
        try:
            with urllib.request.urlopen(request, timeout=seconds, context=self._ssl) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode("utf-8", "replace")
            failure = None
            try:
                body = json.loads(text)
                message = body.get("error", text)
                failure = body.get("failure")
            except (ValueError, AttributeError):
                message = text
            if exc.code == 401:
                raise AuthenticationError(f"{message} (HTTP 401)") from None
            if failure is None and exc.code == 403 and "released" in str(message):
                raise ReleaseRefused(str(message)) from None
            raise DatasiteError(
                exc.code, str(message), failure=failure if isinstance(failure, str) else None
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, TimeoutError) or isinstance(
                getattr(exc, "reason", None), TimeoutError
            ):
                raise DatasiteTimeout(
                    f"the datasite at {self.url} did not answer within {seconds:g} s"
                ) from None
            raise TransportError(f"cannot reach the datasite at {self.url}: {exc}") from None
        return bytes(payload)

    # -- what a data scientist uses --------------------------------------------------------

    @property
    def datasets(self) -> list[dict[str, Any]]:
        """Every dataset: name, description, schema, DP metadata, mock origin."""
        return list(self.call("GET", "/api/datasets"))

    def mock(self, name: str) -> Any:
        """A dataset's mock table, to write and try code against."""
        from shoal.datasite.table import decode_table

        return decode_table(self.call("GET", f"/api/datasets/{name}/mock", raw=True))

    def submit(
        self,
        fn: Callable[..., Any] | str,
        *,
        assets: Sequence[str],
        params: Mapping[str, Any] | None = None,
        policy: str | Mapping[str, Any] = "review",
        entrypoint: str | None = None,
        name: str | None = None,
    ) -> RemoteRequest:
        """Submit ``fn(assets, **params)`` for review; it runs on mock data right away."""
        source, entry = source_of(fn, entrypoint)
        body = {
            "source": source,
            "entrypoint": entry,
            "assets": list(assets),
            "params": dict(params or {}),
            "policy": policy,
            "name": name or entry,
        }
        info = self.call("POST", "/api/requests", body)
        return RemoteRequest(self, int(info["id"]), info)

    def request(self, rid: int) -> RemoteRequest:
        return RemoteRequest(self, rid, self.call("GET", f"/api/requests/{rid}"))

    def requests(self, state: str | None = None) -> list[dict[str, Any]]:
        q = f"?state={state}" if state else ""
        return list(self.call("GET", f"/api/requests{q}"))

    def budget(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/api/budget"))

    # -- what an owner uses ----------------------------------------------------------------

    def approve(self, rid: int, code_hash: str, reason: str = "") -> dict[str, Any]:
        return dict(
            self.call(
                "POST", f"/api/requests/{rid}/approve", {"code_hash": code_hash, "reason": reason}
            )
        )

    def deny(self, rid: int, reason: str) -> dict[str, Any]:
        return dict(self.call("POST", f"/api/requests/{rid}/deny", {"reason": reason}))

    def release(self, rid: int, reason: str = "") -> dict[str, Any]:
        return dict(self.call("POST", f"/api/requests/{rid}/release", {"reason": reason}))

    def withhold(self, rid: int, reason: str) -> dict[str, Any]:
        return dict(self.call("POST", f"/api/requests/{rid}/withhold", {"reason": reason}))


def source_of(fn: Callable[..., Any] | str, entrypoint: str | None) -> tuple[str, str]:
    """The function's source text and name (or a source string and its entrypoint)."""
    if isinstance(fn, str):
        if not entrypoint:
            raise ConfigError("with source text, name its function: entrypoint='...'")
        return fn, entrypoint
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise ConfigError(
            f"cannot read the source of {fn!r}; define it in a file, or pass the source text"
        ) from None
    return source, entrypoint or fn.__name__


class RemoteRequest:
    """A submitted request: its state, mock result and (once released) result."""

    def __init__(self, site: Datasite, rid: int, info: Mapping[str, Any] | None = None) -> None:
        self.site = site
        self.id = rid
        self.info = dict(info or {})

    def __repr__(self) -> str:
        return f"RemoteRequest(id={self.id}, status={self.info.get('state')!r})"

    def refresh(self) -> dict[str, Any]:
        self.info = dict(self.site.call("GET", f"/api/requests/{self.id}"))
        return self.info

    @property
    def status(self) -> str:
        """The request's state now (submitted, mock-run, approved, ..., released)."""
        got = self.site.call("GET", f"/api/requests/{self.id}/status")
        self.info["state"] = got["state"]
        self.info["reason"] = got["reason"]
        return str(got["state"])

    @property
    def code_hash(self) -> str:
        return str(self.info.get("code_hash") or self.refresh()["code_hash"])

    def wait(self, states: Sequence[str] = FINAL, *, timeout: float = 120.0) -> str:
        """Poll until the request reaches one of ``states``; returns that state."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            state = self.status
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"request {self.id} is still {state} after {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def mock_result(self, *, timeout: float = 120.0) -> dict[str, Any]:
        """The result on mock data (waits for the mock run)."""
        from shoal.wire import decode

        self.wait(
            ("mock-run", *FINAL, "approved", "queued", "running", "succeeded"), timeout=timeout
        )
        return decode(self.site.call("GET", f"/api/requests/{self.id}/mock", raw=True))

    def result(self, *, timeout: float = 300.0) -> dict[str, Any]:
        """The released result; raises ReleaseRefused if it was denied, withheld or failed."""
        from shoal.wire import decode

        state = self.wait(timeout=timeout)
        if state != "released":
            raise ReleaseRefused(
                f"request {self.id} ended {state}: {self.info.get('reason') or 'no result'}"
            )
        return decode(self.site.call("GET", f"/api/requests/{self.id}/result", raw=True))
