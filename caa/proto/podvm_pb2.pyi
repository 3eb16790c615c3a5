from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ClaimRequest(_message.Message):
    __slots__ = ("vm_name", "token", "apf_json", "auth_json", "initdata_digest")
    VM_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    APF_JSON_FIELD_NUMBER: _ClassVar[int]
    AUTH_JSON_FIELD_NUMBER: _ClassVar[int]
    INITDATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    vm_name: str
    token: bytes
    apf_json: str
    auth_json: str
    initdata_digest: str
    def __init__(self, vm_name: _Optional[str] = ..., token: _Optional[bytes] = ..., apf_json: _Optional[str] = ..., auth_json: _Optional[str] = ..., initdata_digest: _Optional[str] = ...) -> None: ...

class ClaimResponse(_message.Message):
    __slots__ = ("initdata_digest",)
    INITDATA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    initdata_digest: str
    def __init__(self, initdata_digest: _Optional[str] = ...) -> None: ...
