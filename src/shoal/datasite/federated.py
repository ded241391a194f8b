"""Federated requests: the same code at several datasites, combined by SecAgg+ only.

The scientist submits one request (same code hash) to each datasite with the policy
``secure-sum``, naming every participating site and its Ed25519 identity key; each owner
approves on their own; each site runs the code in its sandbox. The sites then act as shoal
nodes (:mod:`shoal.datasite.node`): the scientist's client is a shoal coordinator whose
engine, :class:`SiteEngine`, sends each task over the site's HTTPS API. A ``Federation``
maps the site's hold task (the result is kept at the site under release policy ``secure``)
and aggregates with ``Clip | DistributedNoise | SecureSum``: the scientist learns the sum
of the sites that took part, and nothing else. Sites sign their SecAgg+ keys with their
identity key and check their peers' signatures, so a scientist cannot stand in for a site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.errors import ConfigError, ReleaseRefused, TransportError
from shoal.runtime.engine import (
    DispatchResult,
    Failure,
    FailureKind,
    Reply,
    Task,
    check_dispatch,
)

if TYPE_CHECKING:
    from shoal.datasite.client import Datasite, RemoteRequest

__all__ = [
    "HOLD_TASK",
    "FederatedRequest",
    "SiteEngine",
    "SiteIdentity",
    "check_federation",
    "submit_federated",
]

IDENTITY_FILE = "identity.key"
# The site's task that keeps an approved request's result at the site (policy: secure).
HOLD_TASK = "datasite.hold"
# How a site's node endpoint names a failure (a JSON field of its error answer).
FAILURE_FIELD = "failure"
_KINDS = {k.value: k for k in (FailureKind.REJECTED, FailureKind.DECLINED, FailureKind.ERROR)}


class SiteIdentity:
    """A datasite's name and Ed25519 key: it signs the SecAgg keys the site publishes."""

    def __init__(self, *, name: str, key: Ed25519PrivateKey) -> None:
        self.name = name
        self._key = key

    @classmethod
    def load_or_create(cls, directory: str | Path, name: str) -> SiteIdentity:
        path = Path(directory) / IDENTITY_FILE
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ConfigError(f"{path} is not an Ed25519 key")
        else:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            path.touch(mode=0o600)
            path.write_bytes(pem)
        return cls(name=name, key=key)

    @property
    def public_hex(self) -> str:
        return self._key.public_key().public_bytes_raw().hex()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def verify(public_hex: str, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_federation(value: Any, *, me: str, my_key: str) -> dict[str, Any]:
    """The federation part of a ``secure-sum`` policy, checked; this site must be in it."""
    if not isinstance(value, Mapping):
        raise ConfigError("a secure-sum policy needs a federation: sites, shape, clip")
    sites = value.get("sites")
    if not isinstance(sites, Mapping) or len(sites) < 3:
        raise ConfigError(
            "federation.sites must map at least 3 site names to their identity keys (with two, "
            "the sum would reveal each input to the other)"
        )
    for name, key in sites.items():
        if not isinstance(name, str) or not isinstance(key, str) or len(key) != 64:
            raise ConfigError("federation.sites maps names to 64-hex-digit Ed25519 keys")
    if sites.get(me) != my_key:
        raise ConfigError(
            f"this datasite ({me!r}, key {my_key[:16]}...) is not among federation.sites with "
            "its own key; take the keys from each site's /api/identity"
        )
    shape = value.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        or math.prod(shape) > 1 << 20
    ):
        raise ConfigError("federation.shape is a list of positive ints (at most 2**20 numbers)")
    clip = value.get("clip")
    noise = value.get("noise_multiplier", 0.0)
    for label, number, low in (("clip", clip, 0.0), ("noise_multiplier", noise, -1e-300)):
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"federation.{label} must be a number")
        if not (math.isfinite(number) and number > low):
            raise ConfigError(
                f"federation.{label} must be finite and {'> 0' if low == 0 else '>= 0'}"
            )
    min_sites = value.get("min_sites", len(sites))
    if (
        isinstance(min_sites, bool)
        or not isinstance(min_sites, int)
        or not 3 <= min_sites <= len(sites)
    ):
        raise ConfigError(
            f"federation.min_sites is the fewest sites a sum may combine: an int from 3 to "
            f"{len(sites)}, got {min_sites!r}"
        )
    extra = set(value) - {"sites", "shape", "clip", "noise_multiplier", "min_sites"}
    if extra:
        raise ConfigError(f"unknown federation fields {sorted(extra)}")
    return {
        "sites": {k: sites[k] for k in sorted(sites)},
        "shape": list(shape),
        "clip": float(clip),  # type: ignore[arg-type]
        "noise_multiplier": float(noise),
        "min_sites": min_sites,
    }


