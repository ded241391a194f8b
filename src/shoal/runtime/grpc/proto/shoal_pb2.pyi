from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

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
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class CoordinatorFrame(_message.Message):
    __slots__ = ("challenge", "welcome", "task", "chunk", "cancel", "finish")
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
    def __init__(self, challenge: _Optional[_Union[Challenge, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[TaskHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., finish: _Optional[_Union[Finish, _Mapping]] = ...) -> None: ...

class Challenge(_message.Message):
    __slots__ = ("protocol", "coordinator_id", "challenge", "server_time_ms", "key_share")
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
    def __init__(self, protocol: _Optional[int] = ..., coordinator_id: _Optional[str] = ..., challenge: _Optional[bytes] = ..., server_time_ms: _Optional[int] = ..., key_share: _Optional[bytes] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("node_id", "job_digest", "heartbeat_s", "chunk_bytes", "max_reply_bytes", "data_port")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_DIGEST_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    job_digest: str
    heartbeat_s: float
    chunk_bytes: int
    max_reply_bytes: int
    data_port: int
    def __init__(self, node_id: _Optional[str] = ..., job_digest: _Optional[str] = ..., heartbeat_s: _Optional[float] = ..., chunk_bytes: _Optional[int] = ..., max_reply_bytes: _Optional[int] = ..., data_port: _Optional[int] = ...) -> None: ...

class TaskHeader(_message.Message):
    __slots__ = ("task_id", "name", "keep_as", "size", "seed", "deadline_s", "lane", "inline")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEEP_AS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    name: str
    keep_as: str
    size: int
    seed: _containers.RepeatedScalarFieldContainer[int]
    deadline_s: float
    lane: bool
    inline: bytes
    def __init__(self, task_id: _Optional[str] = ..., name: _Optional[str] = ..., keep_as: _Optional[str] = ..., size: _Optional[int] = ..., seed: _Optional[_Iterable[int]] = ..., deadline_s: _Optional[float] = ..., lane: _Optional[bool] = ..., inline: _Optional[bytes] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class NodeFrame(_message.Message):
    __slots__ = ("signed", "chunk")
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    signed: Signed
    chunk: Chunk
    def __init__(self, signed: _Optional[_Union[Signed, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class Signed(_message.Message):
    __slots__ = ("body", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("challenge", "timestamp_ms", "nonce", "hello", "heartbeat", "reply", "goodbye")
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
    def __init__(self, challenge: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., reply: _Optional[_Union[ReplyHeader, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol", "public_key", "tasks", "partition_index", "job_digest", "software", "key_share")
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
    def __init__(self, protocol: _Optional[int] = ..., public_key: _Optional[bytes] = ..., tasks: _Optional[_Iterable[str]] = ..., partition_index: _Optional[int] = ..., job_digest: _Optional[str] = ..., software: _Optional[str] = ..., key_share: _Optional[bytes] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("tasks_done",)
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    tasks_done: int
    def __init__(self, tasks_done: _Optional[int] = ...) -> None: ...

class ReplyHeader(_message.Message):
    __slots__ = ("task_id", "status", "detail", "size", "elapsed_s", "tag", "lane", "inline")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: Status
    detail: str
    size: int
    elapsed_s: float
    tag: bytes
    lane: bool
    inline: bytes
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., detail: _Optional[str] = ..., size: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., tag: _Optional[bytes] = ..., lane: _Optional[bool] = ..., inline: _Optional[bytes] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...
