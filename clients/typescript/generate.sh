#!/bin/sh
# Generates TypeScript types and @grpc/grpc-js stubs for keyward.v1 from the
# repository's proto/ with ts-proto (protoc: ../protoc.sh, from the pinned
# grpcio-tools) into src/gen, or into the directory given. src/gen is
# committed, so a packed or installed client needs neither proto/ nor
# protoc: run this after changing proto/ and commit the result
# (test/stubs.test.ts fails until then).
set -eu
cd "$(dirname "$0")"
out="${1:-src/gen}"
sh ../protoc.sh "$out" \
  --plugin=protoc-gen-ts_proto=./node_modules/.bin/protoc-gen-ts_proto \
  --ts_proto_out="$out" \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,importSuffix=.js,useDate=string
