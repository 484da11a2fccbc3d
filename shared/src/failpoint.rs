//! Crash points for the fault-injection suite.
//!
//! The fault suite must kill the worker at exact steps of a job (after the claim, after the
//! provider answered, after the outcome is recorded, after intake committed but before the ack,
//! after an event was published but before the outbox row is deleted). Timing a `kill -9` from
//! outside cannot hit those windows reliably, so the worker names them with [`hit`], and a
//! process started with `REFUNDS_FAILPOINT=<name>[:<n>]` aborts on the n-th hit (default the
//! first) — no destructor, no flush, no ack: the same as `kill -9` at that line. Without the
//! variable, [`hit`] is one relaxed atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that arms a crash point.
pub const ENV: &str = "REFUNDS_FAILPOINT";

fn armed() -> Option<&'static (String, u64)> {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let v = std::env::var(ENV).ok()?;
        let (name, n) = match v.split_once(':') {
            Some((name, n)) => (name.to_owned(), n.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((name, n.max(1)))
    })
    .as_ref()
}

/// Marks a crash point; aborts the process if this is the armed point's n-th hit.
pub fn hit(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    if let Some((armed, at)) = armed()
        && armed == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *at
    {
        eprintln!("{ENV}: crashing at {name} (hit {at})");
        std::process::abort();
    }
}
