from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EnvelopeForm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENVELOPE_FORM_UNSPECIFIED: _ClassVar[EnvelopeForm]
    ENVELOPE_FORM_FIELDS: _ClassVar[EnvelopeForm]
    ENVELOPE_FORM_BLOB: _ClassVar[EnvelopeForm]
    ENVELOPE_FORM_BOTH: _ClassVar[EnvelopeForm]
ENVELOPE_FORM_UNSPECIFIED: EnvelopeForm
ENVELOPE_FORM_FIELDS: EnvelopeForm
ENVELOPE_FORM_BLOB: EnvelopeForm
ENVELOPE_FORM_BOTH: EnvelopeForm

class Envelope(_message.Message):
    __slots__ = ("encryption_key_id", "data_key_ciphertext", "data_key_iv", "payload_ciphertext", "payload_iv")
    ENCRYPTION_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_KEY_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    DATA_KEY_IV_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_IV_FIELD_NUMBER: _ClassVar[int]
    encryption_key_id: str
    data_key_ciphertext: bytes
    data_key_iv: bytes
    payload_ciphertext: bytes
    payload_iv: bytes
    def __init__(self, encryption_key_id: _Optional[str] = ..., data_key_ciphertext: _Optional[bytes] = ..., data_key_iv: _Optional[bytes] = ..., payload_ciphertext: _Optional[bytes] = ..., payload_iv: _Optional[bytes] = ...) -> None: ...

class EncryptRequest(_message.Message):
    __slots__ = ("plaintext", "context", "form")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    context: _containers.ScalarMap[str, str]
    form: EnvelopeForm
    def __init__(self, plaintext: _Optional[bytes] = ..., context: _Optional[_Mapping[str, str]] = ..., form: _Optional[_Union[EnvelopeForm, str]] = ...) -> None: ...

class EncryptResponse(_message.Message):
    __slots__ = ("envelope", "blob", "key_id")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    blob: bytes
    key_id: str
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., blob: _Optional[bytes] = ..., key_id: _Optional[str] = ...) -> None: ...

class DecryptRequest(_message.Message):
    __slots__ = ("context", "envelope", "blob")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    context: _containers.ScalarMap[str, str]
    envelope: Envelope
    blob: bytes
    def __init__(self, context: _Optional[_Mapping[str, str]] = ..., envelope: _Optional[_Union[Envelope, _Mapping]] = ..., blob: _Optional[bytes] = ...) -> None: ...

class DecryptResponse(_message.Message):
    __slots__ = ("plaintext", "encryption_key_id", "legacy")
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LEGACY_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    encryption_key_id: str
    legacy: bool
    def __init__(self, plaintext: _Optional[bytes] = ..., encryption_key_id: _Optional[str] = ..., legacy: _Optional[bool] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class BatchEncryptRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EncryptRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[EncryptRequest, _Mapping]]] = ...) -> None: ...

class BatchEncryptResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: EncryptResponse
    error: ItemError
    def __init__(self, ok: _Optional[_Union[EncryptResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class BatchEncryptResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchEncryptResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchEncryptResult, _Mapping]]] = ...) -> None: ...

class BatchDecryptRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DecryptRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[DecryptRequest, _Mapping]]] = ...) -> None: ...

class BatchDecryptResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: DecryptResponse
    error: ItemError
    def __init__(self, ok: _Optional[_Union[DecryptResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class BatchDecryptResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchDecryptResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchDecryptResult, _Mapping]]] = ...) -> None: ...

class RewrapRequest(_message.Message):
    __slots__ = ("context", "envelope", "blob", "form")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    FORM_FIELD_NUMBER: _ClassVar[int]
    context: _containers.ScalarMap[str, str]
    envelope: Envelope
    blob: bytes
    form: EnvelopeForm
    def __init__(self, context: _Optional[_Mapping[str, str]] = ..., envelope: _Optional[_Union[Envelope, _Mapping]] = ..., blob: _Optional[bytes] = ..., form: _Optional[_Union[EnvelopeForm, str]] = ...) -> None: ...

class RewrapResponse(_message.Message):
    __slots__ = ("envelope", "blob", "key_id", "rewrapped")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    envelope: Envelope
    blob: bytes
    key_id: str
    rewrapped: bool
    def __init__(self, envelope: _Optional[_Union[Envelope, _Mapping]] = ..., blob: _Optional[bytes] = ..., key_id: _Optional[str] = ..., rewrapped: _Optional[bool] = ...) -> None: ...

class BatchRewrapRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RewrapRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[RewrapRequest, _Mapping]]] = ...) -> None: ...

class BatchRewrapResult(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: RewrapResponse
    error: ItemError
    def __init__(self, ok: _Optional[_Union[RewrapResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class BatchRewrapResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BatchRewrapResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BatchRewrapResult, _Mapping]]] = ...) -> None: ...
