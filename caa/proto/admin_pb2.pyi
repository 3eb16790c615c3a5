import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandOverRequest(_message.Message):
    __slots__ = ("successor",)
    SUCCESSOR_FIELD_NUMBER: _ClassVar[int]
    successor: str
    def __init__(self, successor: _Optional[str] = ...) -> None: ...

class HandOverResponse(_message.Message):
    __slots__ = ("sandbox_ids", "pid")
    SANDBOX_IDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    sandbox_ids: _containers.RepeatedScalarFieldContainer[str]
    pid: int
    def __init__(self, sandbox_ids: _Optional[_Iterable[str]] = ..., pid: _Optional[int] = ...) -> None: ...

class ListSandboxesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Sandbox(_message.Message):
    __slots__ = ("id", "pod_name", "pod_namespace", "instance_id", "vm_ips", "state", "created", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    POD_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VM_IPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    pod_name: str
    pod_namespace: str
    instance_id: str
    vm_ips: _containers.RepeatedScalarFieldContainer[str]
    state: str
    created: _timestamp_pb2.Timestamp
    error: str
    def __init__(self, id: _Optional[str] = ..., pod_name: _Optional[str] = ..., pod_namespace: _Optional[str] = ..., instance_id: _Optional[str] = ..., vm_ips: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ListSandboxesResponse(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[Sandbox]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ...) -> None: ...
