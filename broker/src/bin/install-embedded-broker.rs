//! Installs the embedded broker if it is missing and prints the binary's path: what
//! `orderflow broker --install-only` does, as a binary that builds in seconds, so `scripts/test`
//! can start the broker's build beside the workspace's.

use std::process::ExitCode;

fn main() -> ExitCode {
    match orderflow_broker::install::resolve(
        None,
        orderflow_broker::Install::IfMissing,
        |command| {
            eprintln!("Installing the embedded broker: {command}");
        },
    ) {
        Ok(path) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
