"""The generated stubs are committed (src/keyward/v1), so `pip install
./clients/python` works in an isolated build that reaches neither proto/
nor grpcio-tools. This test regenerates them from the repository's proto/
with the pinned grpcio-tools (the `dev` extra) and fails when they differ:
run ./generate.sh and commit."""

import subprocess
import sys
from pathlib import Path

PYTHON_CLIENT = Path(__file__).resolve().parents[1]
PROTO = PYTHON_CLIENT.parents[1] / "proto"
COMMITTED = PYTHON_CLIENT / "src" / "keyward" / "v1"


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(PROTO / "keyward/v1/crypto.proto"), str(PROTO / "keyward/v1/admin.proto"),
        ],
        check=True,
    )
    fresh = {p.name: p.read_text() for p in (tmp_path / "keyward" / "v1").iterdir()}
    assert len(fresh) == 6
    drifted = [
        name for name, text in sorted(fresh.items())
        if not (COMMITTED / name).is_file() or (COMMITTED / name).read_text() != text
    ]
    assert not drifted, f"{drifted} differ from proto/: run clients/python/generate.sh and commit"
