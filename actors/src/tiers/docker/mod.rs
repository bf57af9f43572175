//! The `docker` tier: the service in local containers, and event-driven
//! autoheal of labelled containers.

pub mod autoheal;
mod client;
pub mod config;
pub mod connect;
mod daemon;
mod driver;
mod plan;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
mod webhook;

pub use config::DockerConfig;
pub use driver::DockerDriver;
