//! The generated stubs are committed (`src/gen/keyward.v1.rs`), so the
//! crate builds from a packaged copy, with no `proto/` beside it and no
//! `protoc`. This test regenerates them from the repository's `proto/`
//! and fails when the committed file differs, after writing the fresh one
//! (rust-analyzer's `ensure_file_contents`): run it, review the diff,
//! commit.

use std::path::Path;

const PROTOS: &[&str] = &["keyward/v1/crypto.proto", "keyward/v1/admin.proto"];

#[test]
fn committed_stubs_match_the_proto() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = crate_dir.join("../../proto");
    let out = tempfile::tempdir().unwrap();
    let files: Vec<_> = PROTOS.iter().map(|p| proto_dir.join(p)).collect();
    let descriptors = protox::compile(&files, [&proto_dir]).unwrap();
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .bytes(".")
        .out_dir(out.path())
        .compile_fds(descriptors)
        .unwrap();
    let fresh = std::fs::read_to_string(out.path().join("keyward.v1.rs")).unwrap();
    let committed_path = crate_dir.join("src/gen/keyward.v1.rs");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if fresh != committed {
        std::fs::write(&committed_path, &fresh).unwrap();
        panic!(
            "{} was not generated from proto/ as it stands: it has been rewritten; review and commit it",
            committed_path.display()
        );
    }
}
