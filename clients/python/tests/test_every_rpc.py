"""Every RPC of the proto has a client method named after it: the services
come from the generated descriptors, each method is looked up by name, then
each is called against a real server through an interceptor that records
which RPCs went out."""

import re

import grpc
import pytest

from keyward_client import (
    Client,
    InvalidArgument,
    NotFound,
    Rewrapped,
    admin_pb2,
    crypto_pb2,
)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def proto_methods() -> set:
    """`/package.Service/Method` of every RPC."""
    return {
        f"/{service.full_name}/{method.name}"
        for file in (crypto_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR)
        for service in file.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_has_a_method_of_its_name():
    methods = proto_methods()
    assert len(methods) > 20
    missing = [
        path for path in sorted(methods)
        if not callable(getattr(Client, _snake(path.rsplit("/", 1)[1]), None))
    ]
    assert not missing, f"no client method for {missing}"


class _Recorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Records the path of every call that goes out."""

    def __init__(self):
        self.paths = set()

    def _record(self, details):
        method = details.method
        self.paths.add(method.decode() if isinstance(method, bytes) else method)

    def intercept_unary_unary(self, continuation, details, request):
        self._record(details)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):
        self._record(details)
        return continuation(details, request)


def test_every_method_reaches_its_rpc(idle_server):
    recorder = _Recorder()
    with Client(
        idle_server.target, token=idle_server.admin_token, interceptors=[recorder]
    ) as kw:
        row = {"connection_id": "1"}
        sealed = kw.encrypt(b"s3cret", row)
        assert kw.decrypt(sealed.blob, row).plaintext == b"s3cret"
        assert kw.batch_encrypt([(b"x", row)])[0].key_id == "primary"
        assert kw.batch_decrypt([(sealed.envelope, row)])[0].plaintext == b"s3cret"
        # Already on the active key: returned as given.
        same = kw.rewrap(sealed.blob, row)
        assert isinstance(same, Rewrapped) and not same.rewrapped
        assert isinstance(kw.batch_rewrap([(sealed.blob, {"connection_id": "2"})])[0],
                          InvalidArgument)

        assert kw.list_rotation_targets()[0].table == "connections"
        added = kw.add_rotation_target({"table": "connections", "encoding": "bytes"})
        assert [t.table for t in added] == ["connections"]
        with pytest.raises(NotFound):
            kw.remove_rotation_target("no_such_table")

        assert kw.create_key("next").key_id == "next"
        assert kw.activate_key("next").previous.key_id == "primary"
        assert [k.key_id for k in kw.list_keys()] == ["next", "primary"]
        assert not kw.retire_key("primary", dry_run=True).key.status == admin_pb2.KEY_STATUS_RETIRED
        assert kw.list_replicas()
        kw.get_key_usage()
        assert kw.refresh_key_metadata().key_count == 2
        assert all(k.ok for k in kw.self_test().keys)
        assert kw.prune_expired_scoped_tokens() == 0

        job = kw.start_rotation()
        first = next(iter(kw.watch_rotation(job.id)))
        assert first.job.id == job.id
        assert kw.pause_rotation(job.id).status == admin_pb2.ROTATION_STATUS_PAUSED
        kw.resume_rotation(job.id)
        assert kw.update_rotation(job.id, batch_size=10).batch_size == 10
        assert kw.cancel_rotation(job.id).status == admin_pb2.ROTATION_STATUS_CANCELLED
        kw.requeue_rotation(job.id)
        assert kw.get_rotation_job(job.id).id == job.id
        assert [j.id for j in kw.list_rotation_jobs()] == [job.id]

    missing = proto_methods() - recorder.paths
    assert not missing, f"no client method reached {sorted(missing)}"
