"""Python client for keyward, the envelope-encryption key service.

    from keyward_client import Client

    with Client("127.0.0.1:50051", token=os.environ["KEYWARD_TOKEN"]) as kw:
        row = {"connection_id": "42"}           # bind the ciphertext to its row
        sealed = kw.encrypt(b"hunter2", row)     # store sealed.blob (or sealed.envelope)
        assert kw.decrypt(sealed.blob, row).plaintext == b"hunter2"

Every RPC of both services has a method named after it in snake case
(`PauseRotation` is `pause_rotation`); `tests/test_every_rpc.py` calls
each one and fails when the proto has a method the client lacks.

Errors are `KeywardError` subclasses, one per gRPC code a caller acts on
(`InvalidArgument`, `NotFound`, `FailedPrecondition`, `Unauthenticated`,
`PermissionDenied`, `ResourceExhausted`, `Unavailable`). Batch calls return
one result per item, an `Opened`/`Sealed` or a `KeywardError`.
`watch_rotation` is a generator of progress events that ends after the
job's last one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import grpc

from keyward.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2, crypto_pb2_grpc

__all__ = [
    "Client",
    "Sealed",
    "Opened",
    "Rewrapped",
    "KeywardError",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "Unauthenticated",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "admin_pb2",
    "crypto_pb2",
]

Envelope = crypto_pb2.Envelope
Ciphertext = Union[bytes, crypto_pb2.Envelope]
Context = Mapping[str, str]


class KeywardError(Exception):
    """A call keyward refused or could not serve."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(KeywardError):
    """Bad input: a wrong context, a damaged or foreign ciphertext, limits."""


class NotFound(KeywardError):
    """No such key record or rotation job."""


class FailedPrecondition(KeywardError):
    """Not in the current state (no active key, a disabled KMS key, …)."""


class Unauthenticated(KeywardError):
    """No valid token or client certificate."""


class PermissionDenied(KeywardError):
    """The caller's role or scope does not allow it."""


class ResourceExhausted(KeywardError):
    """Rate limit, or a request larger than the server accepts."""


class Unavailable(KeywardError):
    """The server or its KMS is unreachable for now: retry later."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def _error(code: grpc.StatusCode, message: str) -> KeywardError:
    return _BY_CODE.get(code, KeywardError)(code, message)


def _from_rpc(err: grpc.RpcError) -> KeywardError:
    return _error(err.code(), err.details() or "")


def _from_item(item: crypto_pb2.ItemError) -> KeywardError:
    return _error(_CODE_BY_NUMBER.get(item.code, grpc.StatusCode.UNKNOWN), item.message)


@dataclass(frozen=True)
class Sealed:
    """An Encrypt's result: store `blob` (one column) or `envelope`."""

    blob: bytes
    envelope: crypto_pb2.Envelope
    key_id: str


@dataclass(frozen=True)
class Rewrapped:
    """A Rewrap's result: the same secret under the active key, bound to the
    same context; store it in place of what was given. `rewrapped` is False
    when it already was on the active key and came back as given."""

    blob: bytes
    envelope: crypto_pb2.Envelope
    key_id: str
    rewrapped: bool


@dataclass(frozen=True)
class Opened:
    """A Decrypt's result. Its repr never shows the plaintext."""

    plaintext: bytes = field(repr=False)
    encryption_key_id: str
    legacy: bool


class _Bearer(grpc.AuthMetadataPlugin):
    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self, context, callback):
        callback(self._metadata, None)


