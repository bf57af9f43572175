//! The `gcp_vm` tier against the local fake Compute Engine (`cascade-gcp-fake`), plus its pure
//! parts (configuration, the insert body, error classification, the reconcile's merge) and the
//! checkpoint under SIGKILL.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cascade_gcp_fake::{FakeGcp, FakeOptions};
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::checkpoint::{self, Checkpoint, Loaded, OpKind, OpRef, Phase, VmEntry};
use super::client::{self, ApiError, Op, Vm};
use super::pool::{self, Merge, Pool, PoolState};
use super::retry::{Retrier, RetryWait};
use super::*;
use crate::contract::{DriverEvent, StopReason};
use crate::resilience::{Deadline, RetryBudgetConfig};

const POOL: &str = "pool";

// === harness ===

struct Harness {
    fake: FakeGcp,
    dir: TempDir,
    events: mpsc::UnboundedReceiver<DriverEvent>,
    notify: pool::Notify,
    waits: Arc<Mutex<Vec<RetryWait>>>,
}

impl Harness {
    async fn new() -> Self {
        Self::with(FakeOptions::default()).await
    }

    async fn with(options: FakeOptions) -> Self {
        let fake = FakeGcp::start(options).await.expect("the fake starts");
        let (tx, events) = mpsc::unbounded_channel();
        let notify: pool::Notify = Arc::new(move |event| {
            let _ = tx.send(event);
        });
        Harness {
            fake,
            dir: TempDir::new().expect("temp dir"),
            events,
            notify,
            waits: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn config(&self) -> GcpVmConfig {
        let options = self.fake.options();
        GcpVmConfig {
            project: options.project.clone(),
            zone: options.zone.clone(),
            pool: POOL.into(),
            endpoint: self.fake.compute_endpoint(),
            service_port: self.fake.vm_service_port(),
            health_path: options.vm_health_path.clone(),
            watch_interval: Duration::from_millis(100),
            reconcile_interval: Duration::from_millis(300),
            operation_timeout: Duration::from_secs(10),
            api_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(20),
            retry: RetryConfig {
                base: Duration::from_millis(10),
                cap: Duration::from_millis(100),
                ..RetryConfig::default()
            },
            ..GcpVmConfig::default()
        }
    }

    fn env(&self) -> GcpEnv {
        GcpEnv {
            metadata_host: Some(self.fake.metadata_host()),
            credentials_file: None,
        }
    }

    fn checkpoint(&self) -> PathBuf {
        self.dir.path().join("gcp_vm").join(format!("{POOL}.json"))
    }

    fn observer(&self) -> retry::RetryObserver {
        let waits = self.waits.clone();
        Arc::new(move |w: &RetryWait| waits.lock().expect("lock").push(w.clone()))
    }

    fn driver(&self, config: GcpVmConfig) -> GcpVmDriver {
        GcpVmDriver::build(
            config,
            self.checkpoint(),
            self.env(),
            self.notify.clone(),
            Some(self.observer()),
        )
        .expect("the driver builds")
    }

    /// A pool without the watch: steps run only when the test calls them.
    fn bare_pool(&self, config: GcpVmConfig) -> Arc<Pool> {
        self.bare_pool_at(config, self.checkpoint())
    }

    fn bare_pool_at(&self, config: GcpVmConfig, path: PathBuf) -> Arc<Pool> {
        let retrier = Retrier::new(config.retry.clone(), Instant::now());
        Arc::new(
            Pool::new(config, path, self.env(), retrier, self.notify.clone())
                .expect("the pool builds"),
        )
    }

    fn requests(&self, method_id: &str) -> Vec<cascade_gcp_fake::ApiRequest> {
        self.fake
            .compute_requests()
            .into_iter()
            .filter(|r| r.method_id == method_id)
            .collect()
    }

    fn deletes(&self) -> Vec<cascade_gcp_fake::ApiRequest> {
        self.requests("compute.instances.delete")
    }

    fn inserts(&self) -> Vec<cascade_gcp_fake::ApiRequest> {
        self.fake
            .compute_requests()
            .into_iter()
            .filter(|r| r.method_id == "compute.instances.insert")
            .collect()
    }

    fn instance_status(&self, name: &str) -> Option<String> {
        self.fake
            .instances()
            .into_iter()
            .find(|i| i.name == name)
            .map(|i| i.status)
    }

    /// Waits for an event matching `want`, returning it.
    async fn event(
        &mut self,
        within: Duration,
        want: impl Fn(&DriverEvent) -> bool,
    ) -> DriverEvent {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(event)) if want(&event) => return event,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("no matching driver event within {within:?}"),
            }
        }
    }

    fn assert_no_rejections(&self) {
        assert!(
            self.fake.rejections().is_empty(),
            "the fake rejected requests: {:?}",
            self.fake.rejections()
        );
    }
}

/// Polls `check` until it is true or `within` passes.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn phases(driver: &GcpVmDriver) -> BTreeMap<String, Phase> {
    driver.pool.read(|s| {
        s.vms
            .values()
            .map(|vm| (vm.name.clone(), vm.phase))
            .collect()
    })
}

fn labels() -> [(&'static str, &'static str); 1] {
    [(POOL_LABEL, POOL)]
}

// === configuration and pure parts ===

#[test]
fn the_default_config_needs_only_project_and_zone() {
    let keys: Vec<String> = GcpVmConfig::default()
        .validate()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["project", "zone"]);
    let ok = GcpVmConfig {
        project: "p".into(),
        zone: "z".into(),
        ..GcpVmConfig::default()
    };
    assert!(ok.validate().is_empty(), "{:?}", ok.validate());
}

#[test]
fn validate_names_each_bad_key() {
    let bad = GcpVmConfig {
        project: "p".into(),
        zone: "z".into(),
        pool: "Ecapa_".into(),
        vms: 3,
        max_vms: 2,
        service_port: 0,
        health_path: "health".into(),
        idle_ttl: Duration::ZERO,
        endpoint: "compute.googleapis.com".into(),
        labels: BTreeMap::from([
            ("cascade-pool".into(), "x".into()),
            ("Team".into(), "a".into()),
        ]),
        retry: RetryConfig {
            max_attempts: 0,
            budget: RetryBudgetConfig {
                ratio: -1.0,
                ..RetryBudgetConfig::default()
            },
            ..RetryConfig::default()
        },
        ..GcpVmConfig::default()
    };
    let keys: BTreeSet<String> = bad.validate().into_iter().map(|(k, _)| k).collect();
    for key in [
        "pool",
        "max_vms",
        "service_port",
        "health_path",
        "idle_ttl",
        "endpoint",
        "labels",
        "retry.max_attempts",
        "retry.budget.ratio",
    ] {
        assert!(keys.contains(key), "{key} missing from {keys:?}");
    }
    let long = GcpVmConfig {
        project: "p".into(),
        zone: "z".into(),
        pool: "a".repeat(62),
        max_vms: 11,
        ..GcpVmConfig::default()
    };
    assert!(long.validate()[0].1.contains("63 characters"));
    // Compute Engine calls carry an access token: TLS, or loopback only (the fake).
    let endpoint = |endpoint: &str| GcpVmConfig {
        project: "p".into(),
        zone: "z".into(),
        endpoint: endpoint.into(),
        ..GcpVmConfig::default()
    };
    assert!(endpoint("http://127.0.0.1:9000").validate().is_empty());
    let problems = endpoint("http://compute.internal.example").validate();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].0, "endpoint");
    assert!(problems[0].1.contains("must use https"), "{problems:?}");
}

