#!/bin/sh
# Generates TypeScript types and @grpc/grpc-js stubs for keyward.v1 from the
# repository's proto/ with ts-proto (protoc: ../protoc.sh).
set -eu
cd "$(dirname "$0")"
sh ../protoc.sh src/gen \
  --plugin=protoc-gen-ts_proto=./node_modules/.bin/protoc-gen-ts_proto \
  --ts_proto_out=src/gen \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,importSuffix=.js,useDate=string
