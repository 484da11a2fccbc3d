//! `refund-reconciler`: see the `reconciler` library for what it does.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    reconciler::cli::main().await
}
