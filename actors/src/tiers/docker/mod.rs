//! The `docker` tier: the service in local containers.

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
#[cfg(test)]
mod tls_tests;

use std::sync::Arc;

use crate::autoheal::AutohealHandle;
use crate::contract::{Driver, DriverFactory, TierId};
use crate::instance::Instance;
use crate::tier::TierSpec;

pub use config::{DockerConfig, TlsConfig};
pub use connect::DockerEnv;
pub use driver::DockerDriver;

/// The tier as the root runs it for cascade `instance`. `env` is what the
/// process read of the docker CLI's environment; `autoheal` is told of the
/// containers cascade stops itself.
pub fn tier_spec(
    config: DockerConfig,
    env: DockerEnv,
    instance: Instance,
    autoheal: Option<AutohealHandle>,
) -> TierSpec {
    let fingerprint = crate::tier::fingerprint(&config);
    let driver_config = config.clone();
    let factory: DriverFactory = Arc::new(move |events| {
        let driver = DockerDriver::new(
            driver_config.clone(),
            &env,
            instance.clone(),
            events,
            autoheal.clone(),
        )?;
        Ok(Arc::new(driver) as Arc<dyn Driver>)
    });
    TierSpec {
        id: TierId::Docker,
        factory,
        probe: crate::tier::ProbeConfig {
            timeout: config.probe_deadline(),
            ..config.probe.clone()
        },
        breaker: config.breaker.clone(),
        start_timeout: config.start_timeout,
        stop_grace: config.stop_grace,
        fingerprint,
    }
}
