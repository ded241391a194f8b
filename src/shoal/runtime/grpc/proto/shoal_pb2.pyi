from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[Status]
    ERROR: _ClassVar[Status]
    REJECTED: _ClassVar[Status]
    DECLINED: _ClassVar[Status]
OK: Status
ERROR: Status
REJECTED: Status
DECLINED: Status

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: bytes | None = ...) -> None: ...

class CoordinatorFrame(_message.Message):
    __slots__ = ("cancel", "challenge", "chunk", "finish", "task", "welcome")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    challenge: Challenge
    welcome: Welcome
    task: TaskHeader
    chunk: Chunk
    cancel: Cancel
    finish: Finish
    def __init__(self, challenge: Challenge | _Mapping | None = ..., welcome: Welcome | _Mapping | None = ..., task: TaskHeader | _Mapping | None = ..., chunk: Chunk | _Mapping | None = ..., cancel: Cancel | _Mapping | None = ..., finish: Finish | _Mapping | None = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("challenge", "coordinator_id", "key_share", "protocol", "server_time_ms")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_ID_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARE_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    coordinator_id: str
    challenge: bytes
    server_time_ms: int
    key_share: bytes
    def __init__(self, protocol: int | None = ..., coordinator_id: str | None = ..., challenge: bytes | None = ..., server_time_ms: int | None = ..., key_share: bytes | None = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("chunk_bytes", "heartbeat_s", "job_digest", "max_reply_bytes", "node_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    job_digest: str
    heartbeat_s: float
    chunk_bytes: int
    max_reply_bytes: int
    def __init__(self, node_id: str | None = ..., job_digest: str | None = ..., heartbeat_s: float | None = ..., chunk_bytes: int | None = ..., max_reply_bytes: int | None = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("deadline_s", "keep_as", "name", "seed", "size", "task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEEP_AS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    name: str
    keep_as: str
    size: int
    seed: _containers.RepeatedScalarFieldContainer[int]
    deadline_s: float
    def __init__(self, task_id: str | None = ..., name: str | None = ..., keep_as: str | None = ..., size: int | None = ..., seed: _Iterable[int] | None = ..., deadline_s: float | None = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: str | None = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: str | None = ...) -> None: ...

class NodeFrame(_message.Message):
    __slots__ = ("chunk", "signed")
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    signed: Signed
    chunk: Chunk
    def __init__(self, signed: Signed | _Mapping | None = ..., chunk: Chunk | _Mapping | None = ...) -> None: ...

class Signed(_message.Message):
    __slots__ = ("body", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    def __init__(self, body: bytes | None = ..., signature: bytes | None = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("challenge", "goodbye", "heartbeat", "hello", "nonce", "reply", "timestamp_ms")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    timestamp_ms: int
    nonce: bytes
    hello: Hello
    heartbeat: Heartbeat
    reply: ReplyHeader
    goodbye: Goodbye
    def __init__(self, challenge: bytes | None = ..., timestamp_ms: int | None = ..., nonce: bytes | None = ..., hello: Hello | _Mapping | None = ..., heartbeat: Heartbeat | _Mapping | None = ..., reply: ReplyHeader | _Mapping | None = ..., goodbye: Goodbye | _Mapping | None = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("job_digest", "key_share", "partition_index", "protocol", "public_key", "software", "tasks")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_INDEX_FIELD_NUMBER: _ClassVar[int]
    JOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARE_FIELD_NUMBER: _ClassVar[int]
    protocol: int
    public_key: bytes
    tasks: _containers.RepeatedScalarFieldContainer[str]
    partition_index: int
    job_digest: str
    software: str
    key_share: bytes
    def __init__(self, protocol: int | None = ..., public_key: bytes | None = ..., tasks: _Iterable[str] | None = ..., partition_index: int | None = ..., job_digest: str | None = ..., software: str | None = ..., key_share: bytes | None = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("tasks_done",)
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    tasks_done: int
    def __init__(self, tasks_done: int | None = ...) -> None: ...

class ReplyHeader(_message.Message):
    __slots__ = ("detail", "elapsed_s", "size", "status", "tag", "task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: Status
    detail: str
    size: int
    elapsed_s: float
    tag: bytes
    def __init__(self, task_id: str | None = ..., status: Status | str | None = ..., detail: str | None = ..., size: int | None = ..., elapsed_s: float | None = ..., tag: bytes | None = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: str | None = ...) -> None: ...
