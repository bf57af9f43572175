//! Integration tests of the `cascade` binary: each test runs the real
//! executable (with the built-in demo backend as its local tier) in its own
//! temp state directory, on free ports, so tests run in parallel.

mod api;
mod autoheal;
mod cli;
mod config;
mod docker;
mod gcp;
mod lifecycle;
mod local;
mod page;
mod reload;
mod router;
mod service;
mod support;
mod telemetry;
mod waterfall;
