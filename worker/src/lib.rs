//! `refund-worker`: takes refund requests off RabbitMQ and drives each job to a final state.
//!
//! The process is a handful of cooperating tasks around one Postgres pool: the [`consumer`]
//! (intake: message → job, acked only after commit), the [`executor`] (claim with a lease, call
//! the provider, record the outcome with ledger and event), whose claims and outcomes the
//! [`writer`] batches across jobs, the [`sweeper`] (expired leases,
//! due retries, orphans), the [`relay`] (outbox → `refunds.events` with confirms), the
//! [`notify`] listener and the [`status_sync`] queries (how accepted refunds ended), and the
//! [`health`] endpoint (metrics, liveness, readiness). [`app`] wires them and owns shutdown.

pub mod app;
pub mod console;
pub mod consumer;
pub mod ctl;
pub mod executor;
pub mod flow;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod relay;
pub mod signals;
pub mod status_sync;
pub mod sweeper;
pub mod writer;
