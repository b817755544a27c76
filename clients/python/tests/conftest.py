"""A real keyward server for the tests: `keyward serve` (the binary built by
cargo, or $KEYWARD_BIN) on a fresh SQLite database, with bearer tokens made
by `keyward token create`. Without the binary the tests are skipped, and
fail instead when CI=true."""

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from keyward_client import Client, KeywardError

REPO = Path(__file__).resolve().parents[3]
MASTER = "python-client-test-master-secret-0123456789"


@dataclass
class Server:
    target: str
    database: Path
    admin_token: str
    app_token: str


def _binary() -> Path:
    path = Path(os.environ.get("KEYWARD_BIN", REPO / "target" / "debug" / "keyward"))
    if not path.is_file():
        why = f"no keyward binary at {path} (run cargo build, or set KEYWARD_BIN)"
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serve(workdir: Path, *serve_args: str) -> Iterator[Server]:
    """`keyward serve` on a fresh SQLite database in `workdir`, with an
    admin and an application token, until the block ends."""
    binary = _binary()
    database = workdir / "keyward.db"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": f"sqlite://{database}",
        "ENCRYPTION_MASTER_KEY": MASTER,
        "RUST_LOG": "warn",
    }

    def keyward(*args: str) -> str:
        return subprocess.run(
            [str(binary), *args], env=env, check=True, capture_output=True, text=True
        ).stdout.strip()

    keyward("seed-key")
    admin_token = keyward(
        "token", "create", "--name", "py-admin",
        "--role", "admin", "--role", "encrypt", "--role", "decrypt", "--role", "rewrap",
    )
    app_token = keyward(
        "token", "create", "--name", "py-app", "--role", "encrypt", "--role", "decrypt"
    )
    target = f"127.0.0.1:{_free_port()}"
    log = open(workdir / "server.log", "w")
    process = subprocess.Popen(
        [str(binary), "serve", "--listen", target, "--audit-log", "off", *serve_args],
        env=env, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        with Client(target, token=admin_token) as probe:
            while True:
                try:
                    probe.list_keys()
                    break
                except KeywardError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise RuntimeError((workdir / "server.log").read_text())
                    time.sleep(0.1)
        yield Server(target, database, admin_token, app_token)
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One server the tests share (they change no key)."""
    with _serve(tmp_path_factory.mktemp("keyward")) as running:
        yield running


@pytest.fixture
def idle_server(tmp_path):
    """A server of the test's own, with no rotation worker: a job it starts
    stays pending until the test moves it."""
    with _serve(tmp_path, "--no-worker") as running:
        yield running
