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

/// An error with its causes, `: `-separated like anyhow's `{:#}`, leaving out a cause whose
/// message is already in what was printed: our error types embed their source in their own
/// message, and sqlx's database error does too, so the plain chain says everything two or three
/// times.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A binary's fatal error: logged (as `what`) and printed on stderr as `program: causes`; the
/// exit status 2 ("could not run").
pub fn fail(program: &str, what: &str, e: &anyhow::Error) -> std::process::ExitCode {
    let message = error_chain(e.as_ref());
    tracing::error!(error = message, "{what}");
    eprintln!("{program}: {message}");
    std::process::ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("database: {0}")]
    struct Outer(#[from] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let e = anyhow::Error::new(Outer(std::io::Error::other("connection refused")))
            .context("connecting to PostgreSQL");
        assert_eq!(
            format!("{e:#}"),
            "connecting to PostgreSQL: database: connection refused: connection refused"
        );
        assert_eq!(
            error_chain(e.as_ref()),
            "connecting to PostgreSQL: database: connection refused"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(plain.as_ref()), "outer: inner");
    }
}
