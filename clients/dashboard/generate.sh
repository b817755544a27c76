#!/bin/sh
# Generates the keyward.v1 messages and service descriptors for
# @bufbuild/protobuf and Connect (protoc-gen-es) from the repository's
# proto/. protoc comes from PyPI's grpcio-tools: PYTHON names a Python that
# has it (scripts/test: .tools/venv).
set -eu
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
rm -rf src/gen
mkdir -p src/gen
"$PYTHON" -m grpc_tools.protoc -I ../../proto \
  --plugin=protoc-gen-es=./node_modules/.bin/protoc-gen-es \
  --es_out=src/gen --es_opt=target=ts,import_extension=js \
  ../../proto/keyward/v1/crypto.proto ../../proto/keyward/v1/admin.proto
