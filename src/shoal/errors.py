"""One exception tree for all of shoal.

Every error shoal raises on purpose is a ``ShoalError``; each leaf also subclasses the
builtin a caller would naturally catch (``ValueError``, ``ConnectionError``, ...).
Messages say what was wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AggregationError",
    "AuthenticationError",
    "ConfigError",
    "DataError",
    "NodeStateError",
    "NotEnoughNodes",
    "PlaintextOverflow",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "QueryError",
    "ReleaseRefused",
    "ShoalError",
    "StoreError",
    "TaskError",
    "TransportError",
    "UnknownTask",
    "UnsafeModelError",
    "WireError",
]


class ShoalError(Exception):
    """Root of every error shoal raises deliberately."""


class WireError(ShoalError, ValueError):
    """Bytes or a payload that the wire format cannot encode or refuses to decode."""


class ConfigError(ShoalError, ValueError):
    """A job file, CLI option or constructor argument that is invalid."""


class DataError(ShoalError, ValueError):
    """A data set or data file that cannot be used (missing values, bad labels, empty node)."""


class AggregationError(ShoalError, ValueError):
    """Node values that cannot be aggregated (shapes, dtypes, non-finite values)."""


class ProtocolError(ShoalError, RuntimeError):
    """A multi-step protocol (a round, secure aggregation) that cannot complete correctly."""


class NotEnoughNodes(ProtocolError):
    """Fewer nodes answered (or survived validation) than the round's stated minimum."""


class TaskError(ShoalError, RuntimeError):
    """A task raised at a node; carries the node's message, never its traceback objects."""


class UnknownTask(TaskError, LookupError):
    """A node was asked to run a task its owner never registered."""


class TransportError(ShoalError, ConnectionError):
    """The network or the remote side failed (connection, deadline, message limits)."""


class AuthenticationError(TransportError, PermissionError):
    """A peer that is not admitted, a bad signature, a replayed or stale request."""


class StoreError(ShoalError, RuntimeError):
    """The coordinator's durable store is missing, corrupt, or lacks the requested record."""


class PrivacyBudgetExceeded(ShoalError, RuntimeError):
    """Running the task would spend more privacy budget than its owner allows."""


class ReleaseRefused(ShoalError, PermissionError):
    """A node refused to let a value leave: its task's release policy does not allow the
    request (a fetch of a secure field, too little noise, a replayed charge, ...)."""


class NodeStateError(ShoalError, RuntimeError):
    """A node's durable state (privacy ledger, audit log) is missing, corrupt, or another
    node's; it is refused, never silently reset."""


class UnsafeModelError(ShoalError, ValueError):
    """A model file that would execute code or could not be verified as safe to load."""


class PlaintextOverflow(ShoalError, OverflowError):
    """A value too large for a homomorphic plaintext (or a packed slot) to hold exactly."""


class QueryError(ShoalError, ValueError):
    """An analytics query outside the supported SQL dialect, or one its bounds cannot answer."""
