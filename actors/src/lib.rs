//! cascade's actor system: the root supervisor, the backend contract, the
//! resilience primitives and one module per backend tier.
//!
//! Data flows one way: configuration → [`supervisor`] → tier actors
//! ([`tier`], each around a tier's [`contract::Driver`]) → published
//! [`supervisor::Snapshot`]s that the process's HTTP API and CLI read.

#![deny(unsafe_code)]

pub mod autoheal;
pub mod contract;
pub mod instance;
pub mod metrics;
pub mod notify;
pub mod resilience;
pub mod routing;
pub mod secrets;
pub mod supervisor;
pub mod text;
pub mod tier;
pub mod tiers;
pub mod waterfall;

pub use contract::{TierId, TierState, TierStatus};
pub use instance::Instance;