class Client:
    """A keyward client over one gRPC channel.

    `target` is `host:port`. Without `root_certificates` the channel is
    plaintext (a `serve --dev` sandbox); with it, TLS, optionally with a
    client certificate (`private_key`, `certificate_chain`).
    `interceptors` (grpc client interceptors: tracing, retries) wrap every
    call.
    """

    def __init__(
        self,
        target: str,
        *,
        token: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
        private_key: Optional[bytes] = None,
        certificate_chain: Optional[bytes] = None,
        server_name: Optional[str] = None,
        timeout: Optional[float] = None,
        interceptors: Sequence[Any] = (),
    ):
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates, private_key, certificate_chain
            )
            if token is not None:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.metadata_call_credentials(_Bearer(token))
                )
                token = None
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target)
        # Plaintext channels cannot carry call credentials: the token goes
        # in the metadata of each call instead.
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token is not None else ()
        )
        self._timeout = timeout
        channel = grpc.intercept_channel(self._channel, *interceptors)
        self._crypto = crypto_pb2_grpc.CryptoStub(channel)
        self._admin = admin_pb2_grpc.AdminStub(channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method, request, timeout=None):
        try:
            return method(
                request, metadata=self._metadata, timeout=timeout or self._timeout
            )
        except grpc.RpcError as err:
            raise _from_rpc(err) from None

    def wait_until_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel is connected (or raises Unavailable)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "not connected in time") from None

    def encrypt(self, plaintext: bytes, context: Context) -> Sealed:
        """Encrypts `plaintext` bound to `context`."""
        reply = self._call(
            self._crypto.Encrypt,
            crypto_pb2.EncryptRequest(plaintext=plaintext, context=dict(context)),
        )
        return _sealed(reply)

    def decrypt(self, ciphertext: Ciphertext, context: Context) -> Opened:
        """Decrypts a blob or an envelope with the context it was encrypted with."""
        reply = self._call(self._crypto.Decrypt, _decrypt_request(ciphertext, context))
        return _opened(reply)

    def batch_encrypt(
        self, items: Iterable[Tuple[bytes, Context]]
    ) -> Sequence[Union[Sealed, KeywardError]]:
        """Encrypts many items in one call; one result per item, in order."""
        request = crypto_pb2.BatchEncryptRequest(
            items=[
                crypto_pb2.EncryptRequest(plaintext=p, context=dict(c)) for p, c in items
            ]
        )
        reply = self._call(self._crypto.BatchEncrypt, request)
        return [
            _sealed(r.ok) if r.WhichOneof("result") == "ok" else _from_item(r.error)
            for r in reply.results
        ]

    def batch_decrypt(
        self, items: Iterable[Tuple[Ciphertext, Context]]
    ) -> Sequence[Union[Opened, KeywardError]]:
        """Decrypts many items in one call; one result per item, in order."""
        request = crypto_pb2.BatchDecryptRequest(
            items=[_decrypt_request(c, ctx) for c, ctx in items]
        )
        reply = self._call(self._crypto.BatchDecrypt, request)
        return [
            _opened(r.ok) if r.WhichOneof("result") == "ok" else _from_item(r.error)
            for r in reply.results
        ]

    def rewrap(self, ciphertext: Ciphertext, context: Context) -> Rewrapped:
        """The same secret under the active key, never returned in plaintext
        (role `rewrap`, which does not grant `decrypt`)."""
        reply = self._call(self._crypto.Rewrap, _rewrap_request(ciphertext, context))
        return _rewrapped(reply)

    def batch_rewrap(
        self, items: Iterable[Tuple[Ciphertext, Context]]
    ) -> Sequence[Union[Rewrapped, KeywardError]]:
        """Rewraps many items in one call; one result per item, in order."""
        request = crypto_pb2.BatchRewrapRequest(
            items=[_rewrap_request(c, ctx) for c, ctx in items]
        )
        reply = self._call(self._crypto.BatchRewrap, request)
        return [
            _rewrapped(r.ok) if r.WhichOneof("result") == "ok" else _from_item(r.error)
            for r in reply.results
        ]

    # Admin: the key catalog.

    def list_keys(self) -> List[admin_pb2.Key]:
        """Every key record, newest first."""
        return list(self._call(self._admin.ListKeys, admin_pb2.ListKeysRequest()).keys)

    def create_key(self, key_id: str, **fields) -> admin_pb2.Key:
        """Registers a key record; `fields` are CreateKeyRequest's
        (`kms_key_arn`, `alias`, `provider`, `activate`)."""
        request = admin_pb2.CreateKeyRequest(key_id=key_id, **fields)
        return self._call(self._admin.CreateKey, request)

    def activate_key(self, key_id: str, **fields) -> admin_pb2.ActivateKeyResponse:
        """Makes a key active (`staged=True`: once every live replica proves
        it can decrypt under it); the previous one becomes rotating."""
        request = admin_pb2.ActivateKeyRequest(key_id=key_id, **fields)
        return self._call(self._admin.ActivateKey, request)

    def retire_key(self, key_id: str, **fields) -> admin_pb2.RetireKeyResponse:
        """Retires a rotating key (`dry_run=True`: only the plan; `force`)."""
        request = admin_pb2.RetireKeyRequest(key_id=key_id, **fields)
        return self._call(self._admin.RetireKey, request)

    def list_replicas(self) -> List[admin_pb2.Replica]:
        """Every keyward process that heartbeats into the database."""
        request = admin_pb2.ListReplicasRequest()
        return list(self._call(self._admin.ListReplicas, request).replicas)

    def get_key_usage(self) -> admin_pb2.GetKeyUsageResponse:
        """Re-encryption debt: per key, the rows of each target still on it."""
        return self._call(self._admin.GetKeyUsage, admin_pb2.GetKeyUsageRequest())

    def refresh_key_metadata(self) -> admin_pb2.RefreshKeyMetadataResponse:
        """Reloads the server's in-memory key catalog from the database."""
        request = admin_pb2.RefreshKeyMetadataRequest()
        return self._call(self._admin.RefreshKeyMetadata, request)

    def self_test(self) -> admin_pb2.SelfTestResponse:
        """Round-trips a probe through every non-retired key's KMS."""
        return self._call(self._admin.SelfTest, admin_pb2.SelfTestRequest())

    def prune_expired_scoped_tokens(self) -> int:
        """Removes expired or used connection-scoped tokens; how many."""
        request = admin_pb2.PruneExpiredScopedTokensRequest()
        return self._call(self._admin.PruneExpiredScopedTokens, request).removed

    # Admin: rotation jobs.

    def start_rotation(self, **fields) -> admin_pb2.RotationJob:
        """Queues a rotation job (admin role); `fields` are StartRotationRequest's."""
        return self._call(
            self._admin.StartRotation, admin_pb2.StartRotationRequest(**fields)
        )

    def get_rotation_job(self, job_id: str) -> admin_pb2.RotationJob:
        """One job as it stands."""
        return self._call(
            self._admin.GetRotationJob, admin_pb2.GetRotationJobRequest(job_id=job_id)
        )

    rotation_job = get_rotation_job

    def list_rotation_jobs(self, limit: int = 0) -> List[admin_pb2.RotationJob]:
        """Jobs, newest first (`limit` 0: the server's default)."""
        request = admin_pb2.ListRotationJobsRequest(limit=limit)
        return list(self._call(self._admin.ListRotationJobs, request).jobs)

    def cancel_rotation(self, job_id: str) -> admin_pb2.RotationJob:
        """Cancels a job: a pending one at once, a running one between batches."""
        request = admin_pb2.CancelRotationRequest(job_id=job_id)
        return self._call(self._admin.CancelRotation, request)

    def requeue_rotation(self, job_id: str) -> admin_pb2.RotationJob:
        """Puts a failed or cancelled job back in the queue."""
        request = admin_pb2.RequeueRotationRequest(job_id=job_id)
        return self._call(self._admin.RequeueRotation, request)

    def pause_rotation(self, job_id: str) -> admin_pb2.RotationJob:
        """Pauses a pending or running job: it claims nothing, keeps its counts."""
        request = admin_pb2.PauseRotationRequest(job_id=job_id)
        return self._call(self._admin.PauseRotation, request)

    def resume_rotation(self, job_id: str) -> admin_pb2.RotationJob:
        """Resumes a paused job where it stopped."""
        request = admin_pb2.ResumeRotationRequest(job_id=job_id)
        return self._call(self._admin.ResumeRotation, request)

    def update_rotation(self, job_id: str, **fields) -> admin_pb2.RotationJob:
        """Re-tunes a pending or running job from its next batch on; `fields`
        are UpdateRotationRequest's (those not given stay as they are)."""
        request = admin_pb2.UpdateRotationRequest(job_id=job_id, **fields)
        return self._call(self._admin.UpdateRotation, request)

    def watch_rotation(self, job_id: str) -> Iterator[admin_pb2.RotationProgress]:
        """Yields the job's state at once, then an event per change (or every
        second), and ends after the terminal event."""
        stream = self._admin.WatchRotation(
            admin_pb2.WatchRotationRequest(job_id=job_id), metadata=self._metadata
        )
        try:
            yield from stream
        except grpc.RpcError as err:
            raise _from_rpc(err) from None

    # Admin: rotation targets.

    def list_rotation_targets(self) -> List[admin_pb2.RotationTarget]:
        """The rotation targets every process follows, in the order rotation
        walks them."""
        request = admin_pb2.ListRotationTargetsRequest()
        return list(self._call(self._admin.ListRotationTargets, request).targets)

    def add_rotation_target(
        self, definition: Union[str, Mapping[str, Any]]
    ) -> List[admin_pb2.RotationTarget]:
        """Lists a table: its definition as a `--rotation-targets` entry
        spells it (JSON text, or a dict); returns the targets after."""
        if not isinstance(definition, str):
            definition = json.dumps(definition)
        request = admin_pb2.AddRotationTargetRequest(definition_json=definition)
        return list(self._call(self._admin.AddRotationTarget, request).targets)

    def remove_rotation_target(
        self, table: str, force: bool = False
    ) -> List[admin_pb2.RotationTarget]:
        """Stops listing a table (`force`: even while it holds envelopes)."""
        request = admin_pb2.RemoveRotationTargetRequest(table=table, force=force)
        return list(self._call(self._admin.RemoveRotationTarget, request).targets)

    def admin(self, method: str, request):
        """An Admin call by its RPC name with a request message, e.g.
        `admin("ListKeys", admin_pb2.ListKeysRequest())`: the raw reply."""
        return self._call(getattr(self._admin, method), request)


