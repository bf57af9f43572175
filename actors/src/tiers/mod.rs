//! One module per backend tier. Each has the same anatomy: `mod.rs` (its
//! configuration and its [`crate::contract::Driver`]), `client.rs` (the only
//! file that talks to the outside world) and `tests.rs`.

pub mod cloud_run;
pub mod docker;
pub mod gcp;
pub mod gcp_vm;
pub mod health;
pub mod local;
pub mod ports;
