import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RotationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROTATION_MODE_UNSPECIFIED: _ClassVar[RotationMode]
    ROTATION_MODE_REENCRYPT: _ClassVar[RotationMode]
    ROTATION_MODE_REWRAP: _ClassVar[RotationMode]

class RotationStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROTATION_STATUS_UNSPECIFIED: _ClassVar[RotationStatus]
    ROTATION_STATUS_PENDING: _ClassVar[RotationStatus]
    ROTATION_STATUS_RUNNING: _ClassVar[RotationStatus]
    ROTATION_STATUS_COMPLETED: _ClassVar[RotationStatus]
    ROTATION_STATUS_COMPLETED_WITH_ERRORS: _ClassVar[RotationStatus]
    ROTATION_STATUS_FAILED: _ClassVar[RotationStatus]
    ROTATION_STATUS_CANCELLED: _ClassVar[RotationStatus]
    ROTATION_STATUS_PAUSED: _ClassVar[RotationStatus]

class KeyStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATUS_UNSPECIFIED: _ClassVar[KeyStatus]
    KEY_STATUS_PENDING: _ClassVar[KeyStatus]
    KEY_STATUS_ACTIVE: _ClassVar[KeyStatus]
    KEY_STATUS_ROTATING: _ClassVar[KeyStatus]
    KEY_STATUS_RETIRED: _ClassVar[KeyStatus]
ROTATION_MODE_UNSPECIFIED: RotationMode
ROTATION_MODE_REENCRYPT: RotationMode
ROTATION_MODE_REWRAP: RotationMode
ROTATION_STATUS_UNSPECIFIED: RotationStatus
ROTATION_STATUS_PENDING: RotationStatus
ROTATION_STATUS_RUNNING: RotationStatus
ROTATION_STATUS_COMPLETED: RotationStatus
ROTATION_STATUS_COMPLETED_WITH_ERRORS: RotationStatus
ROTATION_STATUS_FAILED: RotationStatus
ROTATION_STATUS_CANCELLED: RotationStatus
ROTATION_STATUS_PAUSED: RotationStatus
KEY_STATUS_UNSPECIFIED: KeyStatus
KEY_STATUS_PENDING: KeyStatus
KEY_STATUS_ACTIVE: KeyStatus
KEY_STATUS_ROTATING: KeyStatus
KEY_STATUS_RETIRED: KeyStatus

class ListRotationTargetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotationTarget(_message.Message):
    __slots__ = ("table", "definition_json", "encoding")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_JSON_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    table: str
    definition_json: str
    encoding: str
    def __init__(self, table: _Optional[str] = ..., definition_json: _Optional[str] = ..., encoding: _Optional[str] = ...) -> None: ...

class ListRotationTargetsResponse(_message.Message):
    __slots__ = ("targets",)
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[RotationTarget]
    def __init__(self, targets: _Optional[_Iterable[_Union[RotationTarget, _Mapping]]] = ...) -> None: ...

class AddRotationTargetRequest(_message.Message):
    __slots__ = ("definition_json",)
    DEFINITION_JSON_FIELD_NUMBER: _ClassVar[int]
    definition_json: str
    def __init__(self, definition_json: _Optional[str] = ...) -> None: ...