def _decrypt_request(ciphertext: Ciphertext, context: Context) -> crypto_pb2.DecryptRequest:
    if isinstance(ciphertext, crypto_pb2.Envelope):
        return crypto_pb2.DecryptRequest(context=dict(context), envelope=ciphertext)
    return crypto_pb2.DecryptRequest(context=dict(context), blob=bytes(ciphertext))


def _rewrap_request(ciphertext: Ciphertext, context: Context) -> crypto_pb2.RewrapRequest:
    if isinstance(ciphertext, crypto_pb2.Envelope):
        return crypto_pb2.RewrapRequest(context=dict(context), envelope=ciphertext)
    return crypto_pb2.RewrapRequest(context=dict(context), blob=bytes(ciphertext))


def _rewrapped(reply: crypto_pb2.RewrapResponse) -> Rewrapped:
    return Rewrapped(
        blob=reply.blob, envelope=reply.envelope, key_id=reply.key_id, rewrapped=reply.rewrapped
    )


def _sealed(reply: crypto_pb2.EncryptResponse) -> Sealed:
    return Sealed(blob=reply.blob, envelope=reply.envelope, key_id=reply.key_id)


def _opened(reply: crypto_pb2.DecryptResponse) -> Opened:
    return Opened(
        plaintext=reply.plaintext,
        encryption_key_id=reply.encryption_key_id,
        legacy=reply.legacy,
    )
