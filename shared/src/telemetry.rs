//! Logging: JSON lines on stdout, filtered by `RUST_LOG` (default `info`).
//!
//! Each job runs in a span carrying `refund_no`, provider, merchant and attempt, so every line
//! about a refund can be found by its number. Secrets never reach a log: keys and `rfkey` live
//! in [`crate::config::Secret`], which prints as `***`, and signatures are not logged.

use tracing_subscriber::EnvFilter;

/// Installs the JSON subscriber once; later calls are no-ops.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
}
