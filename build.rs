//! Compiles `proto/keyward/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler), so building keyward needs no system `protoc`. The encoded
//! descriptor set is also written to `OUT_DIR` for server reflection.

use std::{env, fs, path::PathBuf};

use protox::prost::Message;

const PROTOS: &[&str] = &[
    "proto/keyward/v1/crypto.proto",
    "proto/keyward/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    fs::write(
        out_dir.join("keyward_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // `bytes` fields as `bytes::Bytes`: decoding slices the request
        // buffer instead of allocating and copying each field.
        .bytes(".")
        // Buffers sized from the message's length (see src/api/codec.rs).
        .codec_path("crate::api::codec::SizedProstCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
