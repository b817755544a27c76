#!/bin/sh
# Generates the keyward.v1 stubs (messages and gRPC stubs) from the
# repository's proto/ into src/keyward/v1 (protoc: ../protoc.sh), with the
# grpcio-tools pinned in pyproject.toml's dev extra. They are committed, so
# an isolated `pip install ./clients/python` needs neither proto/ nor
# grpcio-tools: run this after changing proto/ and commit the result
# (tests/test_stubs.py fails until then).
set -eu
cd "$(dirname "$0")"
sh ../protoc.sh src/keyward --python_out=src --pyi_out=src --grpc_python_out=src
touch src/keyward/__init__.py src/keyward/v1/__init__.py
