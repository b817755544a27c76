#!/bin/sh
# Generates the keyward.v1 messages and service descriptors for
# @bufbuild/protobuf and Connect (protoc-gen-es) from the repository's
# proto/ (protoc: ../protoc.sh).
set -eu
cd "$(dirname "$0")"
sh ../protoc.sh src/gen \
  --plugin=protoc-gen-es=./node_modules/.bin/protoc-gen-es \
  --es_out=src/gen --es_opt=target=ts,import_extension=js
