//! The refund processor's core library.
//!
//! Binaries (`refund-worker`, `refundctl`, `refund-reconciler`) are thin shells over this crate.
//! Modules follow the domain: [`job`] (the request contract and intake validation), [`state`]
//! (the job state machine as data), [`store`] (every Postgres query), [`broker`] (AMQP
//! topology and publishing), [`provider`] (the provider trait and the ShengPay and WuPay
//! clients), [`ledger`] (business dates and ledger rules), [`config`] and [`telemetry`].

pub mod config;
pub mod job;
pub mod provider;