class RemoveRotationTargetRequest(_message.Message):
    __slots__ = ("table", "force")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    table: str
    force: bool
    def __init__(self, table: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RotationJob(_message.Message):
    __slots__ = ("id", "status", "target_encryption_key_id", "target_key_id", "mode", "dry_run", "batch_size", "max_rows_per_second", "total_rows", "processed_rows", "succeeded_rows", "failed_rows", "skipped_rows", "last_error", "cancel_requested", "created_at", "updated_at", "started_at", "completed_at", "late_rows", "target_batch_ms", "max_foreground_p99_ms", "min_rows_per_second", "max_replication_lag_ms", "throttled", "throttle_reason", "throttled_foreground_seconds", "throttled_lag_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TARGET_ENCRYPTION_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    PROCESSED_ROWS_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_ROWS_FIELD_NUMBER: _ClassVar[int]
    FAILED_ROWS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_ROWS_FIELD_NUMBER: _ClassVar[int]
    PASS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AT_FIELD_NUMBER: _ClassVar[int]
    LATE_ROWS_FIELD_NUMBER: _ClassVar[int]
    TARGET_BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_FOREGROUND_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICATION_LAG_MS_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASON_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_FOREGROUND_SECONDS_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: RotationStatus
    target_encryption_key_id: str
    target_key_id: str
    mode: RotationMode
    dry_run: bool
    batch_size: int
    max_rows_per_second: int
    total_rows: int
    processed_rows: int
    succeeded_rows: int
    failed_rows: int
    skipped_rows: int
    last_error: str
    cancel_requested: bool
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    completed_at: _timestamp_pb2.Timestamp
    late_rows: int
    target_batch_ms: int
    max_foreground_p99_ms: float
    min_rows_per_second: int
    max_replication_lag_ms: int
    throttled: bool
    throttle_reason: str
    throttled_foreground_seconds: float
    throttled_lag_seconds: float
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[RotationStatus, str]] = ..., target_encryption_key_id: _Optional[str] = ..., target_key_id: _Optional[str] = ..., mode: _Optional[_Union[RotationMode, str]] = ..., dry_run: _Optional[bool] = ..., batch_size: _Optional[int] = ..., max_rows_per_second: _Optional[int] = ..., total_rows: _Optional[int] = ..., processed_rows: _Optional[int] = ..., succeeded_rows: _Optional[int] = ..., failed_rows: _Optional[int] = ..., skipped_rows: _Optional[int] = ..., last_error: _Optional[str] = ..., cancel_requested: _Optional[bool] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., completed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., late_rows: _Optional[int] = ..., target_batch_ms: _Optional[int] = ..., max_foreground_p99_ms: _Optional[float] = ..., min_rows_per_second: _Optional[int] = ..., max_replication_lag_ms: _Optional[int] = ..., throttled: _Optional[bool] = ..., throttle_reason: _Optional[str] = ..., throttled_foreground_seconds: _Optional[float] = ..., throttled_lag_seconds: _Optional[float] = ..., **kwargs) -> None: ...

class StartRotationRequest(_message.Message):
    __slots__ = ("target_key_id", "mode", "dry_run", "batch_size", "max_rows_per_second", "target_batch_ms", "max_foreground_p99_ms", "min_rows_per_second", "max_replication_lag_ms")
    TARGET_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TARGET_BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_FOREGROUND_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICATION_LAG_MS_FIELD_NUMBER: _ClassVar[int]
    target_key_id: str
    mode: RotationMode
    dry_run: bool
    batch_size: int
    max_rows_per_second: int
    target_batch_ms: int
    max_foreground_p99_ms: float
    min_rows_per_second: int
    max_replication_lag_ms: int
    def __init__(self, target_key_id: _Optional[str] = ..., mode: _Optional[_Union[RotationMode, str]] = ..., dry_run: _Optional[bool] = ..., batch_size: _Optional[int] = ..., max_rows_per_second: _Optional[int] = ..., target_batch_ms: _Optional[int] = ..., max_foreground_p99_ms: _Optional[float] = ..., min_rows_per_second: _Optional[int] = ..., max_replication_lag_ms: _Optional[int] = ...) -> None: ...

class WatchRotationRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RotationProgress(_message.Message):
    __slots__ = ("job", "rows_per_second", "eta_seconds", "terminal")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    job: RotationJob
    rows_per_second: float
    eta_seconds: float
    terminal: bool
    def __init__(self, job: _Optional[_Union[RotationJob, _Mapping]] = ..., rows_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., terminal: _Optional[bool] = ...) -> None: ...

class GetRotationJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListRotationJobsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRotationJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[RotationJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[RotationJob, _Mapping]]] = ...) -> None: ...

class CancelRotationRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RequeueRotationRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class PauseRotationRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ResumeRotationRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class UpdateRotationRequest(_message.Message):
    __slots__ = ("job_id", "batch_size", "max_rows_per_second", "target_batch_ms", "max_foreground_p99_ms", "min_rows_per_second", "max_replication_lag_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TARGET_BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_FOREGROUND_P99_MS_FIELD_NUMBER: _ClassVar[int]
    MIN_ROWS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICATION_LAG_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    batch_size: int
    max_rows_per_second: int
    target_batch_ms: int
    max_foreground_p99_ms: float
    min_rows_per_second: int
    max_replication_lag_ms: int
    def __init__(self, job_id: _Optional[str] = ..., batch_size: _Optional[int] = ..., max_rows_per_second: _Optional[int] = ..., target_batch_ms: _Optional[int] = ..., max_foreground_p99_ms: _Optional[float] = ..., min_rows_per_second: _Optional[int] = ..., max_replication_lag_ms: _Optional[int] = ...) -> None: ...

class PruneExpiredScopedTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PruneExpiredScopedTokensResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("id", "key_id", "kms_key_arn", "alias", "provider", "status", "created_at", "updated_at", "rotated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KMS_KEY_ARN_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ROTATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    key_id: str
    kms_key_arn: str
    alias: str
    provider: str
    status: KeyStatus
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    rotated_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., key_id: _Optional[str] = ..., kms_key_arn: _Optional[str] = ..., alias: _Optional[str] = ..., provider: _Optional[str] = ..., status: _Optional[_Union[KeyStatus, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rotated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("key_id", "kms_key_arn", "alias", "provider", "activate")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    KMS_KEY_ARN_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    kms_key_arn: str
    alias: str
    provider: str
    activate: bool
    def __init__(self, key_id: _Optional[str] = ..., kms_key_arn: _Optional[str] = ..., alias: _Optional[str] = ..., provider: _Optional[str] = ..., activate: _Optional[bool] = ...) -> None: ...

class ActivateKeyRequest(_message.Message):
    __slots__ = ("key_id", "staged", "staged_timeout_seconds")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    STAGED_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    staged: bool
    staged_timeout_seconds: int
    def __init__(self, key_id: _Optional[str] = ..., staged: _Optional[bool] = ..., staged_timeout_seconds: _Optional[int] = ...) -> None: ...

class ActivateKeyResponse(_message.Message):
    __slots__ = ("activated", "previous", "confirmed_replicas")
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    activated: Key
    previous: Key
    confirmed_replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, activated: _Optional[_Union[Key, _Mapping]] = ..., previous: _Optional[_Union[Key, _Mapping]] = ..., confirmed_replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class RetireKeyRequest(_message.Message):
    __slots__ = ("key_id", "force", "dry_run")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    force: bool
    dry_run: bool
    def __init__(self, key_id: _Optional[str] = ..., force: _Optional[bool] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RetireKeyResponse(_message.Message):
    __slots__ = ("key", "referencing_rows", "retired", "blockers", "next_steps", "rows", "live_job_ids", "replicas_using_key", "legacy_copies", "legacy_conflicts")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REFERENCING_ROWS_FIELD_NUMBER: _ClassVar[int]
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    BLOCKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEPS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    LIVE_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_USING_KEY_FIELD_NUMBER: _ClassVar[int]
    LEGACY_COPIES_FIELD_NUMBER: _ClassVar[int]
    LEGACY_CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    key: Key
    referencing_rows: int
    retired: bool
    blockers: _containers.RepeatedScalarFieldContainer[str]
    next_steps: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[TargetUsage]
    live_job_ids: _containers.RepeatedScalarFieldContainer[str]
    replicas_using_key: _containers.RepeatedCompositeFieldContainer[Replica]
    legacy_copies: int
    legacy_conflicts: int
    def __init__(self, key: _Optional[_Union[Key, _Mapping]] = ..., referencing_rows: _Optional[int] = ..., retired: _Optional[bool] = ..., blockers: _Optional[_Iterable[str]] = ..., next_steps: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[TargetUsage, _Mapping]]] = ..., live_job_ids: _Optional[_Iterable[str]] = ..., replicas_using_key: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., legacy_copies: _Optional[int] = ..., legacy_conflicts: _Optional[int] = ...) -> None: ...

class ListReplicasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "kind", "host", "pid", "listen", "version", "started_at", "heartbeat_at", "live", "catalog_version", "active_key_id", "active_since", "keys", "master_fingerprints")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SINCE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MASTER_FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    host: str
    pid: int
    listen: str
    version: str
    started_at: _timestamp_pb2.Timestamp
    heartbeat_at: _timestamp_pb2.Timestamp
    live: bool
    catalog_version: int
    active_key_id: str
    active_since: _timestamp_pb2.Timestamp
    keys: _containers.RepeatedCompositeFieldContainer[ReplicaKeyReadiness]
    master_fingerprints: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., listen: _Optional[str] = ..., version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., live: _Optional[bool] = ..., catalog_version: _Optional[int] = ..., active_key_id: _Optional[str] = ..., active_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., keys: _Optional[_Iterable[_Union[ReplicaKeyReadiness, _Mapping]]] = ..., master_fingerprints: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaKeyReadiness(_message.Message):
    __slots__ = ("key_id", "ready", "error")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    ready: bool
    error: str
    def __init__(self, key_id: _Optional[str] = ..., ready: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ListReplicasResponse(_message.Message):
    __slots__ = ("replicas", "catalog_version")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    CATALOG_VERSION_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    catalog_version: int
    def __init__(self, replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., catalog_version: _Optional[int] = ...) -> None: ...

class GetKeyUsageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TargetUsage(_message.Message):
    __slots__ = ("target", "rows", "oldest_written_at", "legacy_copies", "legacy_conflicts")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WRITTEN_AT_FIELD_NUMBER: _ClassVar[int]
    LEGACY_COPIES_FIELD_NUMBER: _ClassVar[int]
    LEGACY_CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    target: str
    rows: int
    oldest_written_at: _timestamp_pb2.Timestamp
    legacy_copies: int
    legacy_conflicts: int
    def __init__(self, target: _Optional[str] = ..., rows: _Optional[int] = ..., oldest_written_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., legacy_copies: _Optional[int] = ..., legacy_conflicts: _Optional[int] = ...) -> None: ...

class KeyUsage(_message.Message):
    __slots__ = ("key_id", "encryption_key_id", "status", "legacy", "rows", "oldest_written_at", "oldest_age_seconds", "targets", "legacy_copies", "legacy_conflicts")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LEGACY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WRITTEN_AT_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    LEGACY_COPIES_FIELD_NUMBER: _ClassVar[int]
    LEGACY_CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    encryption_key_id: str
    status: KeyStatus
    legacy: bool
    rows: int
    oldest_written_at: _timestamp_pb2.Timestamp
    oldest_age_seconds: float
    targets: _containers.RepeatedCompositeFieldContainer[TargetUsage]
    legacy_copies: int
    legacy_conflicts: int
    def __init__(self, key_id: _Optional[str] = ..., encryption_key_id: _Optional[str] = ..., status: _Optional[_Union[KeyStatus, str]] = ..., legacy: _Optional[bool] = ..., rows: _Optional[int] = ..., oldest_written_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., oldest_age_seconds: _Optional[float] = ..., targets: _Optional[_Iterable[_Union[TargetUsage, _Mapping]]] = ..., legacy_copies: _Optional[int] = ..., legacy_conflicts: _Optional[int] = ...) -> None: ...

class LegacyCheck(_message.Message):
    __slots__ = ("target", "checked_at", "conflicts")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CHECKED_AT_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    target: str
    checked_at: _timestamp_pb2.Timestamp
    conflicts: int
    def __init__(self, target: _Optional[str] = ..., checked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., conflicts: _Optional[int] = ...) -> None: ...

class GetKeyUsageResponse(_message.Message):
    __slots__ = ("keys", "legacy_checks")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEGACY_CHECKS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyUsage]
    legacy_checks: _containers.RepeatedCompositeFieldContainer[LegacyCheck]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyUsage, _Mapping]]] = ..., legacy_checks: _Optional[_Iterable[_Union[LegacyCheck, _Mapping]]] = ...) -> None: ...

class RefreshKeyMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefreshKeyMetadataResponse(_message.Message):
    __slots__ = ("key_count", "active_key_id")
    KEY_COUNT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_count: int
    active_key_id: str
    def __init__(self, key_count: _Optional[int] = ..., active_key_id: _Optional[str] = ...) -> None: ...

class SelfTestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeySelfTest(_message.Message):
    __slots__ = ("key_id", "provider", "status", "ok", "error")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    provider: str
    status: KeyStatus
    ok: bool
    error: str
    def __init__(self, key_id: _Optional[str] = ..., provider: _Optional[str] = ..., status: _Optional[_Union[KeyStatus, str]] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class SelfTestResponse(_message.Message):
    __slots__ = ("passed", "keys")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    keys: _containers.RepeatedCompositeFieldContainer[KeySelfTest]
    def __init__(self, passed: _Optional[bool] = ..., keys: _Optional[_Iterable[_Union[KeySelfTest, _Mapping]]] = ...) -> None: ...
