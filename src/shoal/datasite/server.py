"""The datasite's HTTP API (FastAPI) and the owner's web page; ``serve`` runs it with uvicorn.

Every route finds the caller from ``Authorization: Bearer TOKEN`` and hands the work to
``Service``, which authorizes by role. Errors map to 4xx with a message: malformed JSON,
wrong types, unknown ids, wrong roles, stale hashes. Nothing a client sends makes a 500.
"""

# ruff: noqa: E402  (the extra is checked, with a clear error, before FastAPI is imported)
import ipaddress
import json
import logging
import ssl
from pathlib import Path
from typing import Annotated, Any

from shoal.datasite._deps import fastapi, uvicorn

fastapi()  # a clear error naming the extra when it is missing
# FastAPI reads the routes' annotations, so these names must live at module level
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.datasite.sandbox import SandboxLimits
from shoal.datasite.service import Conflict, Forbidden, NodeFailure, NotFound, Service, User
from shoal.datasite.state import DatasiteState
from shoal.errors import (
    AuthenticationError,
    ConfigError,
    PrivacyBudgetExceeded,
    ProtocolError,
    ReleaseRefused,
    ShoalError,
)

__all__ = ["create_app", "is_loopback", "serve"]

WIRE = "application/x-shoal-wire"
MAX_BODY = 1 << 20
PAGE = Path(__file__).with_name("page.html")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _status(exc: Exception) -> int:
    if isinstance(exc, AuthenticationError):
        return 401
    if isinstance(exc, (Forbidden, ReleaseRefused)):
        return 403
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, (Conflict, PrivacyBudgetExceeded, ProtocolError)):
        return 409
    return 400


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self' 'unsafe-inline'; "
        b"style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
    ),
]


_TOO_LARGE = f"bodies are limited to {MAX_BODY} bytes"


class _TooLarge(Exception):
    """A body passed MAX_BODY while it was read (the guard answers 413 and closes)."""


