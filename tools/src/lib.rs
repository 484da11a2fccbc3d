//! Development and test tools for the refund processor: the provider simulator (`sim`) that the
//! demo, the integration tests, the fault-injection suite and the benchmark run against.

pub mod bench;
pub mod faultproxy;
pub mod private;
pub mod sim;
pub mod testkit;
