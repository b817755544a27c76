#!/bin/sh
# Generates the keyward.v1 stubs (messages and gRPC stubs) from the
# repository's proto/ into src/keyward/v1 (protoc: ../protoc.sh). They are
# not committed: run this after changing proto/ (scripts/test always does).
set -eu
cd "$(dirname "$0")"
sh ../protoc.sh src/keyward --python_out=src --pyi_out=src --grpc_python_out=src
touch src/keyward/__init__.py src/keyward/v1/__init__.py
