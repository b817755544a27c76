#!/bin/sh
# Generates TypeScript types and @grpc/grpc-js stubs for keyward.v1 from the
# repository's proto/ with ts-proto. protoc itself comes from grpcio-tools
# (PyPI), the one protoc distribution installable without a download from
# GitHub: PYTHON names a Python that has it (scripts/test: .tools/venv).
set -eu
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
rm -rf src/gen
mkdir -p src/gen
"$PYTHON" -m grpc_tools.protoc -I ../../proto \
  --plugin=protoc-gen-ts_proto=./node_modules/.bin/protoc-gen-ts_proto \
  --ts_proto_out=src/gen \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,importSuffix=.js,useDate=string \
  ../../proto/keyward/v1/crypto.proto ../../proto/keyward/v1/admin.proto