def total_noise_std(federation: Mapping[str, Any]) -> float:
    """The Gaussian std a secure sum's shares must add up to, over the group a site sees.

    The ledger is charged for noise multiplier z (std z * clip on the sum). Every site adds
    its share for the group it validated; so that the sum still carries z * clip when only
    ``min_sites`` of the ``N`` sites survive, the shares are sized for a total of
    z * clip * sqrt(N / min_sites) (exactly z * clip when every site must take part).
    """
    z, clip = float(federation["noise_multiplier"]), float(federation["clip"])
    scale = math.sqrt(len(federation["sites"]) / int(federation["min_sites"]))
    return z * clip * scale


# -- the scientist's side: a coordinator whose nodes are datasites --------------------------


class SiteEngine:
    """An :class:`~shoal.runtime.Engine` whose nodes are datasites.

    Each task is one HTTPS call to ``/api/requests/{id}/node`` at the site, authenticated
    as the scientist who submitted request ``id`` there; the site hands it to its NodeApp,
    which decides (and audits) what may leave. Node ids are the sites' names.
    """

    def __init__(self, requests: Mapping[str, RemoteRequest]) -> None:
        if not requests:
            raise ConfigError("a SiteEngine needs at least one site")
        self._requests = dict(sorted(requests.items()))

    def node_ids(self) -> Sequence[str]:
        return tuple(self._requests)

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        check_dispatch(
            tasks, deadline_s, known=self._requests, noun="site", where="in this federated request"
        )
        outcomes: dict[str, Reply | Failure] = {}
        if tasks:
            # Threads that outlive the deadline are left to finish on their own (their
            # answer is discarded): a hung site must not hold up the others.
            pool = futures.ThreadPoolExecutor(len(tasks), thread_name_prefix="shoal-site")
            try:
                running = {pool.submit(self._call, t, deadline_s): t for t in tasks}
                done, late = futures.wait(running, timeout=deadline_s)
                for future in done:
                    outcomes[running[future].node_id] = future.result()
                for future in late:
                    task = running[future]
                    outcomes[task.node_id] = _failure(
                        task, FailureKind.TIMEOUT, f"no answer within {deadline_s} s"
                    )
            finally:
                pool.shutdown(wait=False)
        replies = {}
        failures = {}
        for task in tasks:  # task order, whatever the arrival order
            outcome = outcomes[task.node_id]
            if isinstance(outcome, Reply):
                replies[task.node_id] = outcome
            else:
                failures[task.node_id] = outcome
        return DispatchResult(replies=replies, failures=failures)

    def _call(self, task: Task, deadline_s: float) -> Reply | Failure:
        import time
        import urllib.parse

        from shoal.datasite.client import DatasiteError, DatasiteTimeout

        request = self._requests[task.node_id]
        query = {"task": task.name, "task_id": task.task_id}
        if task.keep_as is not None:
            query["keep_as"] = task.keep_as
        path = f"/api/requests/{request.id}/node?{urllib.parse.urlencode(query)}"
        started = time.perf_counter()
        try:
            payload = request.site.call_bytes("POST", path, bytes(task.payload), timeout=deadline_s)
        except DatasiteError as exc:
            kind = _KINDS.get(exc.failure or "", FailureKind.REJECTED)
            return _failure(task, kind, exc.message)
        except DatasiteTimeout as exc:
            return _failure(task, FailureKind.TIMEOUT, str(exc))
        except TransportError as exc:
            return _failure(task, FailureKind.DROPPED, str(exc))
        except ReleaseRefused as exc:  # the client's own reading of a 403
            return _failure(task, FailureKind.REJECTED, str(exc))
        elapsed = time.perf_counter() - started
        return Reply(node_id=task.node_id, task_id=task.task_id, payload=payload, elapsed_s=elapsed)

    def close(self) -> None:
        """Nothing to release: each dispatch's threads and connections end with it."""


def _failure(task: Task, kind: FailureKind, detail: str) -> Failure:
    return Failure(node_id=task.node_id, task_id=task.task_id, kind=kind, detail=detail)


