"""keyward_client against a real keyward server (see conftest.py)."""

import sqlite3

import pytest

from keyward_client import (
    Client,
    InvalidArgument,
    KeywardError,
    NotFound,
    Opened,
    PermissionDenied,
    Sealed,
    Unauthenticated,
    admin_pb2,
    crypto_pb2,
)


def test_round_trip_binds_the_context(server):
    with Client(server.target, token=server.app_token) as kw:
        row = {"connection_id": "42"}
        sealed = kw.encrypt(b"hunter2", row)
        assert sealed.key_id == "primary"
        opened = kw.decrypt(sealed.blob, row)
        assert opened.plaintext == b"hunter2" and not opened.legacy
        assert kw.decrypt(sealed.envelope, row).plaintext == b"hunter2"
        assert "hunter2" not in repr(opened)
        with pytest.raises(InvalidArgument):
            kw.decrypt(sealed.blob, {"connection_id": "43"})


def test_callers_are_authenticated_and_authorized(server):
    with Client(server.target) as anonymous:
        with pytest.raises(Unauthenticated):
            anonymous.encrypt(b"x", {})
    with Client(server.target, token="kw_not-a-real-token") as forged:
        with pytest.raises(Unauthenticated):
            forged.encrypt(b"x", {})
    with Client(server.target, token=server.app_token) as app:
        with pytest.raises(PermissionDenied):
            app.start_rotation()


def test_batches_report_each_item(server):
    with Client(server.target, token=server.app_token) as kw:
        sealed = kw.batch_encrypt([(f"secret {i}".encode(), {"n": str(i)}) for i in range(3)])
        assert all(isinstance(s, Sealed) for s in sealed)
        opened = kw.batch_decrypt(
            [(s.blob, {"n": "99" if i == 1 else str(i)}) for i, s in enumerate(sealed)]
        )
        assert isinstance(opened[0], Opened) and opened[0].plaintext == b"secret 0"
        assert isinstance(opened[1], InvalidArgument)
        assert isinstance(opened[2], Opened) and opened[2].plaintext == b"secret 2"


def test_watch_rotation_is_a_generator_to_the_end(server):
    with Client(server.target, token=server.admin_token) as kw:
        rows = []
        for i in range(12):
            row_id = f"py-conn-{i:02}"
            envelope = kw.encrypt(f"credential {i}".encode(), {"connection_id": row_id}).envelope
            rows.append(
                (
                    row_id,
                    envelope.encryption_key_id,
                    envelope.data_key_ciphertext,
                    envelope.data_key_iv,
                    envelope.payload_ciphertext,
                    envelope.payload_iv,
                )
            )
        with sqlite3.connect(server.database, timeout=10) as db:
            db.executemany(
                "INSERT INTO connections (id, encryption_key_id, data_key_ciphertext, "
                "data_key_iv, payload_ciphertext, payload_iv) VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        new_key = kw.admin(
            "CreateKey", admin_pb2.CreateKeyRequest(key_id="py-next", activate=True)
        )
        job = kw.start_rotation(batch_size=5)
        events = list(kw.watch_rotation(job.id))
        assert events[-1].terminal
        last = events[-1].job
        assert last.status == admin_pb2.ROTATION_STATUS_COMPLETED
        assert last.succeeded_rows >= 12 and last.failed_rows == 0
        with pytest.raises(NotFound):
            list(kw.watch_rotation("no-such-job"))
        # Every row reads back under its own context.
        for row_id, *_ in rows:
            i = int(row_id.rsplit("-", 1)[1])
            with sqlite3.connect(server.database, timeout=10) as db:
                key, dk, dkiv, ct, iv = db.execute(
                    "SELECT encryption_key_id, data_key_ciphertext, data_key_iv, "
                    "payload_ciphertext, payload_iv FROM connections WHERE id = ?",
                    (row_id,),
                ).fetchone()
            envelope = crypto_pb2.Envelope(
                encryption_key_id=key,
                data_key_ciphertext=dk,
                data_key_iv=dkiv,
                payload_ciphertext=ct,
                payload_iv=iv,
            )
            opened = kw.decrypt(envelope, {"connection_id": row_id})
            assert opened.plaintext == f"credential {i}".encode()
            assert opened.encryption_key_id == new_key.id


def test_errors_carry_their_code(server):
    with Client(server.target, token=server.app_token) as kw:
        with pytest.raises(KeywardError) as caught:
            kw.decrypt(b"not a blob", {})
        assert caught.value.code.name == "INVALID_ARGUMENT"
