"""Release policies: how each field of a task's result may leave the node.

A task's owner declares, per field name or fnmatch pattern, one kind (weakest first):
``clear``, ``secure`` (only into a secure-sum protocol), ``noised`` (only with noise the node
adds or checks against a charge to its ledger), ``sealed:<role>[,<role>...]`` (only as a
ciphertext or share forwarded to those roles) or ``never``. Exact names win over patterns,
patterns apply in declaration order, and a field no entry matches is ``never``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from shoal.errors import ConfigError, ReleaseRefused

__all__ = ["KINDS", "USES", "Release", "ReleasePolicy", "Route", "Use"]

Kind = Literal["clear", "secure", "noised", "sealed", "never"]
KINDS: tuple[str, ...] = ("clear", "secure", "noised", "sealed", "never")

# How a value is about to leave: in the clear (a reply, a receipt's send, a fetch), as the
# input of a secure sum, or forwarded sealed to a role.
Use = Literal["clear", "secure", "forward"]
USES: tuple[str, ...] = ("clear", "secure", "forward")

_ROLE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Release:
    """One field's release kind; ``roles`` only for ``sealed``."""

    kind: Kind
    roles: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return f"sealed:{','.join(sorted(self.roles))}" if self.kind == "sealed" else self.kind


_CLEAR = Release("clear")
_NEVER = Release("never")


@dataclass(frozen=True)
class Route:
    """What a policy says of some fields about to leave by one use (see ``route``)."""

    refused: tuple[tuple[str, str], ...]  # (field, its kind) of those that may not leave so
    noised: tuple[str, ...]  # may leave only with the noise their charge bound
    secure: tuple[str, ...]  # ``secure`` fields entering a secure sum
    free: bool = False  # none of the above: the fields leave by this use as they are


def _parse_kind(text: object, where: str) -> Release:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: a release kind is a string, got {text!r}")
    kind, colon, roles = text.partition(":")
    kind = kind.strip()
    if kind == "sealed":
        names = frozenset(r.strip() for r in roles.split(",") if r.strip())
        if not colon or not names:
            raise ConfigError(
                f"{where}: 'sealed' names the roles it may go to, e.g. 'sealed:host,arbiter'"
            )
        bad = sorted(r for r in names if not _ROLE.match(r))
        if bad:
            raise ConfigError(f"{where}: role names are letters, digits, '_', '.', '-': {bad}")
        return Release("sealed", names)
    if colon or kind not in KINDS:
        raise ConfigError(
            f"{where}: unknown release kind {text!r}; use one of clear, secure, noised, "
            "sealed:<role>[,<role>...], never"
        )
    return Release(kind)  # type: ignore[arg-type]


class ReleasePolicy:
    """A task's parsed, validated release policy; lookups are cached per field name.

    >>> policy = ReleasePolicy({"n": "clear", "d/*": "secure"}, task="train")
    >>> str(policy.kind_of("d/w")), str(policy.kind_of("secret"))
    ('secure', 'never')
    """

    __slots__ = ("_cache", "_checked", "_exact", "_patterns", "_routes", "all_clear", "task")

    def __init__(self, spec: Mapping[str, str], *, task: str) -> None:
        where = f"release policy of task {task!r}"
        if not isinstance(spec, Mapping) or not spec:
            raise ConfigError(
                f"{where} names no field; declare each result field, e.g. "
                "release={'n': 'clear', 'delta': 'secure'}"
            )
        self.task = task
        self._exact: dict[str, Release] = {}
        self._patterns: list[tuple[re.Pattern[str], Release]] = []
        for name, text in spec.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where}: field names are non-empty strings, got {name!r}")
            release = _parse_kind(text, f"{where}, field {name!r}")
            if any(c in name for c in "*?["):
                self._patterns.append((re.compile(fnmatch.translate(name)), release))
            else:
                self._exact[name] = release
        releases = [*self._exact.values(), *(r for _, r in self._patterns)]
        self.all_clear = all(r.kind == "clear" for r in releases) and any(
            p.pattern == fnmatch.translate("*") for p, _ in self._patterns
        )
        self._cache: dict[str, Release] = {}
        # What was allowed (check_clear) and how fields route (route), per distinct request:
        # every node of a round asks the same, so each answer is worked out once.
        self._checked: set[tuple[str, tuple[str, ...]]] = set()
        self._routes: dict[tuple[Use, str | None, tuple[str, ...]], Route] = {}

    @classmethod
    def clear(cls, *, task: str) -> ReleasePolicy:
        """Every field in the clear: what a task that declares nothing gets."""
        return cls({"*": "clear"}, task=task)

    def kind_of(self, field: str) -> Release:
        found = self._cache.get(field)
        if found is not None:
            return found
        found = self._exact.get(field)
        if found is None:
            found = next((r for p, r in self._patterns if p.match(field)), _NEVER)
        if len(self._cache) < 4096:  # bounded: field names come from the task, not the wire
            self._cache[field] = found
        return found

    def kinds(self, fields: Iterable[str]) -> dict[str, Release]:
        return {f: self.kind_of(f) for f in fields}

    def check_clear(self, fields: tuple[str, ...], *, path: str, noised: bool = False) -> None:
        """Raise ReleaseRefused unless every field may leave in the clear; ``noised``: the
        task added the noise its charge bound in full, so ``noised`` fields may too."""
        how = "clear+noised" if noised else "clear"
        if self.all_clear or (how, fields) in self._checked:
            return
        refused = {
            f: str(r)
            for f in fields
            if (r := self.kind_of(f)) != _CLEAR and not (noised and r.kind == "noised")
        }
        if refused:
            raise ReleaseRefused(
                f"task {self.task!r} releases {_describe(refused)}, not in the clear, so "
                f"the node refuses to send {sorted(refused)} by {path}; aggregate them with "
                "the protocol their policy names"
            )
        if len(self._checked) < 1024:
            self._checked.add((how, fields))

    def route(self, fields: tuple[str, ...], use: Use, role: str | None = None) -> Route:
        """How ``fields`` may leave by ``use`` (to ``role``, for a forward): which are refused,
        which need their charged noise, which join a secure sum."""
        key = (use, role, fields)
        found = self._routes.get(key)
        if found is not None:
            return found
        refused: list[tuple[str, str]] = []
        noised: list[str] = []
        secure: list[str] = []
        for name in fields:
            release = self.kind_of(name)
            kind = release.kind
            if kind == "clear":
                continue
            if kind == "secure" and use == "secure":
                secure.append(name)
            elif kind == "sealed" and use == "forward" and role in release.roles:
                continue
            elif kind == "noised" and use in ("clear", "secure"):
                noised.append(name)
            else:
                refused.append((name, str(release)))
        found = Route(
            refused=tuple(refused),
            noised=tuple(noised),
            secure=tuple(secure),
            free=not (refused or noised or secure),
        )
        if len(self._routes) < 1024:  # bounded: a coordinator chooses the fields it asks for
            self._routes[key] = found
        return found

    def __repr__(self) -> str:
        entries = [f"{k!r}: '{v}'" for k, v in self._exact.items()]
        entries += [f"{p.pattern!r}: '{v}'" for p, v in self._patterns]
        return f"ReleasePolicy({{{', '.join(entries)}}}, task={self.task!r})"


def _describe(refused: Mapping[str, str]) -> str:
    return ", ".join(f"{f!r} as {k}" for f, k in sorted(refused.items()))