class FederatedRequest:
    """The same request at every site; ``result()`` runs the secure sum once they have run.

    After ``result()``, ``included`` lists the sites whose value is in the sum and
    ``excluded`` the others with the reason (not approved, failed, dropped out).
    """

    def __init__(self, requests: Mapping[str, RemoteRequest], federation: Mapping[str, Any]):
        self.requests = dict(requests)
        self.federation = dict(federation)
        self.included: tuple[str, ...] = ()
        self.excluded: dict[str, str] = {}

    @property
    def status(self) -> dict[str, str]:
        return {name: r.status for name, r in self.requests.items()}

    @property
    def code_hash(self) -> str:
        hashes = {r.code_hash for r in self.requests.values()}
        if len(hashes) != 1:
            from shoal.errors import ProtocolError

            raise ProtocolError(f"the sites hold different code hashes: {sorted(hashes)}")
        return hashes.pop()

    def engine(self, sites: Sequence[str] | None = None) -> SiteEngine:
        """The engine reaching these sites' nodes (all by default) for this request."""
        names = list(self.requests) if sites is None else list(sites)
        return SiteEngine({n: self.requests[n] for n in names})

    def result(
        self, *, timeout: float = 300.0, bits: int = 32, deadline_s: float = 120.0
    ) -> np.ndarray:
        """Wait until every site has decided and run the code, then combine the results of
        the sites that succeeded with SecAgg+ (at least ``min_sites`` of them must)."""
        from shoal.aggregate import Clip
        from shoal.core import Federation
        from shoal.crypto.secagg import SecureSum
        from shoal.privacy.stages import DistributedNoise

        self.excluded = {}
        ready = []
        for name, request in sorted(self.requests.items()):
            state = request.wait(
                ("succeeded", "denied", "failed", "timeout", "out-of-memory", "withheld"),
                timeout=timeout,
            )
            if state == "succeeded":
                ready.append(name)
            else:
                self.excluded[name] = f"{state}: {request.info.get('reason') or ''}".strip()
        fed = self.federation
        needed = int(fed["min_sites"])
        if len(ready) < needed:
            raise ReleaseRefused(
                f"only {len(ready)} site(s) ran the request ({', '.join(ready) or 'none'}), "
                f"fewer than the federation's min_sites {needed}: {self.excluded}"
            )
        engine = self.engine(ready)
        try:
            federation = Federation(engine, min_nodes=needed, deadline_s=deadline_s)
            held = federation.group(ready).map(HOLD_TASK)
            for name, failure in held.failures.items():
                self.excluded[name] = f"{failure.kind.value}: {failure.detail}"
            n = len(held)
            # SecAgg+ tolerates d dropouts with n >= 2d + 2; never fewer than min_sites left
            dropouts = max(0, min(n - needed, (n - 2) // 2))
            clip = float(fed["clip"])
            total = total_noise_std(fed)
            share = total / math.sqrt(n)
            chain: Any = Clip(clip)
            if total > 0:
                chain = chain | DistributedNoise(total_std=total, nodes=n)
            secure = SecureSum(
                value_range=clip + 8.0 * share, bits=bits, dropout_fraction=dropouts / n
            )
            combined = held["result"].aggregate(chain | secure)
            self.excluded.update(held.exclusions)
            self.included = tuple(s for s in held.node_ids if s not in held.exclusions)
        finally:
            engine.close()
        return np.asarray(combined, dtype=np.float64).reshape(fed["shape"])


def submit_federated(
    sites: Sequence[Datasite],
    fn: Any,
    *,
    assets: Sequence[str],
    shape: Sequence[int],
    clip: float,
    noise_multiplier: float = 0.0,
    min_sites: int | None = None,
    params: Mapping[str, Any] | None = None,
    entrypoint: str | None = None,
    name: str | None = None,
) -> FederatedRequest:
    """Submit ``fn`` to every site under one code hash. ``fn`` returns ``{"result": array}``
    of ``shape``; each site clips it to L2 norm ``clip`` before the secure sum; with
    ``noise_multiplier`` z the sum carries Gaussian noise of std at least z * clip, added
    in shares by the sites and charged to each site's ledger. ``min_sites`` (default: all)
    is the fewest sites the sum may combine: sites that are not approved, fail or drop out
    are left out down to that number."""
    identities = {}
    for site in sites:
        got = site.call("GET", "/api/identity")
        identities[str(got["name"])] = (site, str(got["public_key"]))
    if len(identities) != len(sites):
        raise ConfigError("two of the sites have the same name")
    federation = {
        "sites": {n: k for n, (_, k) in sorted(identities.items())},
        "shape": [int(d) for d in shape],
        "clip": float(clip),
        "noise_multiplier": float(noise_multiplier),
        "min_sites": len(identities) if min_sites is None else int(min_sites),
    }
    policy = {"kind": "secure-sum", "federation": federation}
    requests = {
        n: site.submit(
            fn, assets=assets, params=params, policy=policy, entrypoint=entrypoint, name=name
        )
        for n, (site, _) in identities.items()
    }
    out = FederatedRequest(requests, federation)
    out.code_hash  # noqa: B018 (checks that every site computed the same hash)
    return out
