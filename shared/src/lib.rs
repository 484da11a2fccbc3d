//! The refund processor's core library.
//!
//! Binaries (`refund-worker`, `refundctl`, `refund-reconciler`) are thin shells over this crate.
//! Modules follow the domain: [`job`] (the request contract and intake validation), [`state`]
//! (the job state machine as data), [`workflow`] (what an outcome means: retry, fail, dead),
//! [`store`] (every Postgres query), [`broker`] (AMQP topology and publishing), [`events`]
//! (outcome events), [`provider`] (the provider trait and the ShengPay and WuPay clients),
//! [`config`] and [`telemetry`].

pub mod broker;
pub mod config;
pub mod events;
pub mod failpoint;
pub mod job;
pub mod provider;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod workflow;