class _Guard:
    """Every response: a body size limit, security headers, and an unexpected failure in one
    request answered as that request's error, never as a crash (pure ASGI: Starlette's
    ``BaseHTTPMiddleware`` costs more than the status poll it wraps)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            response = JSONResponse({"error": f"bodies are limited to {MAX_BODY} bytes"}, 413)
            await response(scope, receive, send)
            return
        started = False
        received = 0

        async def receive_counted() -> Any:
            # a chunked body has no Content-Length to check up front: count its bytes as they
            # arrive and stop at the limit, so a route reading its body never holds more
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY:
                    raise _TooLarge
            return message

        async def send_with_headers(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, receive_counted, send_with_headers)
        except _TooLarge:
            if not started:
                # and close the connection: the rest of the body is never read
                close = {"connection": "close"}
                response = JSONResponse({"error": _TOO_LARGE}, 413, headers=close)
                await response(scope, receive, send_with_headers)
        except Exception as exc:
            logging.getLogger("shoal.datasite").exception("request failed")
            if not started:
                error = {"error": f"the datasite failed on this request: {exc}"}
                await JSONResponse(error, 400)(scope, receive, send_with_headers)


def create_app(service: Service) -> Any:
    """The FastAPI application for one datasite."""
    app = FastAPI(title="shoal datasite", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ShoalError)
    async def _shoal_error(_request: Request, exc: ShoalError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_status(exc))

    @app.exception_handler(NodeFailure)
    async def _node_failure(_request: Request, exc: NodeFailure) -> JSONResponse:
        # the Engine contract's failure kind travels with the message
        status = 409 if exc.kind == "error" else 403
        return JSONResponse({"error": str(exc), "failure": exc.kind}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"malformed request: {exc.errors()!s:.500}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    app.add_middleware(_Guard)

    # async, so that authenticating (a dictionary look-up once the token is known) does not
    # cost a hop to the thread pool on every call
    async def user(request: Request) -> User:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("send Authorization: Bearer <your datasite token>")
        return service.authenticate(token.strip())

    Caller = Annotated[User, Depends(user)]

    async def body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ConfigError(f"bodies are limited to {MAX_BODY} bytes")
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ConfigError(f"the body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"the body must be a JSON object, got {type(value).__name__}")
        return value

    def wire(data: bytes) -> Response:
        return Response(content=data, media_type=WIRE)

    def text(value: Any, name: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")
        return value[:2000]

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/api/whoami")
    def whoami(u: Caller) -> dict[str, Any]:
        return {"name": u.name, "role": u.role}

    @app.get("/api/users")
    def users(u: Caller) -> list[dict[str, Any]]:
        return service.users(u)

    @app.post("/api/users")
    async def add_user(request: Request, u: Caller) -> dict[str, Any]:
        service.require(u, "owner")  # before the body is read: a guest's body is never read
        b = await body(request)
        token = service.add_user(u, text(b.get("name"), "name"), text(b.get("role"), "role"))
        return {"name": b.get("name"), "role": b.get("role"), "token": token}

    @app.get("/api/datasets")
    def datasets(u: Caller) -> list[dict[str, Any]]:
        return service.datasets(u)

    @app.post("/api/datasets")
    async def add_dataset(request: Request, u: Caller) -> dict[str, Any]:
        service.require(u, "owner")
        return service.add_dataset(u, await body(request))

    @app.get("/api/datasets/{name}")
    def dataset(name: str, u: Caller) -> dict[str, Any]:
        return service.dataset(u, name)

    @app.get("/api/datasets/{name}/mock")
    def mock(name: str, u: Caller) -> Response:
        return wire(service.mock_bytes(u, name))

    @app.post("/api/requests")
    async def submit(request: Request, u: Caller) -> dict[str, Any]:
        service.require(u, "scientist", "owner")
        return service.submit(u, await body(request))

    @app.get("/api/requests")
    def requests(u: Caller, state: str | None = None) -> list[dict[str, Any]]:
        return service.requests(u, state=state)

    @app.get("/api/requests/{rid}")
    def request_(rid: int, u: Caller) -> dict[str, Any]:
        return service.request(u, rid)

    @app.get("/api/requests/{rid}/status")
    async def status(rid: int, u: Caller) -> dict[str, Any]:
        # what clients poll: one small indexed read, done on the event loop
        return service.status(u, rid)

    @app.get("/api/requests/{rid}/diff")
    def diff(rid: int, u: Caller) -> dict[str, Any]:
        return service.diff(u, rid)

    @app.post("/api/requests/{rid}/approve")
    async def approve(rid: int, request: Request, u: Caller) -> dict[str, Any]:
        service.require(u, "owner")
        b = await body(request)
        return service.decide(
            u,
            rid,
            approve=True,
            code_hash=text(b.get("code_hash"), "code_hash"),
            reason=text(b.get("reason"), "reason"),
        )

    @app.post("/api/requests/{rid}/deny")
    async def deny(rid: int, request: Request, u: Caller) -> dict[str, Any]:
        service.require(u, "owner")
        b = await body(request)
        return service.decide(
            u, rid, approve=False, code_hash=None, reason=text(b.get("reason"), "reason")
        )

    @app.post("/api/requests/{rid}/release")
    async def release(rid: int, request: Request, u: Caller) -> dict[str, Any]:
        service.require(u, "owner")
        b = await body(request)
        return service.release(u, rid, release=True, reason=text(b.get("reason"), "reason"))

    @app.post("/api/requests/{rid}/withhold")
    async def withhold(rid: int, request: Request, u: Caller) -> dict[str, Any]:
        service.require(u, "owner")
        b = await body(request)
        return service.release(u, rid, release=False, reason=text(b.get("reason"), "reason"))

    @app.get("/api/requests/{rid}/result")
    def result(rid: int, u: Caller) -> Response:
        return wire(service.result_bytes(u, rid, kind="real"))

    @app.get("/api/requests/{rid}/mock")
    def mock_result(rid: int, u: Caller) -> Response:
        return wire(service.result_bytes(u, rid, kind="mock"))

    @app.get("/api/requests/{rid}/preview/{kind}")
    def preview(rid: int, kind: str, u: Caller) -> dict[str, Any]:
        if kind not in ("mock", "real"):
            raise NotFound("preview mock or real")
        return service.preview(u, rid, kind)

    @app.get("/api/jobs")
    def jobs(u: Caller) -> list[dict[str, Any]]:
        return service.jobs(u)

    @app.get("/api/jobs/{jid}/logs")
    def logs(jid: int, u: Caller) -> dict[str, Any]:
        return {"job": jid, "logs": service.job_logs(u, jid)}

    @app.post("/api/jobs/{jid}/kill")
    def kill(jid: int, u: Caller) -> dict[str, Any]:
        return service.kill(u, jid)

    @app.get("/api/identity")
    def identity(u: Caller) -> dict[str, str]:
        return service.identity_info()

    @app.post("/api/requests/{rid}/node")
    async def node(
        rid: int, request: Request, u: Caller, task: str, task_id: str, keep_as: str | None = None
    ) -> Response:
        service.require(u, "scientist", "owner")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ConfigError(f"bodies are limited to {MAX_BODY} bytes")
        # SecAgg+ phases expand masks and agree keys: off the event loop
        reply = await run_in_threadpool(
            service.node_task, u, rid, task=task, task_id=task_id, keep_as=keep_as, body=raw
        )
        return wire(reply)

    @app.get("/api/budget")
    def budget(u: Caller) -> list[dict[str, Any]]:
        return service.budget(u)

    @app.get("/api/audit")
    def audit(u: Caller, limit: int = 200) -> list[dict[str, Any]]:
        return service.audit(u, max(1, min(limit, 10_000)))

    @app.get("/api/audit/verify")
    def verify(u: Caller, anchor: str | None = None) -> dict[str, Any]:
        return service.verify(u, anchor)

    return app


def serve(
    directory: str | Path,
    *,
    host: str,
    port: int,
    certs: str | Path | None = None,
    insecure: bool = False,
    limits: SandboxLimits | None = None,
    ready: Any = None,
) -> None:
    """Serve the datasite in ``directory`` until interrupted (TLS unless ``insecure``)."""
    if insecure and not is_loopback(host):
        raise ConfigError(
            f"--insecure serves plain HTTP and is allowed only on a loopback address, not "
            f"{host!r}; give --certs (from `shoal certs`) to serve other hosts"
        )
    tls: ssl.SSLContext | None = None
    if not insecure:
        cert_dir = Path(certs) if certs else Path(directory) / "certs"
        cert, key = cert_dir / "coordinator.pem", cert_dir / "coordinator-key.pem"
        if not cert.is_file() or not key.is_file():
            raise ConfigError(
                f"no TLS certificate in {str(cert_dir)!r}; make one with `shoal certs --out "
                f"{cert_dir} --host NAME`, or `shoal datasite init` does it"
            )
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            tls.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"the TLS files in {str(cert_dir)!r} are unusable ({exc}); make new ones "
                f"with `shoal certs --out {cert_dir} --host NAME`"
            ) from None
    state = DatasiteState(directory)
    service = Service(state, limits=limits)
    app = create_app(service)
    uv = uvicorn()
    from shoal.datasite.guard import BACKLOG, guarded

    # h11 with deadlines for the TLS handshake and request headers, and bounds on idle
    # connections; it does TLS itself, so uvicorn is given no certificate (guard.py)
    config = uv.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        http=guarded(tls),
        backlog=BACKLOG,  # asyncio accepts up to this many at once: within the guard's reserve
    )
    server = uv.Server(config)
    try:
        server.run()
    finally:
        service.close()
        state.close()
