//! `refund-reconciler`: every night, does what the providers settled match what we booked?
//!
//! For one business date (in the configured time zone) the reconciler compares, per provider
//! and merchant, the ledger's `settlement_refund_fee` total with the provider's
//! `settlementRefundFee` total, and drills down per refund to say exactly which refunds differ
//! and why (DESIGN §7). The provider side is either provider statements (CSV, [`statement`]) or,
//! without one, the results the providers returned to our own calls (`provider_attempts`).
//!
//! Modules: [`day`] (a business date's instants and grace windows), [`statement`] (the CSV
//! contract, read strictly and streamed into PostgreSQL with `COPY`), [`run`] (the comparison,
//! done inside PostgreSQL, and the stored run), [`report`] (table, JSON contract and CSV
//! renderings of a stored run, streamed), [`schedule`] (the cron loop), [`cli`] (the command
//! line) and [`progress`] (progress bars on a terminal).
//!
//! Memory does not depend on the number of refunds: statements are streamed into the database,
//! matching is SQL, and reports are streamed out of the database row by row. What the process
//! holds is bounded by the number of (provider, merchant) pairs.

pub mod cli;
pub mod day;
pub mod fetch;
pub mod plain;
pub mod progress;
pub mod repair;
pub mod report;
pub mod run;
pub mod runs;
pub mod schedule;
pub mod statement;

pub use report::Format;
pub use run::{RunError, RunOutcome, RunRequest, Status};

/// The discrepancy kinds of DESIGN §7, as stored and reported.
pub const KINDS: [&str; 7] = [
    "amount_mismatch",
    "missing_at_provider",
    "missing_in_ledger",
    "duplicate_at_provider",
    "pending",
    "invalid_at_provider",
    "statement_missing",
];

/// Providers a statement row or `--provider` may name.
pub const PROVIDERS: [&str; 2] = ["shengpay", "wupay"];
