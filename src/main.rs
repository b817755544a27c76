//! The `keyward` binary: parses the command line and hands over to
//! [`keyward::cli::main`].

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the gRPC path allocates many short-lived
/// buffers from every worker thread, and glibc's arena locks showed up as
/// contention in profiles of `keyward bench`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    keyward::cli::main()
}
