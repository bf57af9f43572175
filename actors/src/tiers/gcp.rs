//! What the Google Cloud tiers (`cloud_run`, `gcp_vm`) share: where
//! credentials come from.
//!
//! Invariant: only the process reads the environment, in
//! [`GcpEnv::from_env`] (when it builds tier specs: at start and on reload);
//! drivers take a `GcpEnv` value, so tests point them at a fake metadata
//! server without touching environment variables.

use std::path::PathBuf;

/// Where Google credentials come from, read from the environment by the
/// process and passed in, so tests point the driver at a fake without
/// touching environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcpEnv {
    /// `GCE_METADATA_HOST`: `host[:port]` of the metadata server; else
    /// `metadata.google.internal`.
    pub metadata_host: Option<String>,
    /// `GOOGLE_APPLICATION_CREDENTIALS`: a service-account key file.
    pub credentials_file: Option<PathBuf>,
}

impl GcpEnv {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        GcpEnv {
            metadata_host: var("GCE_METADATA_HOST"),
            credentials_file: var("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from),
        }
    }

    /// `host[:port]` of the metadata server.
    pub fn metadata_host(&self) -> &str {
        self.metadata_host
            .as_deref()
            .unwrap_or("metadata.google.internal")
    }
}
