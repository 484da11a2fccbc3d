//! `refundctl`: the operator CLI. See `worker::ctl` for what each command does.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Usage errors exit 2 (clap's default), `--help` and `--version` exit 0.
    let cli = worker::ctl::Cli::parse();
    worker::ctl::main(cli).await
}
