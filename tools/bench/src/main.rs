//! `refund-bench`: refunds per second, latency and cost per refund of the refund processor,
//! against this machine's own ceilings (issue #8). See `refund_bench` and docs/benchmarks.md.
//!
//! Run from the workspace root after `cargo build --release --bins` (`just bench` does both):
//! it starts `refund-sim` and `refund-worker` from its own folder, uses PostgreSQL and RabbitMQ
//! at `DATABASE_URL` / `AMQP_URL`, prints a table, and writes `--json` and `--markdown`.

use clap::Parser;
use refund_bench::{self as bench, Options};

fn main() -> std::process::ExitCode {
    let opts = Options::parse();
    // The test kit creates scenario databases through DATABASE_URL; set it before any thread
    // exists (the runtime is built below).
    // SAFETY: single-threaded here: no other thread can read the environment concurrently.
    unsafe { std::env::set_var("DATABASE_URL", &opts.admin_url) };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("refund-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let json = opts.json.clone();
    let markdown = opts.markdown.clone();
    let report = match runtime.block_on(bench::run(opts)) {
        Ok(r) => r,
        Err(e) => {
            return shared::telemetry::fail("refund-bench", "refund-bench failed", &e);
        }
    };
    println!("{}", bench::render_text(&report));
    if let Some(path) = json {
        let text = match serde_json::to_string_pretty(&report) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("refund-bench: cannot encode the report: {e}");
                return std::process::ExitCode::from(2);
            }
        };
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("refund-bench: cannot write {}: {e}", path.display());
            return std::process::ExitCode::from(2);
        }
        eprintln!("refund-bench: JSON report in {}", path.display());
    }
    if let Some(path) = markdown {
        if let Err(e) = bench::write_markdown(&path, &bench::render_markdown(&report)) {
            return shared::telemetry::fail("refund-bench", "refund-bench failed", &e);
        }
        eprintln!(
            "refund-bench: results section written to {}",
            path.display()
        );
    }
    // The reports are written either way, errors marked in them; the status tells a script.
    let failures = report.failures();
    for f in &failures {
        eprintln!("refund-bench: failed: {f}");
    }
    if failures.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
