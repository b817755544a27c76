//! The `keyward` binary: parses the command line and hands over to
//! [`keyward::cli::run`].

use std::process::ExitCode;

fn main() -> ExitCode {
    keyward::cli::main()
}
