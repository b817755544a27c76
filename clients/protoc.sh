#!/bin/sh
# protoc over keyward's proto/ for the client generators: `protoc.sh OUT
# [protoc flags…]` empties OUT, then compiles proto/keyward/v1/*.proto with
# the flags given (plugins, output options). protoc itself comes from PyPI's
# grpcio-tools, the one protoc distribution installable here without a
# download from GitHub: PYTHON names a Python that has it (scripts/test:
# .tools/venv).
set -eu
out="$1"
shift
proto="$(cd "$(dirname "$0")/../proto" && pwd)"
rm -rf "$out"
mkdir -p "$out"
"${PYTHON:-python3}" -m grpc_tools.protoc -I "$proto" "$@" \
  "$proto/keyward/v1/crypto.proto" "$proto/keyward/v1/admin.proto"