#[test]
fn config_reads_toml_style_keys_and_rejects_unknown_ones() {
    let c: GcpVmConfig = serde_json::from_str(
        r#"{"project":"p","zone":"z","on_preemption":"drop","termination_action":"delete",
            "idle_ttl":"5m","retry":{"cap":"10s","budget":{"ratio":0.1}}}"#,
    )
    .expect("valid");
    assert_eq!(c.on_preemption, OnPreemption::Drop);
    assert_eq!(c.termination_action, TerminationAction::Delete);
    assert_eq!(c.idle_ttl, Duration::from_secs(300));
    assert_eq!(c.retry.cap, Duration::from_secs(10));
    assert_eq!(c.retry.budget.ratio, 0.1);
    assert!(serde_json::from_str::<GcpVmConfig>(r#"{"pooll":"x"}"#).is_err());
}

#[test]
fn the_insert_body_is_a_labelled_spot_vm_running_the_container() {
    let config = GcpVmConfig {
        project: "p".into(),
        zone: "europe-west1-b".into(),
        container_image: Some("europe-docker.pkg.dev/p/r/ecapa:1".into()),
        startup_script: Some("echo hi".into()),
        service_account: Some("vm@p.iam.gserviceaccount.com".into()),
        labels: BTreeMap::from([("team".into(), "audio".into())]),
        ..GcpVmConfig::default()
    };
    let body = client::instance_body(&config, "ecapa-1");
    let json = serde_json::to_value(&body).expect("serializes");
    assert_eq!(json["name"], "ecapa-1");
    assert_eq!(
        json["machineType"],
        "zones/europe-west1-b/machineTypes/e2-standard-2"
    );
    assert_eq!(json["labels"]["cascade-pool"], "ecapa");
    assert_eq!(json["labels"]["team"], "audio");
    assert_eq!(json["scheduling"]["provisioningModel"], "SPOT");
    assert_eq!(json["scheduling"]["instanceTerminationAction"], "STOP");
    assert_eq!(json["scheduling"]["automaticRestart"], false);
    assert_eq!(json["scheduling"]["onHostMaintenance"], "TERMINATE");
    assert_eq!(json["disks"][0]["boot"], true);
    assert_eq!(
        json["disks"][0]["initializeParams"]["sourceImage"],
        "projects/cos-cloud/global/images/family/cos-stable"
    );
    assert_eq!(
        json["networkInterfaces"][0]["network"],
        "global/networks/default"
    );
    assert!(json["networkInterfaces"][0]["accessConfigs"].is_null());
    assert_eq!(
        json["serviceAccounts"][0]["scopes"][0],
        client::CLOUD_PLATFORM
    );
    let items = json["metadata"]["items"].as_array().expect("metadata");
    assert_eq!(items[0]["key"], "gce-container-declaration");
    let declaration = items[0]["value"].as_str().expect("text");
    assert!(declaration.starts_with("spec:\n  containers:\n  - name: ecapa\n    image: 'europe-docker.pkg.dev/p/r/ecapa:1'\n"), "{declaration}");
    assert!(declaration.contains("value: '8080'"), "{declaration}");
    assert_eq!(items[1]["key"], "startup-script");
}

#[test]
fn api_errors_are_classified_for_retries() {
    let error = |status: Option<u16>, reason: Option<&str>| ApiError {
        status,
        reason: reason.map(str::to_owned),
        message: String::new(),
        retry_after: None,
        timed_out: false,
        credentials: false,
    };
    for status in [429, 500, 502, 503, 504] {
        assert!(error(Some(status), None).is_retryable(), "{status}");
    }
    for status in [400, 401, 403, 404, 409, 412] {
        assert!(!error(Some(status), None).is_retryable(), "{status}");
    }
    for reason in ["rateLimitExceeded", "userRateLimitExceeded", "backendError"] {
        assert!(error(Some(403), Some(reason)).is_retryable(), "{reason}");
    }
    assert!(error(None, None).is_retryable(), "no answer at all");
    assert!(error(Some(409), None).is_already_exists());
    assert!(error(Some(400), Some("alreadyExists")).is_already_exists());
    assert!(error(Some(404), None).is_not_found());
}

fn vm(name: &str, id: u64, status: &str) -> Vm {
    Vm {
        name: name.into(),
        id: Some(id),
        status: status.into(),
        ip: Some("10.0.0.2".into()),
        labels: BTreeMap::from([(POOL_LABEL.into(), POOL.into())]),
    }
}

fn preempted_op(name: &str, target: &str, target_id: u64) -> Op {
    Op {
        name: name.into(),
        operation_type: client::PREEMPTED.into(),
        done: true,
        error: None,
        target_link: Some(format!("https://x/zones/z/instances/{target}")),
        target_id: Some(target_id),
    }
}

fn ready_entry(slot: u32, id: u64) -> VmEntry {
    let mut e = VmEntry::new(
        format!("{POOL}-{slot}"),
        slot,
        Phase::Ready,
        SystemTime::now(),
    );
    e.instance_id = Some(id);
    e.ip = Some("10.0.0.2".into());
    e
}

fn merge_with(s: &mut PoolState, listed: &[Vm], preempted: &[Op], replace: bool) -> Vec<String> {
    let held: BTreeSet<u32> = (0..4).collect();
    let slot_of = |name: &str| name.strip_prefix("pool-").and_then(|s| s.parse().ok());
    pool::merge(
        s,
        &Merge {
            held: &held,
            listed,
            preempted,
            ops: &BTreeMap::new(),
            slot_of: &slot_of,
            replace,
            max_vms: 4,
            now: SystemTime::now(),
        },
    )
}

#[test]
fn merge_marks_a_preempted_vm_lost_once_and_ignores_old_preemptions() {
    let mut s = PoolState::default();
    s.wanted = true;
    s.vms.insert(0, ready_entry(0, 7));
    // RUNNING still, but a fresh preemption operation targets this very instance.
    let notes = merge_with(
        &mut s,
        &[vm("pool-0", 7, "RUNNING")],
        &[preempted_op("op-p", "pool-0", 7)],
        true,
    );
    assert_eq!(s.vms[&0].phase, Phase::Lost);
    assert!(notes[0].contains("preempted"), "{notes:?}");
    assert!(s.refill.contains(&0));
    // The replacement (same name, new id) is not condemned by the old operation.
    s.vms.insert(0, ready_entry(0, 8));
    let notes = merge_with(
        &mut s,
        &[vm("pool-0", 8, "RUNNING")],
        &[preempted_op("op-p", "pool-0", 7)],
        true,
    );
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(s.vms[&0].phase, Phase::Ready);
    // Without ids, the handled list is what protects it.
    s.vms.get_mut(&0).expect("entry").instance_id = None;
    let mut anonymous = preempted_op("op-p", "pool-0", 7);
    anonymous.target_id = None;
    merge_with(&mut s, &[vm("pool-0", 8, "RUNNING")], &[anonymous], true);
    assert_eq!(s.vms[&0].phase, Phase::Ready);
}

#[test]
fn merge_adopts_drops_and_marks_terminated() {
    let mut s = PoolState::default();
    s.wanted = true;
    s.vms.insert(0, ready_entry(0, 1));
    s.vms.insert(1, ready_entry(1, 2));
    let mut creating = VmEntry::new("pool-3".into(), 3, Phase::Creating, SystemTime::now());
    creating.last_operation = None;
    s.vms.insert(3, creating);
    let notes = merge_with(
        &mut s,
        &[
            vm("pool-0", 1, "TERMINATED"),
            vm("pool-2", 3, "RUNNING"),
            vm("other-1", 4, "RUNNING"),
        ],
        &[],
        false,
    );
    assert_eq!(s.vms[&0].phase, Phase::Lost);
    assert!(!s.vms.contains_key(&1), "pool-1 vanished");
    assert_eq!(s.vms[&2].phase, Phase::Booting, "pool-2 adopted");
    assert!(
        !s.vms.contains_key(&3),
        "an insert that never reached the API is dropped"
    );
    assert_eq!(s.vms.len(), 2, "other-1 is not the pool's name");
    assert!(s.refill.is_empty(), "drop policy refills nothing");
    assert_eq!(notes.len(), 4, "{notes:?}");
}

// === against the fake ===

#[tokio::test]
async fn an_insert_storm_of_429s_spreads_retries_and_stops_at_the_shared_budget() {
    let h = Harness::new().await;
    h.fake
        .fail_compute("compute.instances.insert", 10_000, 429, None);
    let cap = Duration::from_millis(100);
    let config = GcpVmConfig {
        vms: 2,
        max_vms: 2,
        retry: RetryConfig {
            base: Duration::from_millis(10),
            cap,
            max_attempts: 50,
            // Eight retries for the whole pool, whatever its traffic.
            budget: RetryBudgetConfig {
                ratio: 0.0,
                min_per_sec: 0.8,
                window: Duration::from_secs(10),
            },
        },
        ..h.config()
    };
    let driver = h.driver(config);
    let error = driver.start().await.expect_err("every insert is refused");
    assert!(error.0.contains("retry budget"), "{error}");
    // Once stop returns no background task runs, so the count below is final.
    driver.stop(StopReason::Exiting).await.expect("stops");
    assert_eq!(driver.pool.tracked_tasks(), 0);

    let inserts = h.inserts();
    assert_eq!(
        inserts.len(),
        2 + 8,
        "two first attempts, eight retries: {inserts:?}"
    );
    assert!(inserts.iter().all(|r| r.status == 429));
    let waits: Vec<Duration> = h
        .waits
        .lock()
        .expect("lock")
        .iter()
        .filter(|w| w.call.starts_with("compute.instances.insert"))
        .map(|w| w.wait)
        .collect();
    assert_eq!(waits.len(), 8, "{waits:?}");
    for (i, a) in waits.iter().enumerate() {
        assert!(*a <= cap, "{a:?} over the cap");
        for b in &waits[i + 1..] {
            assert_ne!(a, b, "two retries waited exactly as long: {waits:?}");
        }
    }
    assert!(phases(&driver).is_empty(), "refused inserts leave no entry");
    h.assert_no_rejections();
}

#[tokio::test]
async fn an_operation_that_never_completes_fails_start_at_the_deadline() {
    let h = Harness::new().await;
    h.fake.set_operations_complete(false);
    let config = GcpVmConfig {
        operation_timeout: Duration::from_secs(1),
        ..h.config()
    };
    let driver = h.driver(config);
    let started = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(10), driver.start())
        .await
        .expect("start does not hang")
        .expect_err("the operation never finishes");
    let took = started.elapsed();
    assert!(
        error
            .0
            .contains("did not finish within 1s; abandoned — the VM will be reconciled"),
        "{error}"
    );
    assert!(error.0.contains("insert of VM pool-0"), "{error}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The entry is kept with its operation, and the reconcile finishes the job: the instance
    // itself came up.
    let kept = driver.pool.read(|s| s.vms.get(&0).cloned()).expect("kept");
    assert!(kept.last_operation.is_some() || kept.phase != Phase::Creating);
    eventually(Duration::from_secs(5), "the VM reconciled to ready", || {
        phases(&driver).get("pool-0") == Some(&Phase::Ready)
    })
    .await;
    h.assert_no_rejections();
}

#[tokio::test]
async fn an_existing_vm_is_adopted_on_409() {
    let h = Harness::new().await;
    h.fake.add_instance("pool-0", &labels());
    let pool = h.bare_pool(h.config());
    let deadline = Deadline::after(Instant::now(), Duration::from_secs(10));
    pool.ensure_slot(0, deadline).await.expect("adopted");
    let inserts = h.inserts();
    assert_eq!(inserts.len(), 1);
    assert_eq!(inserts[0].status, 409);
    assert_eq!(h.fake.instances().len(), 1);
    assert_eq!(
        pool.read(|s| s.vms.get(&0).map(|vm| vm.phase)),
        Some(Phase::Ready)
    );
    let saved = std::fs::read_to_string(h.checkpoint()).expect("checkpoint written");
    assert!(saved.contains("pool-0"));

    // A same-named instance that is not the pool's is left alone.
    h.fake.add_instance("pool-1", &[]);
    let error = pool.ensure_slot(1, deadline).await.expect_err("not ours");
    assert!(
        error
            .to_string()
            .contains("without the label cascade-pool=pool"),
        "{error}"
    );
    assert!(pool.read(|s| !s.vms.contains_key(&1)));
    h.assert_no_rejections();
}

/// The router's view of the pool: every ready VM, named by the VM, at its service port.
#[tokio::test]
async fn every_ready_vm_is_an_endpoint() {
    let h = Harness::new().await;
    let config = GcpVmConfig {
        vms: 2,
        max_vms: 2,
        ..h.config()
    };
    let driver = h.driver(config);
    assert!(
        driver.endpoints().is_empty(),
        "nothing serves before a start"
    );
    driver.start().await.expect("starts");
    let port = h.fake.vm_service_port();
    let ips: BTreeMap<String, String> = h
        .fake
        .instances()
        .into_iter()
        .map(|vm| (vm.name, vm.ip.unwrap_or_default()))
        .collect();
    let endpoints = driver.endpoints();
    let expected: Vec<Endpoint> = ["pool-0", "pool-1"]
        .iter()
        .map(|name| Endpoint::new(*name, format!("http://{}:{port}", ips[*name])))
        .collect();
    assert_eq!(endpoints, expected);
    // A VM that stops being ready stops being an endpoint.
    driver.pool.update(|s| {
        if let Some(vm) = s.vms.get_mut(&1) {
            vm.phase = Phase::Unhealthy;
        }
    });
    assert_eq!(driver.endpoints(), expected[..1]);
    h.assert_no_rejections();
}

/// Default watch and reconcile intervals: only the watch tick's `instances.list` can see a
/// preemption in time.
fn default_intervals(config: GcpVmConfig) -> GcpVmConfig {
    let defaults = GcpVmConfig::default();
    GcpVmConfig {
        watch_interval: defaults.watch_interval,
        reconcile_interval: defaults.reconcile_interval,
        ..config
    }
}

/// Like Compute Engine: a preempted VM's guest keeps serving for 30 s while it is STOPPING.
fn long_grace() -> FakeOptions {
    FakeOptions {
        preemption_grace: Duration::from_secs(30),
        ..FakeOptions::default()
    }
}

#[tokio::test]
async fn a_preempted_vm_is_lost_at_once_and_replaced() {
    let mut h = Harness::with(long_grace()).await;
    // No room for a spare: the slot is deleted and inserted again under the same name.
    let config = GcpVmConfig {
        max_vms: 1,
        ..default_intervals(h.config())
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    assert!(matches!(driver.probe().await, ProbeOutcome::Up { .. }));
    while h.events.try_recv().is_ok() {}

    let preempted = Instant::now();
    h.fake.preempt("pool-0");
    let event = h
        .event(
            Duration::from_secs(2),
            |e| matches!(e, DriverEvent::Changed { note } if note.contains("preempted")),
        )
        .await;
    let noticed = preempted.elapsed();
    assert!(
        noticed < Duration::from_secs(1),
        "took {noticed:?}: {event:?}"
    );
    // Learnt from the API (the VM still answers its health check while STOPPING).
    assert!(
        matches!(&event, DriverEvent::Changed { note } if note.contains("STOPPING")),
        "{event:?}"
    );
    match driver.probe().await {
        ProbeOutcome::Idle { reason } => assert!(reason.contains("preempted"), "{reason}"),
        other => panic!("a pool whose only VM is preempted must not serve: {other:?}"),
    }

    h.event(Duration::from_secs(10), |e| {
        matches!(e, DriverEvent::BackendRestarted { .. })
    })
    .await;
    assert_eq!(h.instance_status("pool-0").as_deref(), Some("RUNNING"));
    assert!(matches!(driver.probe().await, ProbeOutcome::Up { .. }));
    assert_ne!(driver.endpoint(), None);
    // The old preemption operation does not condemn the new VM.
    let notes = driver.pool.reconcile().await.expect("reconciled");
    assert!(notes.is_empty(), "{notes:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(phases(&driver).get("pool-0"), Some(&Phase::Ready));
    while let Ok(event) = h.events.try_recv() {
        assert!(
            !matches!(event, DriverEvent::BackendRestarted { .. }),
            "replaced twice: {event:?}"
        );
    }
    h.assert_no_rejections();
}

#[tokio::test]
async fn with_room_in_max_vms_the_replacement_is_created_before_the_lost_vm_is_gone() {
    // Deletes (like every operation) take a second to finish: long enough
    // that a replacement waiting for the delete shows, against requests
    // that merely went out in either order at once.
    let delete_takes = Duration::from_secs(1);
    let mut h = Harness::with(FakeOptions {
        operation_delay: delete_takes,
        ..long_grace()
    })
    .await;
    let config = GcpVmConfig {
        vms: 1,
        max_vms: 2,
        ..default_intervals(h.config())
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    assert_eq!(h.inserts().len(), 1);
    while h.events.try_recv().is_ok() {}

    h.fake.preempt("pool-0");
    h.event(
        Duration::from_secs(10),
        |e| matches!(e, DriverEvent::BackendRestarted { note } if note.contains("pool-1")),
    )
    .await;
    // The spare slot's insert went out before the lost VM's delete finished
    // (its operation is done `delete_takes` after the request), not after.
    let insert_at = h.inserts()[1].at;
    let deleted_at = h
        .deletes()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.at + delete_takes)
        .next();
    assert!(
        deleted_at.is_none_or(|deleted| insert_at < deleted),
        "the replacement waited for the delete"
    );
    assert!(matches!(driver.probe().await, ProbeOutcome::Up { .. }));
    assert_eq!(driver.endpoints().len(), 1);
    // The lost VM is deleted and the pool holds one VM again, in the spare slot.
    eventually(Duration::from_secs(10), "pool-0 deleted", || {
        h.instance_status("pool-0").is_none()
    })
    .await;
    // The pool learns of it from the delete operation, a moment after the
    // fake has dropped the VM.
    eventually(
        Duration::from_secs(10),
        "the pool to hold pool-1 alone",
        || phases(&driver) == BTreeMap::from([("pool-1".to_owned(), Phase::Ready)]),
    )
    .await;
    // A start phase now uses the VM the pool has rather than filling slot 0 again.
    driver.start().await.expect("starts");
    assert_eq!(h.inserts().len(), 2, "one VM, one replacement");
    assert_eq!(h.fake.instances().len(), 1);
    h.assert_no_rejections();
}

#[tokio::test]
async fn a_start_during_a_spare_replacement_waits_for_it_instead_of_creating_another() {
    let mut h = Harness::with(long_grace()).await;
    let config = GcpVmConfig {
        vms: 1,
        max_vms: 3,
        ..default_intervals(h.config())
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    while h.events.try_recv().is_ok() {}
    h.fake.preempt("pool-0");
    eventually(Duration::from_secs(5), "a replacement in flight", || {
        h.inserts().len() == 2
    })
    .await;
    driver.start().await.expect("starts");
    eventually(Duration::from_secs(10), "pool-0 deleted", || {
        h.instance_status("pool-0").is_none()
    })
    .await;
    assert_eq!(h.inserts().len(), 2, "{:?}", phases(&driver));
    assert_eq!(
        phases(&driver),
        BTreeMap::from([("pool-1".to_owned(), Phase::Ready)])
    );
    h.assert_no_rejections();
}

#[tokio::test]
async fn with_drop_a_preempted_vm_is_deleted_and_not_replaced() {
    let mut h = Harness::with(long_grace()).await;
    let config = GcpVmConfig {
        on_preemption: OnPreemption::Drop,
        ..default_intervals(h.config())
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    while h.events.try_recv().is_ok() {}
    let preempted = Instant::now();
    h.fake.preempt("pool-0");
    h.event(
        Duration::from_secs(2),
        |e| matches!(e, DriverEvent::Changed { note } if note.contains("preempted")),
    )
    .await;
    assert!(preempted.elapsed() < Duration::from_secs(1));
    h.event(
        Duration::from_secs(5),
        |e| matches!(e, DriverEvent::Changed { note } if note.contains("deleted")),
    )
    .await;
    eventually(Duration::from_secs(5), "the instance deleted", || {
        h.fake.instances().is_empty()
    })
    .await;
    match driver.probe().await {
        ProbeOutcome::Idle { reason } => {
            assert!(reason.contains("preempted"), "{reason}");
            assert!(
                !reason.contains("pool-0"),
                "a reason never names a VM already deleted: {reason}"
            );
            assert!(
                reason.contains("none are created until the waterfall starts this tier"),
                "nor promises a start that will not run: {reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.inserts().len(), 1, "nothing re-created");
    driver.pool.persist().await;
    let details = driver.details();
    assert!(
        details["checkpoint"].contains(": 0 VMs, written "),
        "the checkpoint's details follow the file: {details:?}"
    );
    assert!(
        details["last_lost"].starts_with("pool-0 lost at "),
        "{details:?}"
    );
    h.assert_no_rejections();
}

#[tokio::test]
async fn an_idle_pool_is_deleted_after_idle_ttl_unless_active() {
    let mut h = Harness::new().await;
    let config = GcpVmConfig {
        idle_ttl: Duration::from_millis(500),
        ..h.config()
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    driver.set_active(true);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        h.instance_status("pool-0").as_deref(),
        Some("RUNNING"),
        "active: kept"
    );

    let inactive = Instant::now();
    driver.set_active(false);
    h.event(
        Duration::from_secs(5),
        |e| matches!(e, DriverEvent::Changed { note } if note.contains("idle")),
    )
    .await;
    assert!(inactive.elapsed() >= Duration::from_millis(500));
    eventually(Duration::from_secs(5), "the instance deleted", || {
        h.fake.instances().is_empty()
    })
    .await;
    assert!(matches!(driver.probe().await, ProbeOutcome::Idle { .. }));
    assert!(
        h.fake
            .compute_requests()
            .iter()
            .any(|r| r.method_id == "compute.instances.delete")
    );
    // Released: nothing comes back by itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.fake.instances().is_empty());
    assert_eq!(h.inserts().len(), 1);
    h.assert_no_rejections();
}

#[tokio::test]
async fn a_corrupt_checkpoint_is_set_aside_and_the_pool_rebuilt() {
    let h = Harness::new().await;
    h.fake.add_instance("pool-0", &labels());
    let path = h.checkpoint();
    std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
    std::fs::write(&path, b"{\"version\": 1, \"vms\": [tru").expect("write garbage");

    let driver = h.driver(h.config());
    eventually(Duration::from_secs(5), "pool-0 adopted and ready", || {
        phases(&driver).get("pool-0") == Some(&Phase::Ready)
    })
    .await;
    let note = driver.details()["checkpoint_at_start"].clone();
    assert!(note.starts_with("set aside as "), "{note}");
    assert!(note.ends_with("; rebuilt from instances.list"), "{note}");
    let aside: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1);
    driver.pool.persist().await;
    let Loaded::Restored(saved) =
        checkpoint::load(&path, POOL, &h.config().project, &h.config().zone)
    else {
        panic!("a valid checkpoint replaces the corrupt one");
    };
    assert_eq!(saved.vms.len(), 1);
    assert!(
        h.inserts().is_empty(),
        "rebuilt from the list, not re-created"
    );
    h.assert_no_rejections();
}

#[tokio::test]
async fn restore_then_reconcile_adopts_what_the_file_missed_and_drops_what_is_gone() {
    let h = Harness::new().await;
    h.fake.add_instance("pool-0", &labels());
    h.fake.add_instance("pool-1", &labels());
    let config = GcpVmConfig {
        max_vms: 4,
        ..h.config()
    };
    let mut file = Checkpoint::empty(POOL, &config.project, &config.zone);
    file.vms = vec![ready_entry(0, 999), ready_entry(3, 998)];
    checkpoint::save(&h.checkpoint(), &file).expect("save");

    let driver = h.driver(config);
    eventually(
        Duration::from_secs(5),
        "pool-0 and pool-1 known, pool-3 dropped",
        || {
            let p = phases(&driver);
            p.keys().cloned().collect::<Vec<_>>() == ["pool-0", "pool-1"]
                && p.values().all(|phase| *phase == Phase::Ready)
        },
    )
    .await;
    driver.pool.persist().await;
    let Loaded::Restored(saved) =
        checkpoint::load(&h.checkpoint(), POOL, &file.project, &file.zone)
    else {
        panic!("checkpoint readable");
    };
    let names: Vec<&str> = saved.vms.iter().map(|vm| vm.name.as_str()).collect();
    assert_eq!(names, ["pool-0", "pool-1"]);
    assert!(h.inserts().is_empty());
    h.assert_no_rejections();
}

#[tokio::test]
async fn a_restarted_driver_restores_and_reconciles_without_losing_or_inserting_a_vm() {
    let h = Harness::new().await;
    let config = GcpVmConfig {
        vms: 2,
        max_vms: 2,
        ..h.config()
    };
    let driver = h.driver(config.clone());
    let path = h.checkpoint().display().to_string();
    assert_eq!(
        driver.details()["checkpoint_at_start"],
        format!("none yet ({path})")
    );
    assert_eq!(
        driver.details()["checkpoint"],
        format!("{path}: not written yet (nothing to keep)")
    );
    driver.start().await.expect("starts");
    assert_eq!(phases(&driver).len(), 2);
    driver.pool.persist().await;
    let written = driver.details()["checkpoint"].clone();
    assert!(
        written.starts_with(&format!("{path}: 2 VMs, written ")),
        "the details say what the file holds now: {written}"
    );
    // A crash: the driver goes away without stopping anything; the checkpoint stays.
    drop(driver);

    let restarted_at = std::time::Instant::now();
    let driver = h.driver(config);
    assert_eq!(
        phases(&driver).len(),
        2,
        "both VMs restored from the checkpoint"
    );
    let restored = format!("restored 2 VMs from {path}");
    assert_eq!(driver.details()["checkpoint_at_start"], restored);
    driver.start().await.expect("starts again");
    let p = phases(&driver);
    assert_eq!(p.len(), 2);
    assert!(p.values().all(|phase| *phase == Phase::Ready), "{p:?}");
    assert_eq!(
        driver.details()["checkpoint_at_start"],
        restored,
        "what the start found stays what it found"
    );
    assert!(
        h.inserts().iter().all(|r| r.at < restarted_at),
        "no instances.insert after the restart"
    );
    assert_eq!(h.fake.instances().len(), 2);
    h.assert_no_rejections();
}

#[tokio::test]
async fn a_delete_interrupted_by_a_crash_is_finished_after_the_restart() {
    let h = Harness::new().await;
    h.fake.add_instance("pool-0", &labels());
    let config = h.config();
    // The idle deletion had marked the VM and died before instances.delete went out.
    let mut file = Checkpoint::empty(POOL, &config.project, &config.zone);
    let mut entry = ready_entry(0, 1);
    entry.phase = Phase::Deleting;
    file.vms = vec![entry];
    checkpoint::save(&h.checkpoint(), &file).expect("save");

    let driver = h.driver(config);
    eventually(Duration::from_secs(5), "the instance deleted", || {
        h.fake.instances().is_empty()
    })
    .await;
    eventually(Duration::from_secs(5), "the entry forgotten", || {
        phases(&driver).is_empty()
    })
    .await;
    assert!(h.inserts().is_empty());
    h.assert_no_rejections();
}

#[tokio::test]
async fn restart_dry_run_lists_the_plan_and_changes_nothing() {
    let h = Harness::new().await;
    let driver = h.driver(h.config());
    driver.start().await.expect("starts");
    let report = driver
        .restart(RestartRequest {
            force: false,
            dry_run: true,
        })
        .await
        .expect("plan");
    assert!(
        report.plan[0].starts_with("delete VM pool-0"),
        "{:?}",
        report.plan
    );
    assert!(
        report.plan[1].starts_with("insert pool-0"),
        "{:?}",
        report.plan
    );
    assert_eq!(h.inserts().len(), 1);

    driver
        .restart(RestartRequest::default())
        .await
        .expect("restarts");
    assert_eq!(h.inserts().len(), 2, "deleted and created again");
    assert_eq!(phases(&driver).get("pool-0"), Some(&Phase::Ready));
    h.assert_no_rejections();
}

#[tokio::test]
async fn an_idle_delete_spares_a_vm_in_use_again_by_the_time_it_holds_the_slot() {
    let h = Harness::new().await;
    let config = GcpVmConfig {
        idle_ttl: Duration::from_millis(200),
        ..h.config()
    };
    let pool = h.bare_pool(config);
    let deadline = Deadline::after(Instant::now(), Duration::from_secs(10));
    pool.ensure_slot(0, deadline).await.expect("ready");
    pool.reconcile().await.expect("reconciled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Someone works on the slot while idle deletion picks the VM; the tier becomes active
    // before the delete gets the slot.
    let held = pool.slot_lock(0).lock_owned().await;
    pool.collect_idle();
    assert_eq!(pool.read(|s| s.busy.len()), 1, "a delete job waits");
    tokio::time::sleep(Duration::from_millis(50)).await;
    pool.set_active(true);
    drop(held);
    eventually(Duration::from_secs(5), "the delete job over", || {
        pool.tracked_tasks() == 0
    })
    .await;
    assert!(h.deletes().is_empty(), "{:?}", h.deletes());
    assert_eq!(h.instance_status("pool-0").as_deref(), Some("RUNNING"));
    assert_eq!(
        pool.read(|s| s.vms.get(&0).map(|vm| vm.phase)),
        Some(Phase::Ready)
    );
    assert!(pool.read(|s| s.wanted), "the release is undone");
    h.assert_no_rejections();
}

#[tokio::test]
async fn an_idle_delete_spares_a_vm_a_start_claimed_meanwhile() {
    let h = Harness::new().await;
    let config = GcpVmConfig {
        idle_ttl: Duration::from_millis(200),
        ..h.config()
    };
    let pool = h.bare_pool(config);
    let deadline = Deadline::after(Instant::now(), Duration::from_secs(10));
    pool.ensure_slot(0, deadline).await.expect("ready");
    pool.reconcile().await.expect("reconciled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = pool.slot_lock(0).lock_owned().await;
    pool.collect_idle();
    assert!(pool.read(|s| !s.wanted), "idle deletion released the pool");
    // The delete job queues for the slot first, then a start does.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let starting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.start().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(pool.read(|s| s.wanted), "the start wants the pool");
    drop(held);
    starting
        .await
        .expect("the start task")
        .expect("the start succeeds");
    assert!(h.deletes().is_empty(), "{:?}", h.deletes());
    assert_eq!(h.inserts().len(), 1, "the VM kept, not re-created");
    assert!(pool.read(|s| s.wanted), "the start's `wanted` stands");
    assert_eq!(
        pool.read(|s| s.vms.get(&0).map(|vm| vm.phase)),
        Some(Phase::Ready)
    );
    pool.shutdown();
    h.assert_no_rejections();
}

#[tokio::test]
async fn nothing_is_deleted_before_a_reconcile_confirms_the_restored_entries() {
    let h = Harness::new().await;
    // Someone else's instance under the name the checkpoint remembers.
    h.fake.add_instance("pool-0", &[]);
    let config = h.config();
    let mut file = Checkpoint::empty(POOL, &config.project, &config.zone);
    let mut entry = ready_entry(0, 1);
    entry.phase = Phase::Deleting;
    file.vms = vec![entry];
    checkpoint::save(&h.checkpoint(), &file).expect("save");
    // The first reconciles fail (403 is not retried).
    h.fake.fail_compute("compute.instances.list", 3, 403, None);

    let driver = h.driver(config);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(h.deletes().is_empty(), "{:?}", h.deletes());
    assert_eq!(phases(&driver).get("pool-0"), Some(&Phase::Deleting));
    // Once the list answers, the entry is dropped: the label list does not hold it.
    eventually(Duration::from_secs(5), "the entry dropped", || {
        phases(&driver).is_empty()
    })
    .await;
    assert!(h.deletes().is_empty(), "{:?}", h.deletes());
    assert_eq!(h.instance_status("pool-0").as_deref(), Some("RUNNING"));
    h.assert_no_rejections();
}

#[tokio::test]
async fn a_delete_checks_the_pool_label_before_it_goes_out() {
    let h = Harness::new().await;
    h.fake.add_instance("pool-0", &[]);
    let config = h.config();
    let mut file = Checkpoint::empty(POOL, &config.project, &config.zone);
    let mut entry = ready_entry(0, 1);
    entry.phase = Phase::Lost;
    file.vms = vec![entry];
    checkpoint::save(&h.checkpoint(), &file).expect("save");
    // No reconcile succeeds: the start replaces the "lost" VM on the checkpoint's word (in its
    // own slot: max_vms leaves no room for another).
    h.fake
        .fail_compute("compute.instances.list", 10_000, 403, None);

    let driver = h.driver(GcpVmConfig {
        max_vms: 1,
        ..config
    });
    let error = driver.start().await.expect_err("not the pool's instance");
    assert!(
        error.0.contains("without the label cascade-pool=pool"),
        "{error}"
    );
    assert!(h.deletes().is_empty(), "{:?}", h.deletes());
    assert_eq!(h.instance_status("pool-0").as_deref(), Some("RUNNING"));
    assert!(phases(&driver).is_empty(), "the wrong entry is forgotten");
    h.assert_no_rejections();
}

#[tokio::test]
async fn an_unmovable_corrupt_checkpoint_is_never_overwritten() {
    let h = Harness::new().await;
    // A name so long that `NAME.corrupt-...` exceeds NAME_MAX: the set-aside rename fails, while
    // a save's temporary file (`.NAME.tmp-PID-N`) would still fit.
    let path = h.dir.path().join(format!("{}.json", "p".repeat(232)));
    std::fs::write(&path, b"{corrupt").expect("write garbage");
    let pool = h.bare_pool_at(h.config(), path.clone());
    let note = pool.details()["checkpoint_at_start"].clone();
    assert!(note.contains("could not be moved aside"), "{note}");
    let deadline = Deadline::after(Instant::now(), Duration::from_secs(10));
    pool.ensure_slot(0, deadline)
        .await
        .expect("runs from the API");
    pool.persist().await;
    assert_eq!(std::fs::read(&path).expect("still there"), b"{corrupt");
    let details = pool.details();
    assert!(
        details["checkpoint_error"].contains("could not be moved aside"),
        "{details:?}"
    );
    h.assert_no_rejections();
}

#[tokio::test]
async fn waiting_for_a_busy_slot_ends_at_the_deadline() {
    let h = Harness::new().await;
    let pool = h.bare_pool(h.config());
    let _held = pool.slot_lock(0).lock_owned().await;
    let started = Instant::now();
    let deadline = Deadline::after(started, Duration::from_millis(300));
    let error = tokio::time::timeout(Duration::from_secs(5), pool.ensure_slot(0, deadline))
        .await
        .expect("the wait is bounded")
        .expect_err("the slot stays busy");
    let took = started.elapsed();
    assert!(error.to_string().contains("busy"), "{error}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(h.inserts().is_empty());
}

#[tokio::test]
async fn waiting_for_an_operation_deposits_nothing_into_the_budget() {
    let h = Harness::new().await;
    h.fake.set_operations_complete(false);
    let config = GcpVmConfig {
        operation_timeout: Duration::from_secs(1),
        retry: RetryConfig {
            budget: RetryBudgetConfig {
                ratio: 1.0,
                min_per_sec: 0.0,
                window: Duration::from_secs(60),
            },
            ..h.config().retry
        },
        ..h.config()
    };
    let pool = h.bare_pool(config);
    let deadline = Deadline::after(Instant::now(), Duration::from_secs(10));
    let error = pool
        .ensure_slot(0, deadline)
        .await
        .expect_err("the insert never finishes");
    assert!(error.to_string().contains("did not finish"), "{error}");
    let polls = h.requests("compute.zoneOperations.get").len();
    assert!(polls >= 3, "{polls} polls");
    assert_eq!(
        pool.retrier.budget_balance(Instant::now()),
        1.0,
        "the insert deposits; its {polls} polls do not"
    );
}

#[tokio::test]
async fn a_dropped_driver_never_writes_the_checkpoint_again() {
    let h = Harness::new().await;
    let driver = h.driver(h.config());
    driver.start().await.expect("starts");
    let pool = driver.pool.clone();
    // A change whose write is queued (or in flight) when the driver drops: the drop waits for a
    // write in flight and abandons a queued one, so the file is final once it returns.
    pool.update(|s| s.wanted = !s.wanted);
    drop(driver);
    let before = std::fs::read(h.checkpoint()).expect("written");
    // A task of the old pool finishing a step after a new driver loaded the file.
    pool.update(|s| s.wanted = !s.wanted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read(h.checkpoint()).expect("kept"), before);
}

#[tokio::test]
async fn stop_waits_until_no_background_task_runs() {
    let h = Harness::new().await;
    let driver = h.driver(h.config());
    driver.start().await.expect("starts");
    assert!(driver.pool.tracked_tasks() > 0, "the watch runs");
    driver.stop(StopReason::Exiting).await.expect("stops");
    assert_eq!(driver.pool.tracked_tasks(), 0);
    let before = std::fs::read(h.checkpoint()).expect("written");
    let requests = h.fake.compute_requests().len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(std::fs::read(h.checkpoint()).expect("kept"), before);
    assert_eq!(h.fake.compute_requests().len(), requests, "nothing watches");
    // A later start watches again.
    driver.start().await.expect("starts again");
    assert!(driver.pool.tracked_tasks() > 0);
}

#[tokio::test]
async fn an_idle_delete_is_retried_like_an_insert() {
    let mut h = Harness::new().await;
    let config = GcpVmConfig {
        idle_ttl: Duration::from_millis(300),
        ..h.config()
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    h.fake.fail_compute("compute.instances.get", 1, 429, None);
    h.fake
        .fail_compute("compute.instances.delete", 2, 503, None);
    h.event(
        Duration::from_secs(10),
        |e| matches!(e, DriverEvent::Changed { note } if note.contains("deleted (idle")),
    )
    .await;
    assert!(h.fake.instances().is_empty());
    let statuses: Vec<u16> = h.deletes().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
    let waits: Vec<RetryWait> = h.waits.lock().expect("lock").clone();
    let retried = |call: &str| waits.iter().filter(|w| w.call.starts_with(call)).count();
    assert_eq!(retried("compute.instances.delete pool-0"), 2, "{waits:?}");
    assert_eq!(retried("compute.instances.get pool-0"), 1, "{waits:?}");
    assert!(phases(&driver).is_empty());
    h.assert_no_rejections();
}

#[tokio::test]
async fn a_start_never_takes_the_pool_past_max_vms() {
    let h = Harness::new().await;
    // Left over from a larger pool: the reconcile adopts them, which fills max_vms.
    h.fake.add_instance("pool-1", &labels());
    h.fake.add_instance("pool-2", &labels());
    let config = GcpVmConfig {
        vms: 1,
        max_vms: 2,
        ..h.config()
    };
    let driver = h.driver(config);
    eventually(Duration::from_secs(5), "both adopted and ready", || {
        let p = phases(&driver);
        p.len() == 2 && p.values().all(|phase| *phase == Phase::Ready)
    })
    .await;
    // Slot 0 would be a third instance: the start serves from a VM the pool has instead.
    driver.start().await.expect("serving with the VMs it has");
    assert!(h.inserts().is_empty(), "{:?}", h.inserts());
    assert_eq!(
        driver.endpoints().len(),
        2,
        "both adopted VMs serve: {:?}",
        phases(&driver)
    );
    assert_eq!(h.fake.instances().len(), 2);
    assert_eq!(phases(&driver).len(), 2);
    h.assert_no_rejections();
}

#[tokio::test]
async fn replacing_a_lost_vm_never_holds_more_than_max_vms_instances() {
    let mut h = Harness::with(long_grace()).await;
    let config = GcpVmConfig {
        vms: 2,
        max_vms: 2,
        ..default_intervals(h.config())
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    while h.events.try_recv().is_ok() {}
    h.fake.preempt("pool-0");
    h.event(
        Duration::from_secs(2),
        |e| matches!(e, DriverEvent::Changed { note } if note.contains("preempted")),
    )
    .await;
    // A start phase asks for the pool while the replacement runs; the instances the fake
    // holds are counted all along.
    let mut start = Box::pin(driver.start());
    let mut started = None;
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        most = most.max(h.fake.instances().len());
        if started.is_some() && phases(&driver).values().all(|p| *p == Phase::Ready) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not replaced: {:?}",
            phases(&driver)
        );
        tokio::select! {
            result = &mut start, if started.is_none() => started = Some(result),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    started.expect("done").expect("the start succeeds");
    assert_eq!(most, 2, "never more than max_vms");
    assert_eq!(h.inserts().len(), 3, "two, then one replacement");
    assert_eq!(h.fake.instances().len(), 2);
    h.assert_no_rejections();
}

// === the checkpoint under SIGKILL ===

/// Set in the child: the path it writes checkpoints to, and the first generation.
const WRITER_ENV: &str = "CASCADE_GCP_VM_CHECKPOINT_WRITER";

/// State `k`: `k % 8` VMs, and `k` itself recorded, so a file names the state it holds.
fn generation(k: u64) -> Checkpoint {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + k);
    let mut c = Checkpoint::empty(POOL, "proj", "zone");
    c.handled_preemptions = vec![format!("gen-{k}")];
    c.wanted = true;
    for slot in 0..(k % 8) as u32 {
        let mut vm = VmEntry::new(format!("{POOL}-{slot}"), slot, Phase::Ready, t);
        vm.ip = Some(format!("10.0.{}.{slot}", k % 250));
        vm.last_operation = Some(OpRef {
            name: format!("op-{k}-{slot}"),
            kind: OpKind::Insert,
        });
        c.vms.push(vm);
    }
    c
}

fn generation_of(c: &Checkpoint) -> u64 {
    c.handled_preemptions
        .first()
        .and_then(|g| g.strip_prefix("gen-"))
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {c:?}"))
}

/// The child: saves generation after generation until killed, printing each once saved.
fn checkpoint_writer(spec: &str) -> ! {
    let (path, first) = spec.split_once('|').expect("PATH|FIRST");
    let path = Path::new(path);
    let mut k: u64 = first.parse().expect("a number");
    println!("ready");
    loop {
        checkpoint::save(path, &generation(k)).expect("save");
        println!("saved {k}");
        k += 1;
    }
}

#[test]
fn the_checkpoint_is_always_a_whole_state_when_sigkilled_mid_write() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use rand::Rng;

    if let Ok(spec) = std::env::var(WRITER_ENV) {
        checkpoint_writer(&spec);
    }
    let dir = TempDir::new().expect("temp dir");
    let path = dir.path().join("pool.json");
    let exe = std::env::current_exe().expect("the test binary");
    let mut rng = rand::rng();
    let started = std::time::Instant::now();
    let mut on_disk: Option<u64> = None;
    let mut rounds = 0;
    while rounds < 50 || (rounds < 200 && started.elapsed() < Duration::from_secs(5)) {
        rounds += 1;
        let first = rounds * 1_000_000;
        let mut child = std::process::Command::new(&exe)
            .args([
                "tiers::gcp_vm::tests::the_checkpoint_is_always_a_whole_state_when_sigkilled_mid_write",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, format!("{}|{first}", path.display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the writer");
        // Lines are read on a thread so that waiting for the writer is bounded: a writer that
        // never gets ready is killed and the test fails instead of hanging.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ready = loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                // With --nocapture the harness's "test NAME ... " shares the line.
                Ok(line) if line.ends_with("ready") => break true,
                Ok(_) => {}
                Err(_) => break false,
            }
        };
        if ready {
            std::thread::sleep(Duration::from_micros(rng.random_range(0..=20_000)));
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("kill");
        child.wait().expect("reap");
        reader.join().expect("reader");
        assert!(ready, "round {rounds}: the writer did not get ready");
        let last_saved: Option<u64> = rx
            .try_iter()
            .filter_map(|l| l.strip_prefix("saved ").and_then(|k| k.parse().ok()))
            .last();

        let temps = checkpoint::temp_files(&path);
        let loaded = checkpoint::load(&path, POOL, "proj", "zone");
        let k = match loaded {
            Loaded::Restored(c) => {
                let k = generation_of(&c);
                assert_eq!(
                    c,
                    generation(k),
                    "round {rounds}: the file is exactly state {k}"
                );
                k
            }
            Loaded::Missing => {
                assert!(
                    on_disk.is_none() && last_saved.is_none(),
                    "round {rounds}: the file vanished"
                );
                continue;
            }
            other => {
                panic!("round {rounds}: the checkpoint is not whole: {other:?} (temps {temps:?})")
            }
        };
        // Old or new: the last one saved, the one being saved, or (nothing saved this round)
        // what the previous round left.
        let allowed = match last_saved {
            Some(last) => vec![last, last + 1],
            None => on_disk.into_iter().chain([first]).collect(),
        };
        assert!(
            allowed.contains(&k),
            "round {rounds}: state {k}, expected one of {allowed:?}"
        );
        assert!(
            checkpoint::temp_files(&path).is_empty(),
            "load removes leftovers"
        );
        on_disk = Some(k);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn retry_after_is_read_in_both_of_its_forms() {
    let error = |value: &str| {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", value.parse().expect("a header value"));
        google_cloud_gax::error::Error::http(429, headers, Vec::new().into())
    };
    let seconds = ApiError::from_gax(&error("7"));
    assert_eq!(seconds.retry_after, Some(Duration::from_secs(7)));
    let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
    let date = ApiError::from_gax(&error(&later));
    let wait = date.retry_after.expect("an HTTP-date is read");
    assert!(
        wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
        "{wait:?}"
    );
    assert_eq!(ApiError::from_gax(&error("soon")).retry_after, None);
}

// === what the pool says, and the API's promises ===

/// Insert request times as the fake saw them.
fn insert_times(h: &Harness) -> Vec<Instant> {
    let mut times: Vec<Instant> = h.inserts().iter().map(|r| r.at.into()).collect();
    times.sort();
    times
}

/// A `Retry-After` holds every caller in the pool: the retries of one start, and the first
/// attempt of the next start, which the budget never stops.
#[tokio::test]
async fn a_retry_after_holds_every_caller_of_the_api_in_the_pool() {
    let h = Harness::new().await;
    h.fake
        .fail_compute("compute.instances.insert", 4, 429, Some(1));
    let config = GcpVmConfig {
        retry: RetryConfig {
            base: Duration::from_millis(10),
            cap: Duration::from_secs(4),
            max_attempts: 2,
            ..RetryConfig::default()
        },
        ..h.config()
    };
    let driver = h.driver(config);
    let error = driver.start().await.expect_err("two attempts, two 429s");
    assert!(error.0.contains("429"), "{error}");
    match driver.probe().await {
        ProbeOutcome::Idle { reason } => {
            assert!(
                reason.contains("Compute Engine: rate limited until "),
                "the reason says why nothing runs: {reason}"
            );
            assert!(
                reason.contains("compute.instances.insert pool-0"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A new start at once: its first attempt waits for the Retry-After too.
    driver
        .start()
        .await
        .expect_err("two more attempts, two more 429s");
    driver.start().await.expect("the fifth insert goes through");
    let times = insert_times(&h);
    assert_eq!(times.len(), 5, "{:?}", h.inserts());
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        // Times are taken as the fake answers; a few ms of latency on either side.
        assert!(
            gap >= Duration::from_millis(950),
            "an insert went out {gap:?} after a Retry-After of 1 s: {times:?}"
        );
    }
    h.assert_no_rejections();
}

/// A VM that runs but never passes its health check (here: the wrong `service_port`) says why
/// while it boots, and past `boot_timeout` is reported failed and replaced, not left booting.
#[tokio::test]
async fn a_vm_that_never_passes_its_health_check_is_reported_failed_and_replaced() {
    let h = Harness::new().await;
    let port = h.fake.vm_service_port();
    let config = GcpVmConfig {
        service_port: if port < u16::MAX { port + 1 } else { port - 1 },
        boot_timeout: Duration::from_secs(2),
        start_timeout: Duration::from_secs(10),
        ..h.config()
    };
    let driver = Arc::new(h.driver(config));
    let starting = tokio::spawn({
        let driver = driver.clone();
        async move { driver.start().await }
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let reason = match driver.probe().await {
            ProbeOutcome::Idle { reason } | ProbeOutcome::Down { error: reason } => reason,
            other => panic!("{other:?}"),
        };
        if reason.contains("pool-0 booting") && reason.contains("health check failed") {
            assert!(
                reason.contains("Connection refused") || reason.contains("refused"),
                "{reason}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reason never said why: {reason}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = starting
        .await
        .expect("the start task ends")
        .expect_err("never ready");
    assert!(
        error.0.contains("did not become ready within 2s"),
        "{error}"
    );
    assert!(error.0.contains("health check failed"), "{error}");
    match driver.probe().await {
        ProbeOutcome::Idle { reason } => {
            assert!(
                reason.contains("pool-0 lost"),
                "reported as failed: {reason}"
            );
            assert!(
                reason.contains("failed: not ready 2s after it was created"),
                "{reason}"
            );
            assert!(!reason.contains("booting"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Replaced: deleted and created again by the pool itself.
    eventually(Duration::from_secs(10), "the failed VM replaced", || {
        !h.deletes().is_empty() && h.inserts().len() >= 2
    })
    .await;
    driver.stop(StopReason::Exiting).await.expect("stops");
    h.assert_no_rejections();
}

/// The API's answer to a wrong project reaches the reason, with what to check.
#[tokio::test]
async fn a_project_the_api_does_not_know_is_named_in_the_reason() {
    let h = Harness::new().await;
    let config = GcpVmConfig {
        project: "no-such-project".into(),
        ..h.config()
    };
    let driver = h.driver(config);
    let error = driver.start().await.expect_err("unknown project");
    assert!(error.0.contains("check tiers.gcp_vm.project"), "{error}");
    match driver.probe().await {
        ProbeOutcome::Idle { reason } => {
            assert!(reason.contains("Compute Engine: "), "{reason}");
            assert!(reason.contains("projects/no-such-project"), "{reason}");
            assert!(reason.contains("check tiers.gcp_vm.project"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        driver.details()["api"].contains("HTTP 404"),
        "{:?}",
        driver.details()
    );
}

/// google-cloud-auth's token cache gives up for good after a permanent error; the pool builds a
/// new client, so credentials fixed meanwhile work without a restart.
#[tokio::test]
async fn the_api_client_is_built_again_after_a_permanent_credentials_error() {
    let h = Harness::new().await;
    let pool = h.bare_pool(h.config());
    h.fake.fail_token_requests(Some(403));
    let error = pool.reconcile().await.expect_err("no access token");
    assert!(error.to_string().contains("credentials"), "{error}");
    h.fake.fail_token_requests(None);
    pool.reconcile()
        .await
        .expect("a new client, with credentials that work now");
    h.assert_no_rejections();
}

/// The checkpoint is written off the state lock: a write stuck on a slow disk holds up neither
/// the tier actor (details, set_active) nor the pool's own steps.
#[tokio::test]
async fn a_stuck_checkpoint_write_holds_up_nothing_else() {
    let h = Harness::new().await;
    let driver = h.driver(h.config());
    // A thread that holds the writer as a write stuck on the disk would, until told to let go.
    let (stalled_tx, stalled) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let pool = driver.pool.clone();
    let stuck = std::thread::spawn(move || {
        let _write = pool.stall_writes();
        stalled_tx.send(()).expect("the test waits");
        let _ = release_rx.recv();
    });
    stalled.recv().expect("the writer is held");
    let started = std::time::Instant::now();
    driver.set_active(true);
    let _ = driver.details();
    driver.pool.update(|s| s.wanted = true);
    let _ = driver.probe().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?} behind a stuck write",
        started.elapsed()
    );
    release.send(()).expect("the thread waits");
    stuck.join().expect("the thread ends");
    driver.pool.persist().await;
    let Loaded::Restored(saved) =
        checkpoint::load(&h.checkpoint(), POOL, &h.config().project, &h.config().zone)
    else {
        panic!("written once the disk is back");
    };
    assert!(saved.wanted);
}

#[tokio::test]
async fn a_pool_moved_to_another_zone_leaves_its_old_vms_to_a_drain() {
    let mut h = Harness::new().await;
    let config = GcpVmConfig {
        idle_ttl: Duration::from_millis(500),
        ..h.config()
    };
    let driver = h.driver(config.clone());
    driver.start().await.expect("starts");
    driver.set_active(true);
    driver.pool.persist().await;
    drop(driver);

    // The same pool name, now in another zone (one the fake does not serve, so the new pool's
    // own calls fail; the drain's are in the old zone).
    let moved = GcpVmConfig {
        zone: "europe-west4-a".into(),
        ..config
    };
    let driver = h.driver(moved);
    let options = h.fake.options();
    let retired = h
        .checkpoint()
        .with_file_name(format!("{POOL}@{}@{}.json", options.project, options.zone));
    assert!(
        retired.exists(),
        "the old zone's checkpoint is kept aside for the drain"
    );
    let details = driver.details();
    let key = format!("retired.{POOL}@{}@{}", options.project, options.zone);
    assert!(
        details
            .get(&key)
            .is_some_and(|d| d.contains("no longer configured")),
        "{details:?}"
    );
    // Active when it was retired: idle from now, deleted after idle_ttl, then the file goes.
    h.event(
        Duration::from_secs(10),
        |e| matches!(e, DriverEvent::Changed { note } if note.contains("drained")),
    )
    .await;
    assert!(h.fake.instances().is_empty(), "{:?}", h.fake.instances());
    assert!(!retired.exists());
    let deleted: Vec<u16> = h.deletes().iter().map(|r| r.status).collect();
    assert_eq!(deleted, [200]);
    assert!(driver.details()[&key].contains("drained"));
}

#[tokio::test]
async fn a_renamed_pool_back_within_idle_ttl_adopts_its_vms_again() {
    let h = Harness::new().await;
    let config = GcpVmConfig {
        idle_ttl: Duration::from_secs(60),
        ..h.config()
    };
    let driver = h.driver(config.clone());
    driver.start().await.expect("starts");
    driver.pool.persist().await;
    drop(driver);

    let renamed = GcpVmConfig {
        pool: "renamed".into(),
        ..config.clone()
    };
    let driver = GcpVmDriver::build(
        renamed,
        h.checkpoint().with_file_name("renamed.json"),
        h.env(),
        h.notify.clone(),
        None,
    )
    .expect("builds");
    assert!(driver.details().contains_key(&format!("retired.{POOL}")));
    drop(driver);

    // Back to the old name: its own checkpoint again, the VM adopted, nothing deleted.
    let driver = h.driver(config);
    assert_eq!(
        phases(&driver).keys().cloned().collect::<Vec<_>>(),
        ["pool-0"]
    );
    driver.start().await.expect("starts");
    assert!(h.deletes().is_empty());
    assert_eq!(h.inserts().len(), 1);
    h.assert_no_rejections();
}

// === a tier removed from the configuration ===

#[tokio::test]
async fn a_removed_tier_deletes_its_vms_and_its_checkpoint_but_exiting_keeps_them() {
    let h = Harness::new().await;
    let driver = h.driver(h.config());
    driver.start().await.expect("starts");
    driver.stop(StopReason::Exiting).await.expect("stops");
    assert_eq!(h.fake.instances().len(), 1, "exiting keeps the VM");
    assert!(h.checkpoint().exists());
    drop(driver);

    let driver = h.driver(h.config());
    driver.stop(StopReason::Removed).await.expect("drains");
    assert!(h.fake.instances().is_empty(), "{:?}", h.fake.instances());
    assert!(!h.checkpoint().exists(), "the checkpoint is removed");
    h.assert_no_rejections();
}

#[tokio::test]
async fn a_removed_tier_that_cannot_delete_in_time_says_what_to_do_and_keeps_its_checkpoint() {
    let h = Harness::new().await;
    let config = GcpVmConfig {
        stop_grace: Duration::from_secs(2),
        ..h.config()
    };
    let driver = h.driver(config);
    driver.start().await.expect("starts");
    h.fake.set_operations_complete(false);
    let error = driver
        .stop(StopReason::Removed)
        .await
        .expect_err("the delete does not finish within stop_grace");
    let text = error.to_string();
    assert!(text.contains(&format!("pool {POOL} not drained")), "{text}");
    assert!(text.contains(&format!("{POOL}-0")), "{text}");
    assert!(
        text.contains(&format!("cascade gcp_vm delete-pool {POOL} --yes")),
        "{text}"
    );
    assert!(h.checkpoint().exists(), "kept for the tier's return");
}
