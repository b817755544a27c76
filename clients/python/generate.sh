#!/usr/bin/env bash
# Generates the keyward.v1 stubs (messages and gRPC stubs) from the
# repository's proto/ into src/keyward/v1 with grpcio-tools. They are not
# committed: run this after changing proto/ (scripts/test always does).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
rm -rf src/keyward
mkdir -p src/keyward/v1
"$PYTHON" -m grpc_tools.protoc -I ../../proto \
  --python_out=src --pyi_out=src --grpc_python_out=src \
  ../../proto/keyward/v1/crypto.proto ../../proto/keyward/v1/admin.proto
touch src/keyward/__init__.py src/keyward/v1/__init__.py
