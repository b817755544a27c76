//! Generates the `keyward.v1` client stubs from the repository's `proto/`
//! with protox, so building needs no system `protoc`.

const PROTOS: &[&str] = &[
    "../../proto/keyward/v1/crypto.proto",
    "../../proto/keyward/v1/admin.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["../../proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
